package service

import "sync"

// workers run calls on goroutines that outlive them. ttrpc starts a goroutine for every
// request, with Go's smallest stack (2 KiB); decoding the request and running the
// method grow it several times, and each growth copies the stack after looking up every
// frame's tables, which under TCG was a fifth of the emulated work of a call that does
// nothing (docs/guest.md, "Stats calls"). A worker's stack has grown once, and stays
// grown until a garbage collection finds it idle and shrinks it.
//
// A call never waits for a worker: without an idle one it starts another, so calls that
// block (Wait) take no others' turn. Up to maxIdle workers stay for the next calls, and
// the one idle the shortest takes the next call: its stack is the likeliest to fit.
//
// A worker outlives the call, and so does its thread's state: a method must leave the
// goroutine it runs on unlocked from its thread. The agent enters namespaces on
// goroutines of their own, which lock their thread and end with it (package sandbox).
type workers struct {
	mu      sync.Mutex
	idle    []chan func() // a stack: the last one went idle last
	maxIdle int
}

func newWorkers(maxIdle int) *workers {
	return &workers{maxIdle: maxIdle}
}

// run runs f on a worker and returns once it has returned.
func (w *workers) run(f func()) {
	done := make(chan struct{})
	call := func() {
		defer close(done)
		f()
	}
	w.mu.Lock()
	if n := len(w.idle); n > 0 {
		next := w.idle[n-1]
		w.idle = w.idle[:n-1]
		w.mu.Unlock()
		next <- call
	} else {
		w.mu.Unlock()
		go w.loop(call)
	}
	<-done
}

func (w *workers) loop(f func()) {
	calls := make(chan func())
	for {
		f()
		w.mu.Lock()
		if len(w.idle) >= w.maxIdle {
			w.mu.Unlock()
			return
		}
		w.idle = append(w.idle, calls)
		w.mu.Unlock()
		f = <-calls
	}
}
