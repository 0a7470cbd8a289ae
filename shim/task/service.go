// Package task is the shim's containerd task service (task API v3): it runs
// the containers of one pod in one VM through the agent inside it.
//
// The first container created starts the VM (for a CRI pod, the pause
// container); the pod's other containers, grouped into this shim by their
// group or CRI sandbox (shim/podid), join it. When the last container is
// deleted and containerd asks the shim to shut down, the VM is stopped.
//
// Create (create.go) checks the request and hands it to one step, newContainer:
// the spec is translated for the guest once (translate, spec.go), the pod is
// started with the container's rootfs or the rootfs attached to the running pod,
// host paths are shared or copied (shim/copies), devices attached, and the agent
// creates the container; each step's undoing runs if a later one fails.
package task

import (
	"context"
	"fmt"
	"os"
	"strconv"
	"sync"
	"time"

	eventstypes "github.com/containerd/containerd/api/events"
	taskAPI "github.com/containerd/containerd/api/runtime/task/v3"
	"github.com/containerd/containerd/v2/core/runtime"
	"github.com/containerd/containerd/v2/pkg/protobuf"
	"github.com/containerd/containerd/v2/pkg/shim"
	"github.com/containerd/containerd/v2/pkg/shutdown"
	"github.com/containerd/errdefs"
	"github.com/containerd/errdefs/pkg/errgrpc"
	"github.com/containerd/log"
	"github.com/containerd/ttrpc"
	"golang.org/x/sys/unix"
	"golang.org/x/time/rate"

	agent "github.com/caisson-containers/caisson/api/agent/v1"
	"github.com/caisson-containers/caisson/shim/config"
	"github.com/caisson-containers/caisson/shim/copies"
	"github.com/caisson-containers/caisson/shim/netns"
	"github.com/caisson-containers/caisson/shim/pod"
	"github.com/caisson-containers/caisson/shim/vmm"
	"github.com/caisson-containers/caisson/shim/vmm/hypervisor"
)

// vmExitCode is the exit status of processes whose VM ended under them.
const vmExitCode = 255

// killedExitCode is the exit status of processes whose VM the shim killed to deliver a
// SIGKILL (killSilentPod): 128+9, what runc reports for a process SIGKILL ended.
const killedExitCode = 128 + uint32(unix.SIGKILL)

var _ = shim.TTRPCService(&service{})

// NewTaskService returns the task service; containerd's shim package serves it.
func NewTaskService(ctx context.Context, publisher shim.Publisher, sd shutdown.Service) (taskAPI.TTRPCTaskService, error) {
	closeInheritedOnExec(ctx)
	s := &service{
		context:    ctx,
		publisher:  publisher,
		shutdown:   sd,
		events:     make(chan any, 128),
		containers: map[string]*container{},
		hypervisor: hypervisor.New,
	}
	go s.forward(ctx)
	if address, err := shim.ReadAddress("address"); err == nil {
		sd.RegisterCallback(func(context.Context) error { return shim.RemoveSocket(address) })
	}
	sd.RegisterCallback(func(ctx context.Context) error {
		s.stopPod(ctx)
		return nil
	})
	return s, nil
}

type service struct {
	context   context.Context
	publisher shim.Publisher
	shutdown  shutdown.Service
	events    chan any

	// hypervisor makes the VMM of a pod's configuration (shim/vmm/hypervisor.New; tests
	// set a fake).
	hypervisor func(config.Config) (vmm.Hypervisor, error)
	// newCgroup makes the cgroup of a pod's host processes (nil: pod.HostCgroup; tests
	// on a fake VMM without root set pod.NoCgroup).
	newCgroup pod.CgroupFunc

	mu         sync.Mutex
	containers map[string]*container
	// limits are the containers' resource limits, which the pod's VM must hold (resize.go).
	limits podLimits
	// statsReuseOff says once that the stats reuse cannot work (stats.go).
	statsReuseOff sync.Once

	podMu  sync.Mutex
	pod    *pod.Pod
	cfg    config.Config
	copies *copies.Watcher // of the pod's copied mounts
	// hookNS holds the network namespace whose pid the pod's OCI hooks get (hooks.go),
	// once a container has hooks; for a pod whose first container asked for a network
	// namespace of its own, the one its NICs come from.
	hookNS *netns.NS
}

func (s *service) RegisterTTRPC(server *ttrpc.Server) error {
	taskAPI.RegisterTTRPCTaskService(server, s)
	return nil
}

func (s *service) container(id string) (*container, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	c, ok := s.containers[id]
	if !ok {
		return nil, errgrpc.ToGRPCf(errdefs.ErrNotFound, "container %s", id)
	}
	return c, nil
}

func (s *service) process(id, execID string) (*container, *process, error) {
	c, err := s.container(id)
	if err != nil {
		return nil, nil, err
	}
	p, err := c.process(execID)
	if err != nil {
		return nil, nil, errgrpc.ToGRPC(err)
	}
	return c, p, nil
}

// ensurePod returns the running pod, or starts it for the pod's first container with o
// and cfg. started says whether it did: then the container's rootfs (o.Rootfs) is
// returned attached, on the VM's boot disks.
func (s *service) ensurePod(ctx context.Context, o pod.Options, cfg config.Config) (_ *pod.Pod, _ pod.Rootfs, started bool, _ error) {
	s.podMu.Lock()
	defer s.podMu.Unlock()
	if s.pod != nil {
		return s.pod, pod.Rootfs{}, false, nil
	}
	hv, err := s.hypervisor(cfg)
	if err != nil {
		return nil, pod.Rootfs{}, false, err
	}
	o.Hypervisor, o.NewCgroup = hv, s.newCgroup
	log.G(ctx).WithField("pod", o.ID).Info("starting pod VM")
	start := time.Now()
	p, rfs, err := pod.Start(ctx, cfg, o)
	if err != nil {
		return nil, pod.Rootfs{}, false, err
	}
	log.G(ctx).WithField("pod", o.ID).WithField("qemu_pid", p.Pid()).WithField("took", time.Since(start)).Info("pod VM ready")
	s.pod, s.cfg = p, cfg
	s.copies = copies.NewWatcher(s.context, p.Containers, p.Done(),
		time.Duration(cfg.Guest.CopiedMountRefreshInterval), cfg.Guest.CopiedMountLimitBytes)
	go s.watchPod(p)
	go s.forwardOOM(p)
	return p, rfs, true, nil
}

// currentPod returns the running pod, if any.
func (s *service) currentPod() *pod.Pod {
	s.podMu.Lock()
	defer s.podMu.Unlock()
	return s.pod
}

// copyWatcher returns the running pod's copy watcher (nil without a pod).
func (s *service) copyWatcher() *copies.Watcher {
	s.podMu.Lock()
	defer s.podMu.Unlock()
	return s.copies
}

// stopPod stops the VM if there is one, then ends the hooks' network namespace holder
// (after the VM, whose network is torn down in that namespace).
func (s *service) stopPod(ctx context.Context) {
	s.podMu.Lock()
	p, w, ns := s.pod, s.copies, s.hookNS
	s.pod, s.copies, s.hookNS = nil, nil, nil
	s.podMu.Unlock()
	if w != nil {
		w.Close()
	}
	if p != nil {
		if err := p.Stop(ctx); err != nil {
			log.G(ctx).WithError(err).Warn("stopping pod VM")
		}
	}
	if ns != nil {
		if err := ns.Close(); err != nil {
			log.G(ctx).WithError(err).Warn("ending the network namespace holder")
		}
	}
}

// watchPod ends every process of the pod when its VM ends under it.
func (s *service) watchPod(p *pod.Pod) {
	<-p.Done()
	if s.currentPod() != p {
		return // stopped on purpose
	}
	code := uint32(vmExitCode)
	if p.Killed() {
		code = killedExitCode
		log.G(s.context).Info("the pod's VM was killed; every container in it exits")
	} else {
		log.G(s.context).WithError(p.Err()).Error("the pod's VM ended; every container in it exits")
	}
	s.mu.Lock()
	var procs []*process
	for _, c := range s.containers {
		procs = append(procs, c.all()...)
	}
	s.mu.Unlock()
	// At once: each exit waits (bounded) for its output to drain.
	at := time.Now()
	var wg sync.WaitGroup
	for _, pr := range procs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			s.exited(pr, code, at)
		}()
	}
	wg.Wait()
}

// exited records a process's exit and publishes it, once. The event is queued before
// the exit's waiters wake, so that a Delete they make next publishes its TaskDelete
// after the TaskExit, as containerd orders them.
func (s *service) exited(p *process, code uint32, at time.Time) {
	p.exit(s.context, code, at, func() {
		_, pid, _, _ := p.state()
		s.send(&eventstypes.TaskExit{
			ContainerID: p.containerID,
			ID:          idOr(p.execID, p.containerID),
			Pid:         pid,
			ExitStatus:  code,
			ExitedAt:    protobuf.ToTimestamp(at),
		})
	})
}

// watchExit waits for a started process's exit in the guest.
func (s *service) watchExit(pd *pod.Pod, p *process) {
	resp, err := pd.Containers.Wait(s.context, &agent.WaitRequest{ContainerId: p.containerID, ExecId: p.execID})
	if err != nil {
		if pd.Killed() {
			return // the shim killed the VM: watchPod reports it
		}
		select {
		case <-pd.Done():
			// watchPod reports it.
		default:
			log.G(s.context).WithError(err).WithField("container", p.containerID).WithField("exec", p.execID).
				Error("lost the agent while waiting for a process; reporting it as exited")
			s.exited(p, vmExitCode, time.Now())
		}
		return
	}
	s.exited(p, resp.GetExit().GetExitStatus(), resp.GetExit().GetExitedAt().AsTime())
}

// forwardOOM publishes the guest's OOM events as containerd's TaskOOM, through oomFilter:
// the guest may be compromised, and what it says about containers is not to be trusted.
func (s *service) forwardOOM(p *pod.Pod) {
	stream, err := p.Containers.Events(s.context, &agent.EventsRequest{})
	if err != nil {
		log.G(s.context).WithError(err).Warn("cannot watch the guest's OOM events")
		return
	}
	f := newOOMFilter(s.owns)
	for {
		e, err := stream.Recv()
		if err != nil {
			return
		}
		if e.GetOom() != nil && f.allow(s.context, e.GetContainerId()) {
			s.send(&eventstypes.TaskOOM{ContainerID: e.GetContainerId()})
		}
	}
}

// owns reports whether id is a container this shim created (in its pod) and has not
// deleted.
func (s *service) owns(id string) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	_, ok := s.containers[id]
	return ok
}

const (
	// oomEventRate and oomEventBurst bound the TaskOOM events one container may cause:
	// a real OOM kill is an event of the guest kernel, a few per second at most, and a
	// guest that makes up more would flood containerd's event bus (and whoever watches it).
	oomEventRate  = rate.Limit(5)
	oomEventBurst = 10
	// oomWarnInterval spaces the warnings about dropped events.
	oomWarnInterval = time.Minute
)

// oomFilter passes the guest's OOM events that may be published: only for containers
// this shim created in this pod (a compromised guest could otherwise report OOM kills
// of any container on the host, of any pod or namespace, to containerd and the kubelet),
// and at most oomEventRate per container. Others are dropped, with a warning at most
// every oomWarnInterval that counts them.
type oomFilter struct {
	owns    func(id string) bool
	limits  map[string]*rate.Limiter
	dropped int
	warn    rate.Sometimes
}

func newOOMFilter(owns func(string) bool) *oomFilter {
	return &oomFilter{owns: owns, limits: map[string]*rate.Limiter{}, warn: rate.Sometimes{Interval: oomWarnInterval}}
}

// allow reports whether an OOM event of container id is to be published.
func (f *oomFilter) allow(ctx context.Context, id string) bool {
	var why string
	switch {
	case !f.owns(id):
		// Also forgets a deleted container's limiter: ids are not reused while it lives.
		delete(f.limits, id)
		why = "for a container that is not this pod's"
	default:
		l, ok := f.limits[id]
		if !ok {
			l = rate.NewLimiter(oomEventRate, oomEventBurst)
			f.limits[id] = l
		}
		if l.Allow() {
			return true
		}
		why = "beyond the rate a container can cause"
	}
	f.dropped++
	f.warn.Do(func() {
		log.G(ctx).WithField("container", id).WithField("dropped", f.dropped).
			Warnf("dropping OOM events the guest sent %s (the guest may be compromised)", why)
		f.dropped = 0
	})
	return false
}

func (s *service) send(e any) {
	select {
	case s.events <- e:
	case <-s.shutdown.Done():
	}
}

func (s *service) forward(ctx context.Context) {
	ctx = context.WithoutCancel(ctx)
	defer s.publisher.Close()
	publish := func(e any) {
		if err := s.publisher.Publish(ctx, runtime.GetTopic(e), e); err != nil {
			log.G(ctx).WithError(err).Error("post event")
		}
	}
	for {
		select {
		case e := <-s.events:
			publish(e)
		case <-s.shutdown.Done():
			for {
				select {
				case e := <-s.events:
					publish(e)
				default:
					return
				}
			}
		}
	}
}

func idOr(execID, id string) string {
	if execID != "" {
		return execID
	}
	return id
}

// agentErr converts an agent error for containerd: errdefs classes survive both hops.
func agentErr(what string, err error) error {
	return errgrpc.ToGRPC(fmt.Errorf("%s: %w", what, errgrpc.ToNative(err)))
}

// closeInheritedOnExec marks the descriptors the shim inherited (its listening
// socket among them) close-on-exec, so that QEMU does not hold them: a VM that
// kept a dead shim's socket open would make it look alive.
func closeInheritedOnExec(ctx context.Context) {
	entries, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		log.G(ctx).WithError(err).Warn("cannot list inherited descriptors")
		return
	}
	for _, e := range entries {
		if fd, err := strconv.Atoi(e.Name()); err == nil && fd > 2 {
			unix.CloseOnExec(fd)
		}
	}
}
