package task

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"time"

	eventstypes "github.com/containerd/containerd/api/events"
	taskAPI "github.com/containerd/containerd/api/runtime/task/v3"
	"github.com/containerd/containerd/api/types/task"
	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/pkg/protobuf"
	ptypes "github.com/containerd/containerd/v2/pkg/protobuf/types"
	"github.com/containerd/errdefs"
	"github.com/containerd/errdefs/pkg/errgrpc"
	"github.com/containerd/log"
	"github.com/opencontainers/runtime-spec/specs-go"
	"google.golang.org/protobuf/proto"

	agent "github.com/caisson-containers/caisson/api/agent/v1"
	"github.com/caisson-containers/caisson/internal/rootfs"
	"github.com/caisson-containers/caisson/shim/config"
	"github.com/caisson-containers/caisson/shim/hooks"
	"github.com/caisson-containers/caisson/shim/pod"
	"github.com/caisson-containers/caisson/shim/stdio"
)

var empty = &ptypes.Empty{}

// maxCreateRequest bounds a CreateContainerRequest, whose copied mounts can be
// large, below ttrpc's 4 MiB message limit (with room for the rootfs).
const maxCreateRequest = 4<<20 - 256<<10

// Create creates a container in the pod's VM, starting the VM for the pod's
// first container. On error nothing it created remains (and a VM started for
// it is stopped).
func (s *service) Create(ctx context.Context, r *taskAPI.CreateTaskRequest) (_ *taskAPI.CreateTaskResponse, retErr error) {
	ctx = log.WithLogger(ctx, log.G(ctx).WithField("container", r.ID))
	if r.Checkpoint != "" {
		return nil, errgrpc.ToGRPCf(errdefs.ErrNotImplemented, "caisson cannot restore checkpoints")
	}
	s.mu.Lock()
	if _, ok := s.containers[r.ID]; ok {
		s.mu.Unlock()
		return nil, errgrpc.ToGRPCf(errdefs.ErrAlreadyExists, "container %s", r.ID)
	}
	s.mu.Unlock()

	spec, err := readSpec(r.Bundle)
	if err != nil {
		return nil, errgrpc.ToGRPC(err)
	}
	netns, err := podNetNS(spec)
	if err != nil {
		return nil, errgrpc.ToGRPC(fmt.Errorf("container %s: %w", r.ID, err))
	}
	if err := hooks.Validate(spec.Hooks); err != nil {
		return nil, errgrpc.ToGRPC(fmt.Errorf("container %s: %w", r.ID, err))
	}
	mounts := make([]mount.Mount, len(r.Rootfs))
	for i, m := range r.Rootfs {
		mounts[i] = mount.Mount{Type: m.Type, Source: m.Source, Target: m.Target, Options: m.Options}
	}
	plan, err := rootfs.Parse(mounts)
	if err != nil {
		return nil, errgrpc.ToGRPC(fmt.Errorf("rootfs of container %s: %w", r.ID, err))
	}

	cfg, err := s.podConfig(ctx, r, spec)
	if err != nil {
		return nil, errgrpc.ToGRPC(err)
	}
	gspec, binds, err := guestSpec(spec, cfg.Guest.CopiedMountLimitBytes, pod.SharesHostPaths(cfg))
	if err != nil {
		return nil, errgrpc.ToGRPC(fmt.Errorf("container %s: %w", r.ID, err))
	}
	devs, err := hostDevices.guestDevices(gspec)
	if err != nil {
		return nil, errgrpc.ToGRPC(fmt.Errorf("container %s: %w", r.ID, err))
	}
	guest, err := json.Marshal(gspec)
	if err != nil {
		return nil, errgrpc.ToGRPC(err)
	}
	sio := stdio.Config{Stdin: r.Stdin, Stdout: r.Stdout, Stderr: r.Stderr, Terminal: r.Terminal}
	req := &agent.CreateContainerRequest{ContainerId: r.ID, Spec: guest, Stdio: sio.Agent(), CopiedMounts: binds.copied, GuestDevices: devs.guestDevices}
	if n := proto.Size(req); n > maxCreateRequest {
		return nil, errgrpc.ToGRPCf(errdefs.ErrInvalidArgument,
			"container %s: its copied bind mounts and spec take %d bytes, over the %d a request into the VM can carry", r.ID, n, maxCreateRequest)
	}
	dns, hosts, err := podNameResolution(spec)
	if err != nil {
		return nil, errgrpc.ToGRPC(err)
	}

	// On error, once hooks may have run: the poststop hooks undo what the others set up
	// (runc does the same), then the pod goes if this was to be its only container. This
	// runs after the later steps' own undoing.
	ch := newContainerHooks(r.ID, r.Bundle, spec)
	withHooks := hooks.Any(spec.Hooks)
	defer func() {
		if retErr == nil {
			return
		}
		ctx := context.WithoutCancel(ctx)
		if withHooks {
			ch.poststop(ctx, s.hookPid())
		}
		if s.containerCount() == 0 {
			s.stopPod(ctx)
		}
	}()
	if withHooks {
		if netns, err = s.createHooks(ctx, ch, netns); err != nil {
			return nil, errgrpc.ToGRPC(fmt.Errorf("container %s: %w", r.ID, err))
		}
	}
	pd, rfs, err := s.ensurePod(ctx, r.ID, pod.Options{
		ID: podID(r.ID, spec), Hostname: hostname(r.ID, spec), NetNS: netns, DNS: dns, Hosts: hosts,
		Cgroup: podCgroup(spec), Rootfs: plan,
	}, cfg)
	if err != nil {
		return nil, errgrpc.ToGRPC(err)
	}
	if rfs.Agent == nil { // a later container: the pod was running
		if rfs, err = pd.AttachRootfs(ctx, plan); err != nil {
			return nil, errgrpc.ToGRPC(err)
		}
	}
	release := rfs.Release
	defer func() {
		if retErr != nil {
			release(context.WithoutCancel(ctx))
		}
	}()

	req.Rootfs = rfs.Agent
	if len(binds.shared) > 0 {
		// Shared host paths (volumes) go through the pod's shared directory; the spec
		// names their guest paths.
		if err := shareBinds(pd, r.ID, gspec, binds.shared); err != nil {
			return nil, errgrpc.ToGRPC(fmt.Errorf("container %s: %w", r.ID, err))
		}
		defer func() {
			if retErr != nil {
				pd.Unshare(r.ID)
			}
		}()
		if req.Spec, err = json.Marshal(gspec); err != nil {
			return nil, errgrpc.ToGRPC(err)
		}
	}
	releaseDevices := func(context.Context) error { return nil }
	if len(devs.blocks) > 0 {
		if req.BlockDevices, releaseDevices, err = pd.AttachBlockDevices(ctx, r.ID, devs.blocks); err != nil {
			return nil, errgrpc.ToGRPC(fmt.Errorf("container %s: %w", r.ID, err))
		}
		defer func() {
			if retErr != nil {
				releaseDevices(context.WithoutCancel(ctx))
			}
		}()
	}
	releaseAll := func(ctx context.Context) error {
		return errors.Join(release(ctx), pd.Unshare(r.ID), releaseDevices(ctx))
	}
	w := s.copyWatcher()
	w.Add(r.ID, binds.sources)
	defer func() {
		if retErr != nil {
			w.Remove(r.ID)
		}
	}()
	created := time.Now()
	_, err = pd.Containers.Create(ctx, req)
	if err != nil {
		return nil, agentErr("create container in the guest", err)
	}
	log.G(ctx).WithField("took", time.Since(created)).Debug("container created in the guest")
	defer func() {
		if retErr != nil {
			pd.Containers.Signal(context.WithoutCancel(ctx), &agent.SignalRequest{ContainerId: r.ID, Signal: 9, All: true})
			pd.Containers.Delete(context.WithoutCancel(ctx), &agent.DeleteContainerRequest{ContainerId: r.ID})
		}
	}()
	p := newProcess(r.ID, "", sio)
	p.pid = taskPid(pd) // never resp's: see taskPid
	p.io, err = stdio.Attach(ctx, pd.Session(), r.ID, "", sio)
	if err != nil {
		return nil, errgrpc.ToGRPC(fmt.Errorf("attach stdio: %w", err))
	}

	c := &container{id: r.ID, bundle: r.Bundle, init: p, releaseRootfs: releaseAll, hooks: ch, execs: map[string]*process{}}
	s.mu.Lock()
	s.containers[r.ID] = c
	s.mu.Unlock()

	s.send(&eventstypes.TaskCreate{
		ContainerID: r.ID, Bundle: r.Bundle, Rootfs: r.Rootfs, Checkpoint: r.Checkpoint, Pid: p.pid,
		IO: &eventstypes.TaskIO{Stdin: r.Stdin, Stdout: r.Stdout, Stderr: r.Stderr, Terminal: r.Terminal},
	})
	return &taskAPI.CreateTaskResponse{Pid: p.pid}, nil
}

// createHooks runs the container's prestart, createRuntime and createContainer hooks
// (hooks.go) and returns the network namespace the pod's NICs are to come from: for the
// pod's first container whose spec asks for a new one (specNetNS ""), the one the hooks
// filled; else specNetNS. A container that joins a running VM fails if its hooks added
// interfaces the VM cannot take.
func (s *service) createHooks(ctx context.Context, ch *containerHooks, specNetNS string) (string, error) {
	ns, err := s.hookNetNS(specNetNS)
	if err != nil {
		return "", err
	}
	pd := s.currentPod()
	for _, k := range []hooks.Kind{hooks.Prestart, hooks.CreateRuntime, hooks.CreateContainer} {
		if err := ch.run(ctx, k, specs.StateCreating, ns.Pid()); err != nil {
			return "", err
		}
	}
	if pd != nil {
		return specNetNS, checkUnwired(pd, ns)
	}
	if specNetNS == "" {
		return ns.Path(), nil
	}
	return specNetNS, nil
}

// podConfig is the runtime configuration for the pod the container starts:
// the file's, with the allowed annotation overrides, and the VM sized for the
// pod's resources when the CRI states them.
func (s *service) podConfig(ctx context.Context, r *taskAPI.CreateTaskRequest, spec *specs.Spec) (config.Config, error) {
	if p := s.currentPod(); p != nil {
		return s.cfg, nil
	}
	var path string
	if r.Options != nil {
		if o, err := runtimeOptions(r.Options); err != nil {
			return config.Config{}, err
		} else {
			path = o
		}
	}
	cfg, file, err := config.Load(path)
	if err != nil {
		return config.Config{}, err
	}
	log.G(ctx).WithField("config", file).Debug("runtime configuration")
	cfg, err = cfg.WithAnnotations(spec.Annotations)
	if err != nil {
		return config.Config{}, err
	}
	// The CRI's pod resources grow the VM beyond what the guest itself needs, up to the
	// host's hypervisor.max_memory_mib and max_vcpus.
	if v, err := strconv.ParseInt(spec.Annotations[annotationSandboxMemory], 10, 64); err == nil && v > 0 {
		src := annotationSandboxMemory + "=" + spec.Annotations[annotationSandboxMemory]
		if cfg, err = cfg.WithPodResources(src, int((v+(1<<20-1))>>20), 0); err != nil {
			return config.Config{}, err
		}
	}
	quota, qerr := strconv.ParseInt(spec.Annotations[annotationSandboxQuota], 10, 64)
	period, perr := strconv.ParseInt(spec.Annotations[annotationSandboxPeriod], 10, 64)
	if qerr == nil && perr == nil && quota > 0 && period > 0 {
		src := fmt.Sprintf("%s=%d/%s=%d", annotationSandboxQuota, quota, annotationSandboxPeriod, period)
		var err error
		if cfg, err = cfg.WithPodResources(src, 0, int((quota+period-1)/period)); err != nil {
			return config.Config{}, err
		}
	}
	return cfg, cfg.Validate()
}

func (s *service) containerCount() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.containers)
}

// Start starts a created container's init process or an exec.
func (s *service) Start(ctx context.Context, r *taskAPI.StartRequest) (*taskAPI.StartResponse, error) {
	c, p, err := s.process(r.ID, r.ExecID)
	if err != nil {
		return nil, err
	}
	if st, _, _, _ := p.state(); st != task.Status_CREATED {
		return nil, errgrpc.ToGRPCf(errdefs.ErrFailedPrecondition, "process %s of %s is %s, not created", idOr(r.ExecID, r.ID), r.ID, st)
	}
	pd := s.currentPod()
	if pd == nil {
		return nil, errgrpc.ToGRPCf(errdefs.ErrUnavailable, "the pod's VM is not running")
	}
	if r.ExecID == "" {
		if err := c.hooks.run(ctx, hooks.StartContainer, specs.StateCreated, s.hookPid()); err != nil {
			return nil, errgrpc.ToGRPC(fmt.Errorf("container %s: %w", r.ID, err))
		}
		started := time.Now()
		if _, err := pd.Containers.Start(ctx, &agent.StartContainerRequest{ContainerId: r.ID}); err != nil {
			return nil, agentErr("start container", err)
		}
		log.G(ctx).WithField("container", r.ID).WithField("took", time.Since(started)).Debug("container started in the guest")
	} else {
		if _, err := pd.Exec.Start(ctx, &agent.StartExecRequest{ContainerId: r.ID, ExecId: r.ExecID}); err != nil {
			return nil, agentErr("start exec", err)
		}
	}
	pid := taskPid(pd) // never the agent's: see taskPid
	p.mu.Lock()
	p.pid = pid
	p.mu.Unlock()
	p.setStatus(task.Status_RUNNING)
	if r.ExecID == "" {
		// The agent keeps an exit until it is waited for, so watchExit, started after the
		// hooks, still sees one that happens while they run, and reports it after TaskStart.
		if err := c.hooks.run(ctx, hooks.Poststart, specs.StateRunning, s.hookPid()); err != nil {
			// As runc: a failed poststart hook fails the start and kills the container.
			pd.Containers.Signal(context.WithoutCancel(ctx), &agent.SignalRequest{ContainerId: r.ID, Signal: 9, All: true})
			go s.watchExit(pd, p)
			return nil, errgrpc.ToGRPC(fmt.Errorf("container %s: %w", r.ID, err))
		}
		s.send(&eventstypes.TaskStart{ContainerID: r.ID, Pid: pid})
	} else {
		s.send(&eventstypes.TaskExecStarted{ContainerID: r.ID, ExecID: r.ExecID, Pid: pid})
	}
	go s.watchExit(pd, p)
	return &taskAPI.StartResponse{Pid: pid}, nil
}

// Delete deletes an exited exec, or a stopped (or never started) container and its rootfs.
func (s *service) Delete(ctx context.Context, r *taskAPI.DeleteRequest) (*taskAPI.DeleteResponse, error) {
	c, p, err := s.process(r.ID, r.ExecID)
	if err != nil {
		return nil, err
	}
	st, pid, code, at := p.state()
	if st == task.Status_RUNNING || st == task.Status_PAUSED {
		return nil, errgrpc.ToGRPCf(errdefs.ErrFailedPrecondition, "process %s of %s is %s", idOr(r.ExecID, r.ID), r.ID, st)
	}
	pd := s.currentPod()
	var errs []error
	if r.ExecID != "" {
		if pd != nil {
			if _, err := pd.Exec.Delete(ctx, &agent.DeleteExecRequest{ContainerId: r.ID, ExecId: r.ExecID}); err != nil && !errdefs.IsNotFound(errgrpc.ToNative(err)) {
				errs = append(errs, agentErr("delete exec", err))
			}
		}
		p.closeIO()
		c.mu.Lock()
		delete(c.execs, r.ExecID)
		c.mu.Unlock()
	} else {
		if pd != nil {
			if st == task.Status_CREATED {
				// Never started: make sure nothing of it runs before deleting it.
				pd.Containers.Signal(ctx, &agent.SignalRequest{ContainerId: r.ID, Signal: 9, All: true})
			}
			if _, err := pd.Containers.Delete(ctx, &agent.DeleteContainerRequest{ContainerId: r.ID}); err != nil && !errdefs.IsNotFound(errgrpc.ToNative(err)) {
				errs = append(errs, agentErr("delete container in the guest", err))
			}
		}
		// After the container is gone from the guest, as runc runs them after its process
		// has exited; the pod's network namespace is still there for them.
		c.hooks.poststop(ctx, s.hookPid())
		s.copyWatcher().Remove(r.ID)
		for _, e := range c.all() {
			e.closeIO()
		}
		if pd != nil {
			if err := c.releaseRootfs(ctx); err != nil {
				errs = append(errs, fmt.Errorf("release rootfs: %w", err))
			}
		}
		s.mu.Lock()
		delete(s.containers, r.ID)
		s.mu.Unlock()
		s.send(&eventstypes.TaskDelete{ContainerID: r.ID, Pid: pid, ExitStatus: code, ExitedAt: protobuf.ToTimestamp(at)})
	}
	if err := errors.Join(errs...); err != nil {
		log.G(ctx).WithError(err).Warn("delete left something behind in the guest")
	}
	return &taskAPI.DeleteResponse{Pid: pid, ExitStatus: code, ExitedAt: protobuf.ToTimestamp(at)}, nil
}
