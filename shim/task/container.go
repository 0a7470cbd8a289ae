package task

import (
	"context"
	"fmt"
	"sync"

	"github.com/containerd/errdefs"
)

// container is one container of the pod.
type container struct {
	id     string
	bundle string
	init   *process
	// releaseRootfs detaches the container's rootfs devices (shared layers stay while used).
	releaseRootfs func(context.Context) error
	// hooks are the OCI hooks the shim runs on the host for it (hooks.go).
	hooks *containerHooks
	// stats is its last Stats reply from the guest (stats.go).
	stats keptStats

	mu    sync.Mutex
	execs map[string]*process
}

func (c *container) process(execID string) (*process, error) {
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

// all returns the init process and the execs.
func (c *container) all() []*process {
	c.mu.Lock()
	defer c.mu.Unlock()
	ps := []*process{c.init}
	for _, p := range c.execs {
		ps = append(ps, p)
	}
	return ps
}
