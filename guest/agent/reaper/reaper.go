// Package reaper reaps every child of the agent (it runs as PID 1, so every orphan in the
// guest becomes its child) and hands each exit status to whoever waits for that pid.
//
// Nothing else in the agent may call wait4 on its own, with one exception: code that
// starts a process and waits for some of its own helpers (runc's libcontainer does this
// while it starts a container or an exec) must run inside Start, which keeps the reaper
// from collecting anything until it returns.
package reaper

import (
	"os"
	"os/signal"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// Exit is how a process ended.
type Exit struct {
	Pid    int
	Status int // the exit code, or 128+signal if a signal killed it
	Signal unix.Signal
	At     time.Time // when it was reaped
}

// Reaper collects child exits. The zero value is not usable; use New.
type Reaper struct {
	// starting is held for reading by every Start in progress and for writing by the
	// reaping loop, so that no wait4(-1) runs while a starter waits on its own children.
	starting sync.RWMutex

	mu      sync.Mutex
	waiters map[int]chan Exit
	sigc    chan os.Signal
	done    chan struct{}
}

// New returns a reaper; call Run to start it.
func New() *Reaper {
	return &Reaper{waiters: map[int]chan Exit{}, sigc: make(chan os.Signal, 32), done: make(chan struct{})}
}

// Run reaps children until Stop is called. Call it in its own goroutine.
func (r *Reaper) Run() {
	signal.Notify(r.sigc, unix.SIGCHLD)
	defer signal.Stop(r.sigc)
	for {
		select {
		case <-r.done:
			return
		case <-r.sigc:
			r.reapAll()
		}
	}
}

// Stop ends Run.
func (r *Reaper) Stop() {
	close(r.done)
}

func (r *Reaper) reapAll() {
	r.starting.Lock()
	defer r.starting.Unlock()
	for {
		var ws unix.WaitStatus
		pid, err := unix.Wait4(-1, &ws, unix.WNOHANG, nil)
		if err == unix.EINTR {
			continue
		}
		if err != nil || pid <= 0 {
			return
		}
		e := Exit{Pid: pid, At: time.Now()}
		switch {
		case ws.Exited():
			e.Status = ws.ExitStatus()
		case ws.Signaled():
			e.Signal = ws.Signal()
			e.Status = 128 + int(ws.Signal())
		default:
			continue
		}
		r.mu.Lock()
		ch, ok := r.waiters[pid]
		delete(r.waiters, pid)
		r.mu.Unlock()
		if ok {
			ch <- e
		}
	}
}

// Start runs start, which starts a process and returns its pid, while no reaping
// happens, and returns a channel that receives the process's exit. start may wait for
// its own helper processes. If start fails, no channel is returned.
func (r *Reaper) Start(start func() (int, error)) (int, <-chan Exit, error) {
	r.starting.RLock()
	defer r.starting.RUnlock()
	pid, err := start()
	if err != nil {
		return 0, nil, err
	}
	ch := make(chan Exit, 1)
	r.mu.Lock()
	r.waiters[pid] = ch
	r.mu.Unlock()
	// A child that exited before we registered is still a zombie: the next reapAll, which
	// cannot run before we return, collects it. Make sure one runs.
	select {
	case r.sigc <- unix.SIGCHLD:
	default:
	}
	return pid, ch, nil
}

// Guard runs fn, which may wait for its own children, while no reaping happens.
func (r *Reaper) Guard(fn func() error) error {
	r.starting.RLock()
	defer r.starting.RUnlock()
	return fn()
}

// Subreaper makes the calling process a child subreaper, so that orphans of its
// descendants become its children (PID 1 is one already; tests on a host need this).
func Subreaper() error {
	return unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
}
