package task

import (
	"context"
	"errors"
	"fmt"
	"time"

	eventstypes "github.com/containerd/containerd/api/events"
	taskAPI "github.com/containerd/containerd/api/runtime/task/v3"
	"github.com/containerd/containerd/api/types/task"
	"github.com/containerd/containerd/v2/pkg/protobuf"
	ptypes "github.com/containerd/containerd/v2/pkg/protobuf/types"
	"github.com/containerd/errdefs"
	"github.com/containerd/errdefs/pkg/errgrpc"
	"github.com/containerd/log"
	"github.com/opencontainers/runtime-spec/specs-go"

	agent "github.com/caisson-containers/caisson/api/agent/v1"
	"github.com/caisson-containers/caisson/shim/hooks"
)

var empty = &ptypes.Empty{}

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
