package task

import (
	"context"
	"errors"
	"fmt"
	"os"
	"time"

	eventstypes "github.com/containerd/containerd/api/events"
	taskAPI "github.com/containerd/containerd/api/runtime/task/v3"
	"github.com/containerd/containerd/api/types/task"
	"github.com/containerd/containerd/v2/pkg/protobuf"
	ptypes "github.com/containerd/containerd/v2/pkg/protobuf/types"
	"github.com/containerd/errdefs"
	"github.com/containerd/errdefs/pkg/errgrpc"
	"github.com/containerd/log"
	"github.com/containerd/ttrpc"
	"golang.org/x/sys/unix"

	agent "github.com/caisson-containers/caisson/api/agent/v1"
	"github.com/caisson-containers/caisson/internal/transport"
	"github.com/caisson-containers/caisson/shim/pod"
	"github.com/caisson-containers/caisson/shim/stdio"
)

func (s *service) runningPod() (*pod.Pod, error) {
	pd := s.currentPod()
	if pd == nil {
		return nil, errgrpc.ToGRPCf(errdefs.ErrUnavailable, "the pod's VM is not running")
	}
	return pd, nil
}

// Exec adds a process to a running container.
func (s *service) Exec(ctx context.Context, r *taskAPI.ExecProcessRequest) (_ *ptypes.Empty, retErr error) {
	c, err := s.container(r.ID)
	if err != nil {
		return nil, err
	}
	if st, _, _, _ := c.init.state(); st != task.Status_RUNNING {
		return nil, errgrpc.ToGRPCf(errdefs.ErrFailedPrecondition, "container %s is %s", r.ID, st)
	}
	c.mu.Lock()
	_, dup := c.execs[r.ExecID]
	c.mu.Unlock()
	if dup {
		return nil, errgrpc.ToGRPCf(errdefs.ErrAlreadyExists, "exec %s in container %s", r.ExecID, r.ID)
	}
	pd, err := s.runningPod()
	if err != nil {
		return nil, err
	}
	sio := stdio.Config{Stdin: r.Stdin, Stdout: r.Stdout, Stderr: r.Stderr, Terminal: r.Terminal}
	_, err = pd.Exec.Create(ctx, &agent.CreateExecRequest{
		ContainerId: r.ID, ExecId: r.ExecID, Process: r.Spec.GetValue(), Stdio: sio.Agent(),
	})
	if err != nil {
		return nil, agentErr("create exec", err)
	}
	p := newProcess(r.ID, r.ExecID, sio)
	p.io, err = stdio.Attach(ctx, pd.Session(), r.ID, r.ExecID, sio)
	if err != nil {
		pd.Exec.Delete(context.WithoutCancel(ctx), &agent.DeleteExecRequest{ContainerId: r.ID, ExecId: r.ExecID})
		return nil, errgrpc.ToGRPC(err)
	}
	c.mu.Lock()
	c.execs[r.ExecID] = p
	c.mu.Unlock()
	s.send(&eventstypes.TaskExecAdded{ContainerID: r.ID, ExecID: r.ExecID})
	return empty, nil
}

func (s *service) ResizePty(ctx context.Context, r *taskAPI.ResizePtyRequest) (*ptypes.Empty, error) {
	if _, _, err := s.process(r.ID, r.ExecID); err != nil {
		return nil, err
	}
	pd, err := s.runningPod()
	if err != nil {
		return nil, err
	}
	if _, err := pd.IO.ResizePty(ctx, &agent.ResizePtyRequest{ContainerId: r.ID, ExecId: r.ExecID, Width: r.Width, Height: r.Height}); err != nil {
		return nil, agentErr("resize pty", err)
	}
	return empty, nil
}

// stdinDrainTimeout bounds how long CloseIO waits for stdin written before it to pass.
const stdinDrainTimeout = 5 * time.Second

func (s *service) CloseIO(ctx context.Context, r *taskAPI.CloseIORequest) (*ptypes.Empty, error) {
	_, p, err := s.process(r.ID, r.ExecID)
	if err != nil {
		return nil, err
	}
	if !r.Stdin {
		return empty, nil
	}
	p.mu.Lock()
	io := p.io
	p.mu.Unlock()
	if io != nil && io.HasStdin() {
		// The agent closes the process's stdin after the last byte of the connection;
		// closing it by RPC as well could cut off bytes still in flight.
		fctx, cancel := context.WithTimeout(ctx, stdinDrainTimeout)
		io.FinishStdin(fctx)
		cancel()
		return empty, nil
	}
	if pd := s.currentPod(); pd != nil {
		if _, err := pd.IO.CloseStdin(ctx, &agent.CloseStdinRequest{ContainerId: r.ID, ExecId: r.ExecID}); err != nil {
			return nil, agentErr("close stdin", err)
		}
	}
	return empty, nil
}

func (s *service) State(ctx context.Context, r *taskAPI.StateRequest) (*taskAPI.StateResponse, error) {
	c, p, err := s.process(r.ID, r.ExecID)
	if err != nil {
		return nil, err
	}
	st, pid, code, at := p.state()
	return &taskAPI.StateResponse{
		ID: idOr(r.ExecID, r.ID), ExecID: r.ExecID, Bundle: c.bundle, Pid: pid, Status: st,
		Stdin: p.stdio.Stdin, Stdout: p.stdio.Stdout, Stderr: p.stdio.Stderr, Terminal: p.stdio.Terminal,
		ExitStatus: code, ExitedAt: protobuf.ToTimestamp(at),
	}, nil
}

func (s *service) Pause(ctx context.Context, r *taskAPI.PauseRequest) (*ptypes.Empty, error) {
	return s.freeze(ctx, r.ID, true)
}

func (s *service) Resume(ctx context.Context, r *taskAPI.ResumeRequest) (*ptypes.Empty, error) {
	return s.freeze(ctx, r.ID, false)
}

// freeze pauses (freezes the cgroup of) or resumes a container in the guest.
func (s *service) freeze(ctx context.Context, id string, pause bool) (*ptypes.Empty, error) {
	c, err := s.container(id)
	if err != nil {
		return nil, err
	}
	pd, err := s.runningPod()
	if err != nil {
		return nil, err
	}
	what := "resume"
	if pause {
		what = "pause"
		_, err = pd.Containers.Pause(ctx, &agent.PauseRequest{ContainerId: id})
	} else {
		_, err = pd.Containers.Resume(ctx, &agent.ResumeRequest{ContainerId: id})
	}
	if err != nil {
		return nil, agentErr(what, err)
	}
	if pause {
		c.init.setStatus(task.Status_PAUSED)
		s.send(&eventstypes.TaskPaused{ContainerID: id})
	} else {
		c.init.setStatus(task.Status_RUNNING)
		s.send(&eventstypes.TaskResumed{ContainerID: id})
	}
	return empty, nil
}

func (s *service) Kill(ctx context.Context, r *taskAPI.KillRequest) (*ptypes.Empty, error) {
	_, p, err := s.process(r.ID, r.ExecID)
	if err != nil {
		return nil, err
	}
	if st, _, _, _ := p.state(); st == task.Status_STOPPED {
		return nil, errgrpc.ToGRPCf(errdefs.ErrNotFound, "process %s of %s has already exited", idOr(r.ExecID, r.ID), r.ID)
	}
	pd, err := s.runningPod()
	if err != nil {
		return nil, err
	}
	select {
	case <-pd.Done():
		// Every process of the pod ended with its VM (watchPod reports them).
		return nil, errgrpc.ToGRPCf(errdefs.ErrNotFound, "process %s of %s: the pod's VM has ended", idOr(r.ExecID, r.ID), r.ID)
	default:
	}
	sigkill := r.Signal == uint32(unix.SIGKILL)
	if sigkill && pd.Silent() {
		// The guest missed a deadline and has not answered since: a SIGKILL does not wait
		// for it again.
		return s.killSilentPod(ctx, pd, r.ID)
	}
	if _, err := pd.Containers.Signal(ctx, &agent.SignalRequest{ContainerId: r.ID, ExecId: r.ExecID, Signal: r.Signal, All: r.All}); err != nil {
		switch {
		case pd.Silent() || lostGuest(err):
			if sigkill {
				return s.killSilentPod(ctx, pd, r.ID)
			}
			why := fmt.Sprintf("did not answer within %s", pod.SignalTimeout)
			if !pd.Silent() {
				why = "broke its connection"
			}
			return nil, errgrpc.ToGRPC(fmt.Errorf("signal %d to %s of %s: the guest %s: %w",
				r.Signal, idOr(r.ExecID, r.ID), r.ID, why, errdefs.ErrUnavailable))
		}
		return nil, agentErr("signal", err)
	}
	return empty, nil
}

// lostGuest reports whether err says that the connection to the agent is gone (the
// guest closed it, or broke it with bytes that are not the protocol) rather than being
// an answer of the agent. Nothing more can be asked of such a guest: a SIGKILL is then
// delivered as to a silent one, by ending the VM.
func lostGuest(err error) bool { return errors.Is(err, ttrpc.ErrClosed) || transport.Closed(err) }

// killSilentPod delivers a SIGKILL the guest cannot be asked to deliver: it kills the VM,
// and with it every process of the pod (not only the one the SIGKILL was for: a guest that
// does not answer runs nothing the shim can reach). watchPod reports each process exited
// as SIGKILLed. containerd's next calls find the processes stopped, and its delete and
// shutdown release the rest.
func (s *service) killSilentPod(ctx context.Context, pd *pod.Pod, id string) (*ptypes.Empty, error) {
	log.G(ctx).WithField("container", id).WithField("qemu_pid", pd.Pid()).
		Error("the guest does not answer: killing the pod's VM to deliver a SIGKILL; every container of the pod exits")
	if err := pd.Kill(ctx); err != nil {
		return nil, errgrpc.ToGRPC(fmt.Errorf("kill the VM of a guest that does not answer: %w", err))
	}
	return empty, nil
}

// Pids reports the pod's QEMU as the container's one host process (see taskPid): the
// container's processes are in the guest, and the pids the agent would list are numbers
// of the guest's PID namespace that containerd and its clients would read as host pids
// (containerd's CRI reads /proc/PID/fd of each for its metrics; docker top runs ps on
// them). The agent is not asked. `ctr task exec ... ps` lists the guest's.
func (s *service) Pids(ctx context.Context, r *taskAPI.PidsRequest) (*taskAPI.PidsResponse, error) {
	if _, err := s.container(r.ID); err != nil {
		return nil, err
	}
	pd, err := s.runningPod()
	if err != nil {
		return nil, err
	}
	select {
	case <-pd.Done():
		return nil, errgrpc.ToGRPCf(errdefs.ErrNotFound, "container %s: the pod's VM has ended", r.ID)
	default:
	}
	return &taskAPI.PidsResponse{Processes: []*task.ProcessInfo{{Pid: taskPid(pd)}}}, nil
}

func (s *service) Checkpoint(ctx context.Context, r *taskAPI.CheckpointTaskRequest) (*ptypes.Empty, error) {
	return nil, errgrpc.ToGRPCf(errdefs.ErrNotImplemented, "caisson cannot checkpoint a container in a VM")
}

func (s *service) Update(ctx context.Context, r *taskAPI.UpdateTaskRequest) (*ptypes.Empty, error) {
	if _, err := s.container(r.ID); err != nil {
		return nil, err
	}
	pd, err := s.runningPod()
	if err != nil {
		return nil, err
	}
	// The VM grows first: the container's new limits must fit in it.
	lim, err := s.growForUpdate(ctx, pd, r.ID, r.Resources.GetValue())
	if err != nil {
		return nil, errgrpc.ToGRPC(err)
	}
	if _, err := pd.Containers.Update(ctx, &agent.UpdateContainerRequest{ContainerId: r.ID, Resources: r.Resources.GetValue()}); err != nil {
		return nil, agentErr("update", err)
	}
	s.limits.set(r.ID, lim)
	return empty, nil
}

func (s *service) Wait(ctx context.Context, r *taskAPI.WaitRequest) (*taskAPI.WaitResponse, error) {
	_, p, err := s.process(r.ID, r.ExecID)
	if err != nil {
		return nil, err
	}
	select {
	case <-p.exited:
	case <-ctx.Done():
		return nil, errgrpc.ToGRPC(ctx.Err())
	}
	_, _, code, at := p.state()
	return &taskAPI.WaitResponse{ExitStatus: code, ExitedAt: protobuf.ToTimestamp(at)}, nil
}

// Stats gives the container's metrics from the guest, or its last reply while the guest
// cannot have changed it (stats.go).
func (s *service) Stats(ctx context.Context, r *taskAPI.StatsRequest) (*taskAPI.StatsResponse, error) {
	c, err := s.container(r.ID)
	if err != nil {
		return nil, err
	}
	pd, err := s.runningPod()
	if err != nil {
		return nil, err
	}
	req := &agent.StatsRequest{ContainerId: r.ID}
	budget := s.statsReuseBudget()
	if budget > 0 {
		now := time.Now()
		c.stats.ask(now)
		vcpu, err := pd.VCPUTime()
		if err == nil {
			if m := c.stats.reuse(budget, vcpu, now); m != nil {
				return &taskAPI.StatsResponse{Stats: m}, nil
			}
			req.Also = s.statsAlso(r.ID, now)
		} else if !isDone(pd.Done()) {
			s.statsReuseOff.Do(func() {
				log.G(ctx).WithError(err).Warn("the VM's vCPU time is unknown: every stats call asks the guest")
			})
		}
	}
	resp, err := pd.Containers.Stats(ctx, req)
	if err != nil {
		return nil, agentErr("stats", err)
	}
	if budget > 0 {
		vcpu, err := pd.VCPUTime()
		s.keepStats(c, resp, vcpu, err == nil, time.Now())
	}
	return &taskAPI.StatsResponse{Stats: resp.GetMetrics()}, nil
}

func (s *service) Connect(ctx context.Context, r *taskAPI.ConnectRequest) (*taskAPI.ConnectResponse, error) {
	var pid uint32
	if c, err := s.container(r.ID); err == nil {
		_, pid, _, _ = c.init.state()
	}
	return &taskAPI.ConnectResponse{ShimPid: uint32(os.Getpid()), TaskPid: pid}, nil
}

// Shutdown stops the VM and the shim once no container is left.
func (s *service) Shutdown(ctx context.Context, r *taskAPI.ShutdownRequest) (*ptypes.Empty, error) {
	if s.containerCount() > 0 {
		return empty, nil
	}
	s.shutdown.Shutdown()
	return empty, nil
}

// isDone says whether ch is closed.
func isDone(ch <-chan struct{}) bool {
	select {
	case <-ch:
		return true
	default:
		return false
	}
}
