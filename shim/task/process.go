package task

import (
	"context"
	"sync"
	"time"

	"github.com/containerd/containerd/api/types/task"

	"github.com/caisson-containers/caisson/shim/pod"
	"github.com/caisson-containers/caisson/shim/stdio"
)

// taskPid is the pid containerd is told for every process of the pod (Create, Start,
// exec starts, State, Pids, events): QEMU's, a host process this shim started and
// reaps, never a pid the agent reports.
//
// The agent's pids are numbers in the guest's PID namespace, chosen by a guest that may
// be compromised, and containerd and the tools around it act on a task's pid as a host
// pid: containerd 1.7's CRI bind-mounts /proc/PID/ns/net of a pod's sandbox task with a
// user namespace and runs CNI in it; the CRI (1.7 to 2.4) writes /proc/PID/ns/{net,ipc,
// uts,pid} of the sandbox task into its containers' specs and hands the pid to NRI
// plugins; 2.x's ListPodSandboxMetrics reads /proc/PID/fd of each of a container's
// Pids; nerdctl joins /proc/PID/ns/net for --net container:ID, and docker top runs ps
// on them. A guest reporting pid 1, or the pid of any host process, would point each of
// those at that process. QEMU's pid points them at the process that is the pod on the
// host (Kata Containers reports its hypervisor's pid for the same reason): a signal sent
// to it ends the pod, and /proc/PID/ns are QEMU's: with the jailer (the default) network,
// mount and PID namespaces of its own that hold nothing of the host's, without it the
// shim's. So a CRI that takes a pod's network namespace from its sandbox task's pid
// (containerd 1.7 for a pod with a user namespace; 2.4 makes that namespace itself)
// gets the jail's empty one, or, unjailed, the host's: such pods are not supported
// (docs/security.md). 0 before the VM starts.
func taskPid(pd *pod.Pod) uint32 {
	if pd == nil {
		return 0
	}
	return uint32(pd.Pid())
}

// process is a container's init process or an exec'd one, as the shim tracks it.
type process struct {
	containerID string
	execID      string // "" for init
	stdio       stdio.Config

	mu       sync.Mutex
	pid      uint32
	status   task.Status
	io       *stdio.IO
	exitCode uint32
	exitedAt time.Time

	exitOnce sync.Once
	exited   chan struct{}
}

func newProcess(containerID, execID string, c stdio.Config) *process {
	return &process{containerID: containerID, execID: execID, stdio: c, status: task.Status_CREATED, exited: make(chan struct{})}
}

func (p *process) state() (status task.Status, pid, code uint32, at time.Time) {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.status, p.pid, p.exitCode, p.exitedAt
}

func (p *process) setStatus(s task.Status) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.status != task.Status_STOPPED {
		p.status = s
	}
}

// exit records the exit once: output is drained first (bounded), so that the
// exit is reported after every byte that preceded it; then announce runs, before the
// exit's waiters wake.
func (p *process) exit(ctx context.Context, code uint32, at time.Time, announce func()) {
	p.exitOnce.Do(func() {
		p.mu.Lock()
		io := p.io
		p.mu.Unlock()
		if io != nil {
			dctx, cancel := context.WithTimeout(ctx, drainTimeout)
			io.Wait(dctx)
			cancel()
		}
		p.mu.Lock()
		p.status, p.exitCode, p.exitedAt = task.Status_STOPPED, code, at
		p.mu.Unlock()
		announce()
		close(p.exited)
	})
}

// drainTimeout bounds the wait for output after an exit: a daemon that
// inherited stdout can keep it open forever.
const drainTimeout = 5 * time.Second

func (p *process) closeIO() {
	p.mu.Lock()
	io := p.io
	p.io = nil
	p.mu.Unlock()
	if io != nil {
		io.Close()
	}
}
