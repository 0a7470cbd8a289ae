package service

import (
	"runtime"
	"sync"
	"testing"
	"time"
)

func idleWorkers(w *workers) int {
	w.mu.Lock()
	defer w.mu.Unlock()
	return len(w.idle)
}

// waitIdle waits until n workers are idle: a worker goes idle just after its call returned.
func waitIdle(t *testing.T, w *workers, n int) {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); idleWorkers(w) != n; {
		if time.Now().After(deadline) {
			t.Fatalf("%d idle workers, want %d", idleWorkers(w), n)
		}
		time.Sleep(time.Millisecond)
	}
}

func TestWorkersReuseOne(t *testing.T) {
	w := newWorkers(4)
	for i := range 50 {
		got := -1
		w.run(func() { got = i })
		if got != i {
			t.Fatalf("call %d ran as %d", i, got)
		}
		waitIdle(t, w, 1)
	}
}

func TestWorkersBlockedCallTakesNoTurn(t *testing.T) {
	w := newWorkers(2)
	release := make(chan struct{})
	blocked := make(chan struct{})
	go w.run(func() { close(blocked); <-release })
	<-blocked
	done := make(chan struct{})
	go func() {
		w.run(func() {})
		close(done)
	}()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("a call waited for a blocked one")
	}
	close(release)
	waitIdle(t, w, 2)
}

func TestWorkersKeepAtMostMaxIdle(t *testing.T) {
	base := runtime.NumGoroutine()
	w := newWorkers(3)
	var started, wg sync.WaitGroup
	release := make(chan struct{})
	for range 10 {
		started.Add(1)
		wg.Add(1)
		go func() {
			defer wg.Done()
			w.run(func() { started.Done(); <-release })
		}()
	}
	started.Wait()
	close(release)
	wg.Wait()
	waitIdle(t, w, 3)
	for deadline := time.Now().Add(10 * time.Second); runtime.NumGoroutine() > base+3; {
		if time.Now().After(deadline) {
			t.Fatalf("%d goroutines, want at most %d (3 idle workers)", runtime.NumGoroutine(), base+3)
		}
		time.Sleep(time.Millisecond)
	}
}
