package service

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/emptypb"
	"google.golang.org/protobuf/types/known/timestamppb"

	agent "github.com/caisson-containers/caisson/api/agent/v1"
	"github.com/caisson-containers/caisson/guest/agent/container"
	"github.com/caisson-containers/caisson/guest/agent/storage"
)

type containersService struct{ a *Agent }

var _ agent.ContainersService = containersService{}

func rootfsOf(r *agent.Rootfs) storage.Rootfs {
	dir := func(p *agent.StoragePath) *storage.Dir {
		if p == nil || p.GetStorageId() == "" {
			return nil
		}
		return &storage.Dir{Storage: p.GetStorageId(), Path: p.GetPath()}
	}
	out := storage.Rootfs{Upper: dir(r.GetUpper()), Work: dir(r.GetWork()), TmpfsUpper: r.GetTmpfsUpper(), Options: r.GetOptions()}
	for _, l := range r.GetLower() {
		// A lower without a storage id is refused by MountRootfs, as an unknown storage.
		out.Lower = append(out.Lower, storage.Dir{Storage: l.GetStorageId(), Path: l.GetPath()})
	}
	return out
}

func (s containersService) Create(ctx context.Context, req *agent.CreateContainerRequest) (_ *agent.CreateContainerResponse, retErr error) {
	a := s.a
	id := req.GetContainerId()
	ctx = log.WithLogger(ctx, log.G(ctx).WithField("id", id))
	start := time.Now()
	if err := a.devicesReady(ctx); err != nil { // overlayfs
		return nil, err
	}
	if err := a.runtime.Reserve(id); err != nil {
		return nil, err
	}
	defer func() {
		if retErr != nil {
			a.runtime.Unreserve(id)
		}
	}()
	var spec specs.Spec
	if err := json.Unmarshal(req.GetSpec(), &spec); err != nil {
		return nil, fmt.Errorf("container %s: spec: %v: %w", id, err, errdefs.ErrInvalidArgument)
	}
	if spec.Process == nil {
		return nil, fmt.Errorf("container %s: spec has no process: %w", id, errdefs.ErrInvalidArgument)
	}
	defer func() {
		if retErr != nil {
			a.copies.Release(ctx, id)
		}
	}()
	for _, cm := range req.GetCopiedMounts() {
		i := int(cm.GetMountIndex())
		if i >= len(spec.Mounts) {
			return nil, fmt.Errorf("container %s: copied mount %d: the spec has %d mounts: %w", id, i, len(spec.Mounts), errdefs.ErrInvalidArgument)
		}
		src, err := a.copies.Acquire(id, cm.GetKey(), filesOf(cm.GetFiles()))
		if err != nil {
			return nil, fmt.Errorf("container %s: mount at %s: %w", id, spec.Mounts[i].Destination, err)
		}
		spec.Mounts[i].Source = src
	}
	if err := a.sandbox.AdjustSpec(&spec); err != nil {
		return nil, fmt.Errorf("container %s: %w", id, err)
	}
	if err := a.containerDevices(ctx, &spec, req); err != nil {
		return nil, fmt.Errorf("container %s: %w", id, err)
	}
	if req.GetRootfs() == nil {
		return nil, fmt.Errorf("container %s has no rootfs: %w", id, errdefs.ErrInvalidArgument)
	}
	mr, err := a.storages.MountRootfs(ctx, a.rootfsDir(id), rootfsOf(req.GetRootfs()))
	if err != nil {
		return nil, fmt.Errorf("container %s: rootfs: %w", id, err)
	}
	log.G(ctx).WithField("took", time.Since(start)).Debug("rootfs assembled")
	defer func() {
		if retErr != nil {
			if err := a.storages.UnmountRootfs(ctx, mr); err != nil {
				log.G(ctx).WithError(err).Warn("unmount the rootfs of a container that failed")
			}
			os.RemoveAll(filepath.Dir(mr.Target))
		}
	}()
	c, err := a.runtime.Create(ctx, container.CreateOpts{ID: id, Spec: &spec, Rootfs: mr.Target, Stdio: stdioOf(req.GetStdio())})
	if err != nil {
		return nil, err
	}
	a.mu.Lock()
	a.rootfs[id] = mr
	a.mu.Unlock()
	pid := c.Init().Pid()
	a.sandbox.ContainerCreated(pid)
	if oom, err := c.OOM(); err != nil {
		log.G(ctx).WithError(err).Warn("no OOM notifications for the container")
	} else {
		go a.events.forwardOOM(id, oom)
	}
	log.G(ctx).WithField("pid", pid).WithField("took", time.Since(start)).Info("container created")
	return &agent.CreateContainerResponse{Pid: uint32(pid)}, nil
}

func (s containersService) Start(ctx context.Context, req *agent.StartContainerRequest) (*agent.StartContainerResponse, error) {
	c, err := s.a.runtime.Get(req.GetContainerId())
	if err != nil {
		return nil, err
	}
	if err := c.Start(ctx); err != nil {
		return nil, err
	}
	return &agent.StartContainerResponse{Pid: uint32(c.Init().Pid())}, nil
}

func (s containersService) Signal(ctx context.Context, req *agent.SignalRequest) (*emptypb.Empty, error) {
	c, p, err := s.a.process(req.GetContainerId(), req.GetExecId())
	if err != nil {
		return nil, err
	}
	sig := unix.Signal(req.GetSignal())
	switch {
	case req.GetAll() && req.GetExecId() == "":
		err = c.Kill(ctx, sig, true)
	case req.GetExecId() != "" && sig == unix.SIGKILL:
		err = killTree(p)
	default:
		err = p.Signal(sig)
	}
	if err != nil {
		return nil, err
	}
	return &emptypb.Empty{}, nil
}

func exitStatus(e container.Exit) *agent.ExitStatus {
	return &agent.ExitStatus{Pid: uint32(e.Pid), ExitStatus: uint32(e.Status), ExitedAt: timestamppb.New(e.At)}
}

func (s containersService) Wait(ctx context.Context, req *agent.WaitRequest) (*agent.WaitResponse, error) {
	_, p, err := s.a.process(req.GetContainerId(), req.GetExecId())
	if err != nil {
		return nil, err
	}
	e, err := p.Wait(ctx)
	if err != nil {
		return nil, err
	}
	return &agent.WaitResponse{Exit: exitStatus(e)}, nil
}

func (a *Agent) deleteContainer(ctx context.Context, id string, force bool) error {
	_, err := a.deleteContainerExit(ctx, id, force)
	return err
}

func (a *Agent) deleteContainerExit(ctx context.Context, id string, force bool) (container.Exit, error) {
	c, err := a.runtime.Get(id)
	if err != nil {
		return container.Exit{}, err
	}
	pid := c.Init().Pid()
	e, err := a.runtime.Delete(ctx, id, force)
	if err != nil {
		return container.Exit{}, err
	}
	a.sandbox.ContainerDeleted(pid)
	a.copies.Release(ctx, id)
	a.forgetStdio(id, "", true)
	a.mu.Lock()
	mr := a.rootfs[id]
	delete(a.rootfs, id)
	a.mu.Unlock()
	if mr != nil {
		if err := a.storages.UnmountRootfs(ctx, mr); err != nil {
			return e, err
		}
		os.RemoveAll(filepath.Dir(mr.Target))
	}
	return e, nil
}

func (s containersService) Delete(ctx context.Context, req *agent.DeleteContainerRequest) (*agent.DeleteContainerResponse, error) {
	e, err := s.a.deleteContainerExit(ctx, req.GetContainerId(), false)
	if err != nil {
		return nil, err
	}
	return &agent.DeleteContainerResponse{Exit: exitStatus(e)}, nil
}

func (s containersService) Update(ctx context.Context, req *agent.UpdateContainerRequest) (*emptypb.Empty, error) {
	c, err := s.a.runtime.Get(req.GetContainerId())
	if err != nil {
		return nil, err
	}
	var res specs.LinuxResources
	if err := json.Unmarshal(req.GetResources(), &res); err != nil {
		return nil, fmt.Errorf("resources: %v: %w", err, errdefs.ErrInvalidArgument)
	}
	if err := c.Update(ctx, &res); err != nil {
		return nil, err
	}
	return &emptypb.Empty{}, nil
}

func (s containersService) Stats(ctx context.Context, req *agent.StatsRequest) (*agent.StatsResponse, error) {
	m, err := s.metrics(req.GetContainerId())
	if err != nil {
		return nil, err
	}
	resp := &agent.StatsResponse{Metrics: m}
	for _, id := range req.GetAlso() {
		if _, done := resp.Also[id]; done || id == req.GetContainerId() {
			continue
		}
		m, err := s.metrics(id)
		if err != nil {
			continue // left out: the shim asks for it alone if it wants it
		}
		if resp.Also == nil {
			resp.Also = map[string]*anypb.Any{}
		}
		resp.Also[id] = m
	}
	return resp, nil
}

// metrics reads container id's metrics from its cgroup.
func (s containersService) metrics(id string) (*anypb.Any, error) {
	c, err := s.a.runtime.Get(id)
	if err != nil {
		return nil, err
	}
	metrics, err := c.Metrics()
	if err != nil {
		return nil, err
	}
	return anypb.New(metrics)
}

func (s containersService) Pids(ctx context.Context, req *agent.PidsRequest) (*agent.PidsResponse, error) {
	c, err := s.a.runtime.Get(req.GetContainerId())
	if err != nil {
		return nil, err
	}
	pids, err := c.Pids()
	if err != nil {
		return nil, err
	}
	resp := &agent.PidsResponse{}
	for pid, execID := range pids {
		resp.Processes = append(resp.Processes, &agent.ProcessInfo{Pid: uint32(pid), ExecId: execID})
	}
	return resp, nil
}

func (s containersService) Pause(ctx context.Context, req *agent.PauseRequest) (*emptypb.Empty, error) {
	c, err := s.a.runtime.Get(req.GetContainerId())
	if err != nil {
		return nil, err
	}
	if err := c.Pause(); err != nil {
		return nil, fmt.Errorf("pause container %s: %v: %w", c.ID(), err, errdefs.ErrFailedPrecondition)
	}
	return &emptypb.Empty{}, nil
}

func (s containersService) Resume(ctx context.Context, req *agent.ResumeRequest) (*emptypb.Empty, error) {
	c, err := s.a.runtime.Get(req.GetContainerId())
	if err != nil {
		return nil, err
	}
	if err := c.Resume(); err != nil {
		return nil, fmt.Errorf("resume container %s: %v: %w", c.ID(), err, errdefs.ErrFailedPrecondition)
	}
	return &emptypb.Empty{}, nil
}

func (s containersService) Events(ctx context.Context, req *agent.EventsRequest, ss agent.Containers_EventsServer) error {
	ch, cancel := s.a.events.subscribe()
	defer cancel()
	for {
		select {
		case <-ctx.Done():
			return nil
		case ev := <-ch:
			if err := ss.Send(ev); err != nil {
				return err
			}
		}
	}
}

// broker fans container events out to every Events stream.
type broker struct {
	mu   sync.Mutex
	subs map[chan *agent.Event]struct{}
}

func newBroker() *broker {
	return &broker{subs: map[chan *agent.Event]struct{}{}}
}

func (b *broker) subscribe() (<-chan *agent.Event, func()) {
	ch := make(chan *agent.Event, 64)
	b.mu.Lock()
	b.subs[ch] = struct{}{}
	b.mu.Unlock()
	return ch, func() {
		b.mu.Lock()
		delete(b.subs, ch)
		b.mu.Unlock()
	}
}

func (b *broker) publish(ev *agent.Event) {
	b.mu.Lock()
	defer b.mu.Unlock()
	for ch := range b.subs {
		select {
		case ch <- ev:
		default: // a stalled subscriber loses events rather than stalling the agent
		}
	}
}

func (b *broker) forwardOOM(id string, oom <-chan struct{}) {
	for range oom {
		b.publish(&agent.Event{ContainerId: id, Timestamp: timestamppb.New(time.Now()), Kind: &agent.Event_Oom{Oom: &agent.OOMEvent{}}})
	}
}
