package task

import (
	"context"
	"sync"
	"time"

	"github.com/containerd/containerd/api/types/task"

	"github.com/caisson-containers/caisson/shim/stdio"
)

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
// exit is reported after every byte that preceded it. It reports whether this
// call recorded it.
func (p *process) exit(ctx context.Context, code uint32, at time.Time) bool {
	recorded := false
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
		close(p.exited)
		recorded = true
	})
	return recorded
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
