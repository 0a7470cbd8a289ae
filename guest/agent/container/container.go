package container

import (
	"context"
	"errors"
	"fmt"
	"sync"

	"github.com/containerd/errdefs"
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

	mu    sync.Mutex
	execs map[string]*Process // nil value: being started
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
	if err := c.runtime.reaper.Guard(c.lc.Exec); err != nil {
		return fmt.Errorf("start container %s: %v: %w", c.id, err, errdefs.ErrFailedPrecondition)
	}
	return nil
}

// Exec starts another process in the running container.
func (c *Container) Exec(ctx context.Context, execID string, spec *specs.Process, stdio Stdio) (_ *Process, retErr error) {
	if execID == "" {
		return nil, fmt.Errorf("exec id is empty: %w", errdefs.ErrInvalidArgument)
	}
	if spec == nil {
		return nil, fmt.Errorf("exec %s has no process spec: %w", execID, errdefs.ErrInvalidArgument)
	}
	select {
	case <-c.init.exited:
		return nil, fmt.Errorf("container %s is not running: %w", c.id, errdefs.ErrFailedPrecondition)
	default:
	}
	c.mu.Lock()
	if _, ok := c.execs[execID]; ok {
		c.mu.Unlock()
		return nil, fmt.Errorf("exec %s in container %s: %w", execID, c.id, errdefs.ErrAlreadyExists)
	}
	c.execs[execID] = nil
	c.mu.Unlock()
	defer func() {
		if retErr != nil {
			c.mu.Lock()
			delete(c.execs, execID)
			c.mu.Unlock()
		}
	}()
	lp, err := newProcess(spec, false)
	if err != nil {
		return nil, err
	}
	p, err := c.runtime.startProcess(lp, execID, stdio, func() error { return c.lc.Run(lp) })
	if err != nil {
		return nil, fmt.Errorf("exec %s in container %s: %w", execID, c.id, err)
	}
	c.mu.Lock()
	c.execs[execID] = p
	c.mu.Unlock()
	return p, nil
}

// Process returns the exec execID, or the init process for "".
func (c *Container) Process(execID string) (*Process, error) {
	if execID == "" {
		return c.init, nil
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	p, ok := c.execs[execID]
	if !ok || p == nil {
		return nil, fmt.Errorf("exec %s in container %s: %w", execID, c.id, errdefs.ErrNotFound)
	}
	return p, nil
}

// DeleteExec forgets an exec that has exited and releases its streams.
func (c *Container) DeleteExec(execID string) error {
	p, err := c.Process(execID)
	if err != nil {
		return err
	}
	if execID == "" {
		return fmt.Errorf("the init process is deleted with its container: %w", errdefs.ErrInvalidArgument)
	}
	select {
	case <-p.exited:
	default:
		return fmt.Errorf("exec %s is still running: %w", execID, errdefs.ErrFailedPrecondition)
	}
	c.mu.Lock()
	delete(c.execs, execID)
	c.mu.Unlock()
	p.closeIO()
	return nil
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

// Pids lists the pids of the container's processes (the agent's PID namespace).
func (c *Container) Pids() ([]int, error) {
	return c.lc.Processes()
}

// Stats reads the container's cgroup: CPU, memory, pids and I/O.
func (c *Container) Stats() (*cgroups.Stats, error) {
	s, err := c.lc.Stats()
	if err != nil {
		return nil, fmt.Errorf("stats of container %s: %w", c.id, err)
	}
	return s.CgroupStats, nil
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

func (c *Container) destroy(ctx context.Context) error {
	select {
	case <-c.init.exited:
	default:
		if err := c.Kill(ctx, unix.SIGKILL, true); err != nil {
			return err
		}
		if _, err := c.init.Wait(ctx); err != nil {
			return err
		}
	}
	if err := c.runtime.reaper.Guard(c.lc.Destroy); err != nil {
		return fmt.Errorf("destroy container %s: %w", c.id, err)
	}
	c.mu.Lock()
	for _, p := range c.execs {
		if p != nil {
			p.closeIO()
		}
	}
	c.execs = map[string]*Process{}
	c.mu.Unlock()
	c.init.closeIO()
	return nil
}
