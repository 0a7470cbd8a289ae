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
	"time"

	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	_ "github.com/opencontainers/cgroups/devices" // device rules: cgroup v1 files, v2 eBPF
	"github.com/opencontainers/runc/libcontainer"
	"github.com/opencontainers/runc/libcontainer/configs"
	"github.com/opencontainers/runc/libcontainer/configs/validate"
	specs "github.com/opencontainers/runtime-spec/specs-go"

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

// Reserve claims a container id before the container's rootfs is assembled, so that a
// duplicate fails first; release it with Unreserve if Create is not called or fails.
func (r *Runtime) Reserve(id string) error {
	if id == "" || path.Base(id) != id || id == "." || id == ".." {
		return fmt.Errorf("container id %q: %w", id, errdefs.ErrInvalidArgument)
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if _, ok := r.containers[id]; ok {
		return fmt.Errorf("container %s: %w", id, errdefs.ErrAlreadyExists)
	}
	r.containers[id] = nil
	return nil
}

// Unreserve releases an id Reserve claimed and no container took.
func (r *Runtime) Unreserve(id string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if c, ok := r.containers[id]; ok && c == nil {
		delete(r.containers, id)
	}
}

// Create creates a container and its init process, which waits for Start. The id may
// have been claimed with Reserve; it is released if Create fails.
func (r *Runtime) Create(ctx context.Context, opts CreateOpts) (_ *Container, retErr error) {
	r.mu.Lock()
	c, ok := r.containers[opts.ID]
	r.mu.Unlock()
	if !ok {
		if err := r.Reserve(opts.ID); err != nil {
			return nil, err
		}
	} else if c != nil {
		return nil, fmt.Errorf("container %s: %w", opts.ID, errdefs.ErrAlreadyExists)
	}
	defer func() {
		if retErr != nil {
			r.Unreserve(opts.ID)
		}
	}()
	if opts.Spec == nil {
		return nil, fmt.Errorf("container %s has no spec: %w", opts.ID, errdefs.ErrInvalidArgument)
	}
	if opts.Spec.Process == nil {
		return nil, fmt.Errorf("container %s: spec has no process: %w", opts.ID, errdefs.ErrInvalidArgument)
	}
	cfg, err := libcontainerConfig(opts.ID, opts.Spec, opts.Rootfs, path.Join(r.cgroupParent, opts.ID))
	if err != nil {
		return nil, err
	}
	// libcontainer.Create validates the configuration too, but its errors carry no
	// errdefs kind, so a spec no kernel can run (a sysctl outside the container's
	// namespaces, a namespace path that is not one) would reach the kubelet as Unknown.
	if err := validate.Validate(cfg); err != nil {
		return nil, fmt.Errorf("container %s: %v: %w", opts.ID, err, errdefs.ErrInvalidArgument)
	}
	lp, err := libcontainerProcess(opts.Spec.Process, true)
	if err != nil {
		return nil, err
	}
	if err := checkExecutable(opts.Rootfs, opts.Spec.Mounts, opts.Spec.Process); err != nil {
		return nil, fmt.Errorf("container %s: %w", opts.ID, err)
	}
	start := time.Now()
	lc, err := libcontainer.Create(r.root, opts.ID, cfg)
	if err != nil {
		return nil, fmt.Errorf("create container %s: %w", opts.ID, err)
	}
	defer func() {
		if retErr != nil {
			if err := r.reaper.Guard(lc.Destroy); err != nil {
				log.G(ctx).WithError(err).WithField("id", opts.ID).Warn("destroy a container that failed to start")
			}
		}
	}()
	p, err := newProcess("", lp, opts.Stdio, func() error { return lc.Start(lp) })
	if err != nil {
		return nil, err
	}
	created := time.Now()
	if err := p.run(r.reaper); err != nil {
		return nil, fmt.Errorf("create container %s: %w", opts.ID, err)
	}
	log.G(ctx).WithFields(log.Fields{"libcontainer_create": created.Sub(start), "init_process": time.Since(created)}).Debug("container init process waits for start")
	c = &Container{id: opts.ID, runtime: r, lc: lc, spec: opts.Spec, init: p, execs: map[string]*Process{}}
	if !cfg.Namespaces.IsPrivate(configs.NEWPID) {
		go c.killAllOnInitExit(ctx)
	}
	r.mu.Lock()
	r.containers[opts.ID] = c
	r.mu.Unlock()
	return c, nil
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

// Delete removes container id with its cgroup and state. A container whose init runs
// is FailedPrecondition unless it was never started, or force is set: then it is killed
// first.
func (r *Runtime) Delete(ctx context.Context, id string, force bool) (Exit, error) {
	c, err := r.Get(id)
	if err != nil {
		return Exit{}, err
	}
	exit, err := c.destroy(ctx, force)
	if err != nil {
		return Exit{}, err
	}
	r.mu.Lock()
	delete(r.containers, id)
	r.mu.Unlock()
	return exit, nil
}
