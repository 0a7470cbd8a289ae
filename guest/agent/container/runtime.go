// Package container runs OCI containers in the guest with runc's libcontainer: the spec
// the shim sends becomes libcontainer's configuration (namespaces, mounts, user, caps,
// rlimits, seccomp, cgroup v2 resources, sysctls, masked and read-only paths), and every
// process's exit is collected by the agent's reaper.
package container

import (
	"context"
	"fmt"
	"os"
	"path"
	"sort"
	"sync"

	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	_ "github.com/opencontainers/cgroups/devices" // device rules: cgroup v1 files, v2 eBPF
	"github.com/opencontainers/runc/libcontainer"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"

	"github.com/caisson-containers/caisson/guest/agent/reaper"
)

// Runtime holds the containers of the guest.
type Runtime struct {
	root         string
	cgroupParent string
	reaper       *reaper.Reaper

	mu         sync.Mutex
	containers map[string]*Container // nil value: being created
}

// NewRuntime returns a runtime that keeps libcontainer's state under root and puts each
// container's cgroup at cgroupParent/ID. Every process it starts is reaped by r.
func NewRuntime(root, cgroupParent string, r *reaper.Reaper) (*Runtime, error) {
	if err := os.MkdirAll(root, 0o700); err != nil {
		return nil, err
	}
	return &Runtime{root: root, cgroupParent: cgroupParent, reaper: r, containers: map[string]*Container{}}, nil
}

// CreateOpts describes a container to create.
type CreateOpts struct {
	ID string
	// Spec is the container's OCI runtime spec. Its root path and cgroups path are
	// replaced by Rootfs and the runtime's own cgroup layout.
	Spec *specs.Spec
	// Rootfs is the container's assembled root filesystem in the guest.
	Rootfs string
	Stdio  Stdio
}

// Create creates a container and its init process, which waits for Start.
func (r *Runtime) Create(ctx context.Context, opts CreateOpts) (_ *Container, retErr error) {
	if opts.ID == "" || path.Base(opts.ID) != opts.ID || opts.ID == "." || opts.ID == ".." {
		return nil, fmt.Errorf("container id %q: %w", opts.ID, errdefs.ErrInvalidArgument)
	}
	if opts.Spec == nil {
		return nil, fmt.Errorf("container %s has no spec: %w", opts.ID, errdefs.ErrInvalidArgument)
	}
	r.mu.Lock()
	if _, ok := r.containers[opts.ID]; ok {
		r.mu.Unlock()
		return nil, fmt.Errorf("container %s: %w", opts.ID, errdefs.ErrAlreadyExists)
	}
	r.containers[opts.ID] = nil
	r.mu.Unlock()
	defer func() {
		if retErr != nil {
			r.mu.Lock()
			delete(r.containers, opts.ID)
			r.mu.Unlock()
		}
	}()

	cfg, err := libcontainerConfig(opts.ID, opts.Spec, opts.Rootfs, path.Join(r.cgroupParent, opts.ID))
	if err != nil {
		return nil, err
	}
	lp, err := newProcess(opts.Spec.Process, true)
	if err != nil {
		return nil, err
	}
	lc, err := libcontainer.Create(r.root, opts.ID, cfg)
	if err != nil {
		return nil, fmt.Errorf("create container %s: %w", opts.ID, err)
	}
	defer func() {
		if retErr != nil {
			if err := lc.Destroy(); err != nil {
				log.G(ctx).WithError(err).WithField("id", opts.ID).Warn("destroy a container that failed to start")
			}
		}
	}()
	p, err := r.startProcess(lp, "", opts.Stdio, func() error { return lc.Start(lp) })
	if err != nil {
		return nil, fmt.Errorf("create container %s: %w", opts.ID, err)
	}
	c := &Container{id: opts.ID, runtime: r, lc: lc, spec: opts.Spec, init: p, execs: map[string]*Process{}}
	r.mu.Lock()
	r.containers[opts.ID] = c
	r.mu.Unlock()
	return c, nil
}

// startProcess starts lp with start (libcontainer's Start or Run), registering its pid
// with the reaper before any exit can be collected.
func (r *Runtime) startProcess(lp *libcontainer.Process, execID string, stdio Stdio, start func() error) (*Process, error) {
	p := &Process{id: execID, lp: lp, init: lp.Init, exited: make(chan struct{})}
	if err := newStdio(p, lp, stdio); err != nil {
		return nil, err
	}
	pid, ch, err := r.reaper.Start(func() (int, error) {
		if err := start(); err != nil {
			return 0, err
		}
		return lp.Pid()
	})
	p.closeChildFiles()
	if err != nil {
		p.closeIO()
		return nil, err
	}
	p.pid = pid
	go p.watch(ch)
	if err := p.receiveConsole(); err != nil {
		_ = unix.Kill(pid, unix.SIGKILL)
		<-p.exited
		p.closeIO()
		return nil, err
	}
	return p, nil
}

// Get returns the container id.
func (r *Runtime) Get(id string) (*Container, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	c, ok := r.containers[id]
	if !ok || c == nil {
		return nil, fmt.Errorf("container %s: %w", id, errdefs.ErrNotFound)
	}
	return c, nil
}

// List returns the containers, sorted by id.
func (r *Runtime) List() []*Container {
	r.mu.Lock()
	defer r.mu.Unlock()
	var out []*Container
	for _, c := range r.containers {
		if c != nil {
			out = append(out, c)
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].id < out[j].id })
	return out
}

// Delete kills what is left of container id, waits for its init to exit, and removes
// it with its cgroup and state.
func (r *Runtime) Delete(ctx context.Context, id string) error {
	c, err := r.Get(id)
	if err != nil {
		return err
	}
	if err := c.destroy(ctx); err != nil {
		return err
	}
	r.mu.Lock()
	delete(r.containers, id)
	r.mu.Unlock()
	return nil
}
