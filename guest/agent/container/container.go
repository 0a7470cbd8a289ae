package container

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"sync"

	v2stats "github.com/containerd/cgroups/v3/cgroup2/stats"
	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"github.com/opencontainers/cgroups"
	"github.com/opencontainers/runc/libcontainer"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"
)

// Container is one container of the guest.
type Container struct {
	id      string
	runtime *Runtime
	lc      *libcontainer.Container
	spec    *specs.Spec
	init    *Process

	mu      sync.Mutex
	started bool
	execs   map[string]*Process
	metrics *metricsReader // the cgroup's files, open from the first Metrics on
}

// ID is the container's id.
func (c *Container) ID() string { return c.id }

// Init is the container's init process.
func (c *Container) Init() *Process { return c.init }

// Spec is the spec the container was created from.
func (c *Container) Spec() *specs.Spec { return c.spec }

// Status is libcontainer's view: "created", "running", "paused" or "stopped".
func (c *Container) Status() (string, error) {
	s, err := c.lc.Status()
	if err != nil {
		return "", err
	}
	return s.String(), nil
}

// Start runs the init process's program.
func (c *Container) Start(ctx context.Context) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.started {
		return fmt.Errorf("container %s already started: %w", c.id, errdefs.ErrFailedPrecondition)
	}
	if err := c.runtime.reaper.Guard(c.lc.Exec); err != nil {
		return fmt.Errorf("start container %s: %v: %w", c.id, err, errdefs.ErrFailedPrecondition)
	}
	c.started = true
	return nil
}

// CreateExec prepares another process in the container; StartExec runs it.
func (c *Container) CreateExec(ctx context.Context, execID string, spec *specs.Process, stdio Stdio) (_ *Process, retErr error) {
	if execID == "" {
		return nil, fmt.Errorf("exec id is empty: %w", errdefs.ErrInvalidArgument)
	}
	if spec == nil {
		return nil, fmt.Errorf("exec %s has no process spec: %w", execID, errdefs.ErrInvalidArgument)
	}
	if !c.running() {
		return nil, fmt.Errorf("container %s is not running: %w", c.id, errdefs.ErrFailedPrecondition)
	}
	lp, err := libcontainerProcess(spec, false)
	if err != nil {
		return nil, err
	}
	if err := checkExecutable(c.lc.Config().Rootfs, c.spec.Mounts, spec); err != nil {
		return nil, fmt.Errorf("exec %s in container %s: %w", execID, c.id, err)
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if _, ok := c.execs[execID]; ok {
		return nil, fmt.Errorf("exec %s in container %s: %w", execID, c.id, errdefs.ErrAlreadyExists)
	}
	p, err := newProcess(execID, lp, stdio, func() error { return c.lc.Run(lp) })
	if err != nil {
		return nil, err
	}
	c.execs[execID] = p
	return p, nil
}

// StartExec starts an exec CreateExec prepared.
func (c *Container) StartExec(ctx context.Context, execID string) (*Process, error) {
	p, err := c.Process(execID)
	if err != nil {
		return nil, err
	}
	if execID == "" {
		return nil, fmt.Errorf("exec id is empty: %w", errdefs.ErrInvalidArgument)
	}
	if !c.running() {
		return nil, fmt.Errorf("container %s is not running: %w", c.id, errdefs.ErrFailedPrecondition)
	}
	if err := p.run(c.runtime.reaper); err != nil {
		return nil, fmt.Errorf("exec %s in container %s: %w", execID, c.id, err)
	}
	return p, nil
}

// Exec creates and starts another process in the container.
func (c *Container) Exec(ctx context.Context, execID string, spec *specs.Process, stdio Stdio) (*Process, error) {
	if _, err := c.CreateExec(ctx, execID, spec, stdio); err != nil {
		return nil, err
	}
	return c.StartExec(ctx, execID)
}

// running reports whether the init process was started and has not exited.
func (c *Container) running() bool {
	select {
	case <-c.init.exited:
		return false
	default:
		return c.started
	}
}

// Process returns the exec execID, or the init process for "".
func (c *Container) Process(execID string) (*Process, error) {
	if execID == "" {
		return c.init, nil
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	p, ok := c.execs[execID]
	if !ok {
		return nil, fmt.Errorf("exec %s in container %s: %w", execID, c.id, errdefs.ErrNotFound)
	}
	return p, nil
}

// DeleteExec forgets an exec that has exited (or never started) and releases its streams.
func (c *Container) DeleteExec(execID string) (Exit, error) {
	if execID == "" {
		return Exit{}, fmt.Errorf("the init process is deleted with its container: %w", errdefs.ErrInvalidArgument)
	}
	p, err := c.Process(execID)
	if err != nil {
		return Exit{}, err
	}
	if p.Started() {
		select {
		case <-p.exited:
		default:
			return Exit{}, fmt.Errorf("exec %s is still running: %w", execID, errdefs.ErrFailedPrecondition)
		}
	}
	c.mu.Lock()
	delete(c.execs, execID)
	c.mu.Unlock()
	p.release()
	return p.exit, nil
}

// Kill sends sig to the init process, or with all to every process of the container.
func (c *Container) Kill(ctx context.Context, sig unix.Signal, all bool) error {
	if !all {
		return c.init.Signal(sig)
	}
	if sig == unix.SIGKILL {
		// libcontainer kills the whole cgroup when the PID namespace is shared; with a
		// private one, killing its init kills every process in it.
		if err := c.lc.Signal(sig); err != nil && !errors.Is(err, libcontainer.ErrNotRunning) {
			return fmt.Errorf("kill container %s: %w", c.id, err)
		}
		return nil
	}
	pids, err := c.lc.Processes()
	if err != nil {
		return fmt.Errorf("list processes of container %s: %w", c.id, err)
	}
	for _, pid := range pids {
		if err := unix.Kill(pid, sig); err != nil && !errors.Is(err, unix.ESRCH) {
			return fmt.Errorf("signal %d in container %s: %w", pid, c.id, err)
		}
	}
	return nil
}

// killAllOnInitExit kills what is left of a container that shares a PID namespace once
// its init exits, as containerd's runc shim does (runc.ShouldKillAllOnExit). With a
// PID namespace of its own, the kernel kills every process in it when its init dies;
// in a shared one (the CRI's pod PID namespace) a child the init left behind lives on,
// reparented to the namespace's init, and keeps the container's stdout and stderr
// open: they never reach EOF, so the exit is never reported and StopContainer waits.
func (c *Container) killAllOnInitExit(ctx context.Context) {
	<-c.init.exited
	pids, err := c.lc.Processes()
	if err != nil {
		return // the container was destroyed, and its cgroup with it
	}
	for _, pid := range pids {
		if err := unix.Kill(pid, unix.SIGKILL); err != nil && !errors.Is(err, unix.ESRCH) {
			log.G(ctx).WithError(err).WithFields(log.Fields{"id": c.id, "pid": pid}).Warn("kill a process the container's init left behind")
		}
	}
}

// Pids lists the pids of the container's processes (the agent's PID namespace), each
// with the exec id it belongs to if it is an exec's top process.
func (c *Container) Pids() (map[int]string, error) {
	pids, err := c.lc.Processes()
	if err != nil {
		return nil, fmt.Errorf("processes of container %s: %w", c.id, err)
	}
	c.mu.Lock()
	execOf := map[int]string{}
	for id, p := range c.execs {
		if pid := p.Pid(); pid != 0 {
			execOf[pid] = id
		}
	}
	c.mu.Unlock()
	out := map[int]string{}
	for _, pid := range pids {
		out[pid] = execOf[pid]
	}
	return out, nil
}

// CgroupPath is the container's cgroup, relative to the cgroup root.
func (c *Container) CgroupPath() string {
	return c.lc.Config().Cgroups.Path
}

// Stats reads the container's cgroup: CPU, memory, pids and I/O.
func (c *Container) Stats() (*cgroups.Stats, error) {
	s, err := c.lc.Stats()
	if err != nil {
		return nil, fmt.Errorf("stats of container %s: %w", c.id, err)
	}
	return s.CgroupStats, nil
}

// Metrics are the container's cgroup v2 metrics, as cgroups' cgroup2.Manager.Stat reads
// them (what containerd's task metrics carry), from files kept open across calls.
func (c *Container) Metrics() (*v2stats.Metrics, error) {
	c.mu.Lock()
	if c.metrics == nil {
		c.metrics = newMetricsReader(filepath.Join(cgroupRoot, c.CgroupPath()))
	}
	r := c.metrics
	c.mu.Unlock()
	m, err := r.metrics()
	if err != nil {
		return nil, fmt.Errorf("stats of container %s: %w", c.id, err)
	}
	return m, nil
}

// Update replaces the container's cgroup resources.
func (c *Container) Update(ctx context.Context, res *specs.LinuxResources) error {
	if res == nil {
		return fmt.Errorf("no resources: %w", errdefs.ErrInvalidArgument)
	}
	s := *c.spec
	if s.Linux == nil {
		s.Linux = &specs.Linux{}
	} else {
		l := *s.Linux
		s.Linux = &l
	}
	s.Linux.Resources = res
	cur := c.lc.Config()
	next, err := libcontainerConfig(c.id, &s, cur.Rootfs, cur.Cgroups.Path)
	if err != nil {
		return err
	}
	cur.Cgroups.Resources = next.Cgroups.Resources
	if err := c.lc.Set(cur); err != nil {
		return fmt.Errorf("update container %s: %w", c.id, err)
	}
	c.spec = &s
	return nil
}

// Pause freezes every process of the container.
func (c *Container) Pause() error { return c.lc.Pause() }

// Resume thaws them.
func (c *Container) Resume() error { return c.lc.Resume() }

// OOM returns a channel that receives a value each time the kernel's OOM killer acts in
// the container's cgroup; it is closed when the cgroup goes away.
func (c *Container) OOM() (<-chan struct{}, error) {
	return c.lc.NotifyOOM()
}

func (c *Container) destroy(ctx context.Context, force bool) (Exit, error) {
	select {
	case <-c.init.exited:
	default:
		c.mu.Lock()
		started := c.started
		c.mu.Unlock()
		if started && !force {
			return Exit{}, fmt.Errorf("container %s is running: %w", c.id, errdefs.ErrFailedPrecondition)
		}
		if err := c.Kill(ctx, unix.SIGKILL, true); err != nil {
			return Exit{}, err
		}
		if _, err := c.init.Wait(ctx); err != nil {
			return Exit{}, err
		}
	}
	c.mu.Lock()
	if c.metrics != nil {
		c.metrics.close() // before the cgroup goes
		c.metrics = nil
	}
	c.mu.Unlock()
	if err := c.runtime.reaper.Guard(c.lc.Destroy); err != nil {
		return Exit{}, fmt.Errorf("destroy container %s: %w", c.id, err)
	}
	c.mu.Lock()
	for _, p := range c.execs {
		p.release()
	}
	c.execs = map[string]*Process{}
	c.mu.Unlock()
	c.init.closeIO()
	return c.init.exit, nil
}
