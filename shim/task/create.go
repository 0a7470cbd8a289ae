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
	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/errdefs"
	"github.com/containerd/errdefs/pkg/errgrpc"
	"github.com/containerd/log"
	"github.com/opencontainers/runtime-spec/specs-go"
	"google.golang.org/protobuf/proto"

	agent "github.com/caisson-containers/caisson/api/agent/v1"
	"github.com/caisson-containers/caisson/internal/rootfs"
	"github.com/caisson-containers/caisson/shim/hooks"
	"github.com/caisson-containers/caisson/shim/pod"
	"github.com/caisson-containers/caisson/shim/podid"
	"github.com/caisson-containers/caisson/shim/stdio"
	"github.com/caisson-containers/caisson/shim/vmm"
)

// maxCreateRequest bounds a CreateContainerRequest, whose copied mounts can be
// large, below ttrpc's 4 MiB message limit (with room for the rootfs).
const maxCreateRequest = 4<<20 - 256<<10

// Create creates a container in the pod's VM, starting the VM for the pod's first
// container (newContainer). On error nothing it created remains (and a VM started for
// it is stopped).
func (s *service) Create(ctx context.Context, r *taskAPI.CreateTaskRequest) (*taskAPI.CreateTaskResponse, error) {
	ctx = log.WithLogger(ctx, log.G(ctx).WithField("container", r.ID))
	cr, err := s.validateCreate(r)
	if err != nil {
		return nil, errgrpc.ToGRPC(err)
	}
	c, err := s.newContainer(ctx, cr)
	if err != nil {
		return nil, errgrpc.ToGRPC(err)
	}
	s.mu.Lock()
	s.containers[r.ID] = c
	s.mu.Unlock()

	pid := c.init.pid
	s.send(&eventstypes.TaskCreate{
		ContainerID: r.ID, Bundle: r.Bundle, Rootfs: r.Rootfs, Checkpoint: r.Checkpoint, Pid: pid,
		IO: &eventstypes.TaskIO{Stdin: r.Stdin, Stdout: r.Stdout, Stderr: r.Stderr, Terminal: r.Terminal},
	})
	return &taskAPI.CreateTaskResponse{Pid: pid}, nil
}

// createRequest is a CreateTaskRequest Create checked: what newContainer makes a
// container of.
type createRequest struct {
	id, bundle string
	spec       *specs.Spec
	rootfs     *rootfs.Plan
	configPath string // the runtime options' ConfigPath; "" for the default configuration
	stdio      stdio.Config
}

// validateCreate checks r and reads what it names: the bundle's spec, the rootfs mounts
// and the runtime options.
func (s *service) validateCreate(r *taskAPI.CreateTaskRequest) (createRequest, error) {
	if r.Checkpoint != "" {
		return createRequest{}, fmt.Errorf("caisson cannot restore checkpoints: %w", errdefs.ErrNotImplemented)
	}
	if _, err := s.container(r.ID); err == nil {
		return createRequest{}, fmt.Errorf("container %s: %w", r.ID, errdefs.ErrAlreadyExists)
	}
	cr := createRequest{
		id: r.ID, bundle: r.Bundle,
		stdio: stdio.Config{Stdin: r.Stdin, Stdout: r.Stdout, Stderr: r.Stderr, Terminal: r.Terminal},
	}
	var err error
	if cr.spec, err = readSpec(r.Bundle); err != nil {
		return createRequest{}, err
	}
	mounts := make([]mount.Mount, len(r.Rootfs))
	for i, m := range r.Rootfs {
		mounts[i] = mount.Mount{Type: m.Type, Source: m.Source, Target: m.Target, Options: m.Options}
	}
	if cr.rootfs, err = rootfs.Parse(mounts); err != nil {
		return createRequest{}, fmt.Errorf("rootfs of container %s: %w", r.ID, err)
	}
	if writesUnread(cr.spec, cr.rootfs) {
		cr.rootfs = cr.rootfs.WithTmpfsUpper()
	}
	if r.Options != nil {
		if cr.configPath, err = runtimeOptions(r.Options); err != nil {
			return createRequest{}, err
		}
	}
	return cr, nil
}

// newContainer creates container r.id in the pod's VM, as containerd's runc shim's
// NewContainer does on the host: it translates the spec for the guest (translate), runs
// the creation's hooks, starts the pod with the container's rootfs or attaches the
// rootfs to the running pod, shares or copies its host paths, attaches its devices and
// has the agent create it. Each step that succeeds adds its undoing, which a later
// failure runs, last first: on error nothing of the container remains, nor the pod if
// it was to be its first container.
func (s *service) newContainer(ctx context.Context, r createRequest) (_ *container, retErr error) {
	pc, base, err := s.podConfig(ctx, r)
	if err != nil {
		return nil, err
	}
	g, err := translate(r.id, r.spec, pc.Config)
	if err != nil {
		return nil, err
	}
	g.pod.BaseSize = base
	req, err := createContainerRequest(r, g)
	if err != nil {
		return nil, err
	}
	var undo rollback
	defer func() {
		if retErr != nil {
			undo.run(context.WithoutCancel(ctx))
		}
	}()
	ch := newContainerHooks(r.id, r.bundle, r.spec)
	undo.add(s.undoHooksAndPod(ch, hooks.Any(r.spec.Hooks)))
	if hooks.Any(r.spec.Hooks) {
		if g.pod.NetNS, err = s.createHooks(ctx, ch, g.pod.NetNS); err != nil {
			return nil, fmt.Errorf("container %s: %w", r.id, err)
		}
	}
	pd, rfs, err := s.podWithRootfs(ctx, r, pc, g.pod)
	if err != nil {
		return nil, err
	}
	undo.add(func(ctx context.Context) { rfs.Release(ctx) })
	if r.spec.Linux != nil {
		s.limits.set(r.id, limitsOf(r.spec.Linux.Resources))
	}
	req.Rootfs = rfs.Agent
	releaseMounts, err := s.attachMounts(ctx, &undo, pd, r.id, g, req)
	if err != nil {
		return nil, err
	}
	if err := s.createInGuest(ctx, &undo, pd, req); err != nil {
		return nil, err
	}
	p := newProcess(r.id, "", r.stdio)
	p.pid = taskPid(pd) // never the agent's: see taskPid
	if p.io, err = stdio.Attach(ctx, pd.Session(), r.id, "", r.stdio); err != nil {
		return nil, fmt.Errorf("attach stdio: %w", err)
	}
	release := func(ctx context.Context) error { return errors.Join(rfs.Release(ctx), releaseMounts(ctx)) }
	return &container{id: r.id, bundle: r.bundle, init: p, releaseRootfs: release, hooks: ch, execs: map[string]*process{}}, nil
}

// createContainerRequest is the agent's request for the container g, checked against
// the size a request into the VM can carry; its rootfs is added once attached.
func createContainerRequest(r createRequest, g *guestContainer) (*agent.CreateContainerRequest, error) {
	spec, err := json.Marshal(g.spec)
	if err != nil {
		return nil, err
	}
	req := &agent.CreateContainerRequest{
		ContainerId: r.id, Spec: spec, Stdio: r.stdio.Agent(),
		CopiedMounts: g.binds.copied, GuestDevices: g.devices.guestDevices,
	}
	if n := proto.Size(req); n > maxCreateRequest {
		return nil, fmt.Errorf("container %s: its copied bind mounts and spec take %d bytes, over the %d a request into the VM can carry: %w",
			r.id, n, maxCreateRequest, errdefs.ErrInvalidArgument)
	}
	return req, nil
}

// undoHooksAndPod is the undoing of a create once hooks may have run: the poststop hooks
// undo what the others set up (runc does the same), then the pod goes if this was to be
// its only container. It runs after the later steps' own undoing.
func (s *service) undoHooksAndPod(ch *containerHooks, withHooks bool) func(context.Context) {
	return func(ctx context.Context) {
		if withHooks {
			ch.poststop(ctx, s.hookPid())
		}
		if s.containerCount() == 0 {
			s.stopPod(ctx)
		}
	}
}

// podWithRootfs returns the pod the container runs in and its rootfs attached to it:
// for the pod's first container, the pod started with it (its rootfs on the boot
// disks); for a later one, the running pod, the rootfs hot-plugged.
func (s *service) podWithRootfs(ctx context.Context, r createRequest, pc podid.Pod, o pod.Options) (*pod.Pod, pod.Rootfs, error) {
	o.ID, o.StateDir, o.Rootfs = pc.ID, pc.StateDir, r.rootfs
	pd, rfs, started, err := s.ensurePod(ctx, o, pc.Config)
	if err != nil || started {
		return pd, rfs, err
	}
	rfs, err = pd.AttachRootfs(ctx, r.rootfs)
	return pd, rfs, err
}

// attachMounts shares the container's shared host paths (volumes) with the pod and
// points req's spec at them, attaches its block devices and has the pod's copy watcher
// watch its copied host paths, adding each one's undoing to undo. It returns what
// releases the shares and devices once the container is deleted.
func (s *service) attachMounts(ctx context.Context, undo *rollback, pd *pod.Pod, id string, g *guestContainer, req *agent.CreateContainerRequest) (func(context.Context) error, error) {
	var err error
	if len(g.binds.shared) > 0 {
		// Shared host paths (volumes) go through the pod's shared directory; the spec
		// names their guest paths.
		if err := shareBinds(pd, id, g.spec, g.binds.shared); err != nil {
			return nil, fmt.Errorf("container %s: %w", id, err)
		}
		undo.add(func(context.Context) { pd.Unshare(id) })
		if req.Spec, err = json.Marshal(g.spec); err != nil {
			return nil, err
		}
	}
	releaseDevices := func(context.Context) error { return nil }
	if len(g.devices.blocks) > 0 {
		if req.BlockDevices, releaseDevices, err = pd.AttachBlockDevices(ctx, id, g.devices.blocks); err != nil {
			return nil, fmt.Errorf("container %s: %w", id, err)
		}
		undo.add(func(ctx context.Context) { releaseDevices(ctx) })
	}
	w := s.copyWatcher()
	w.Add(id, g.binds.sources)
	undo.add(func(context.Context) { w.Remove(id) })
	return func(ctx context.Context) error { return errors.Join(pd.Unshare(id), releaseDevices(ctx)) }, nil
}

// createInGuest has the agent create the container, adding its deletion to undo.
func (s *service) createInGuest(ctx context.Context, undo *rollback, pd *pod.Pod, req *agent.CreateContainerRequest) error {
	created := time.Now()
	if _, err := pd.Containers.Create(ctx, req); err != nil {
		return fmt.Errorf("create container in the guest: %w", errgrpc.ToNative(err))
	}
	log.G(ctx).WithField("took", time.Since(created)).Debug("container created in the guest")
	id := req.ContainerId
	undo.add(func(ctx context.Context) {
		pd.Containers.Signal(ctx, &agent.SignalRequest{ContainerId: id, Signal: 9, All: true})
		pd.Containers.Delete(ctx, &agent.DeleteContainerRequest{ContainerId: id})
	})
	return nil
}

// rollback is the undoing of the steps of a create that succeeded, run last first when
// a later step fails.
type rollback []func(context.Context)

func (u *rollback) add(f func(context.Context)) { *u = append(*u, f) }

func (u rollback) run(ctx context.Context) {
	for i := len(u) - 1; i >= 0; i-- {
		u[i](ctx)
	}
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

// podConfig is the pod the container starts (podid.Of) and its runtime configuration:
// the file the runtime options name (or the default), with the allowed annotation
// overrides, and the VM sized for the pod's resources when the CRI states them. A
// container that joins the running pod gets the pod's configuration. base is the VM's
// size before the pod's annotations and resources (basePodSize).
func (s *service) podConfig(ctx context.Context, r createRequest) (_ podid.Pod, base vmm.Size, _ error) {
	if p := s.currentPod(); p != nil {
		return podid.Pod{Config: s.cfg}, p.Base(), nil
	}
	ns, _ := namespaces.Namespace(ctx)
	pc, err := podid.Of(ns, r.id, r.spec.Annotations, r.configPath)
	if err != nil {
		return podid.Pod{}, vmm.Size{}, err
	}
	log.G(ctx).WithField("config", pc.ConfigFile).Debug("runtime configuration")
	base = basePodSize(pc.Config)
	cfg, err := pc.Config.WithAnnotations(r.spec.Annotations)
	if err != nil {
		return podid.Pod{}, vmm.Size{}, err
	}
	// The CRI's pod resources grow the VM beyond what the guest itself needs, up to the
	// host's hypervisor.max_memory_mib and max_vcpus.
	if v, err := strconv.ParseInt(r.spec.Annotations[annotationSandboxMemory], 10, 64); err == nil && v > 0 {
		src := annotationSandboxMemory + "=" + r.spec.Annotations[annotationSandboxMemory]
		if cfg, err = cfg.WithPodResources(src, int((v+(1<<20-1))>>20), 0); err != nil {
			return podid.Pod{}, vmm.Size{}, err
		}
	}
	quota, qerr := strconv.ParseInt(r.spec.Annotations[annotationSandboxQuota], 10, 64)
	period, perr := strconv.ParseInt(r.spec.Annotations[annotationSandboxPeriod], 10, 64)
	if qerr == nil && perr == nil && quota > 0 && period > 0 {
		src := fmt.Sprintf("%s=%d/%s=%d", annotationSandboxQuota, quota, annotationSandboxPeriod, period)
		if cfg, err = cfg.WithPodResources(src, 0, int((quota+period-1)/period)); err != nil {
			return podid.Pod{}, vmm.Size{}, err
		}
	}
	pc.Config = cfg
	return pc, base, cfg.Validate()
}

func (s *service) containerCount() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.containers)
}
