package copies

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/containerd/errdefs"
	"github.com/containerd/errdefs/pkg/errgrpc"
	"github.com/containerd/log"
	"github.com/sirupsen/logrus"
	"google.golang.org/protobuf/types/known/emptypb"

	agent "github.com/caisson-containers/caisson/api/agent/v1"
)

// fakeAgent records UpdateCopiedMount calls and answers err.
type fakeAgent struct {
	mu    sync.Mutex
	calls []*agent.UpdateCopiedMountRequest
	err   error
	got   chan struct{} // a value per call
}

func newFakeAgent() *fakeAgent { return &fakeAgent{got: make(chan struct{}, 100)} }

func (f *fakeAgent) UpdateCopiedMount(_ context.Context, r *agent.UpdateCopiedMountRequest) (*emptypb.Empty, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.calls = append(f.calls, r)
	f.got <- struct{}{}
	if f.err != nil {
		return nil, errgrpc.ToGRPC(f.err)
	}
	return &emptypb.Empty{}, nil
}

// take returns the calls since the last take.
func (f *fakeAgent) take() []*agent.UpdateCopiedMountRequest {
	f.mu.Lock()
	defer f.mu.Unlock()
	c := f.calls
	f.calls = nil
	for len(f.got) > 0 {
		<-f.got
	}
	return c
}

func (f *fakeAgent) fail(err error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.err = err
}

// kubeletVolume writes (or updates, as the kubelet's atomic writer does) a volume
// at dir holding keys in version directory ts.
func kubeletVolume(t *testing.T, dir, ts string, keys map[string]string) {
	t.Helper()
	mkdir(t, filepath.Join(dir, ts))
	for k, v := range keys {
		write(t, filepath.Join(dir, ts, k), v)
	}
	old, _ := os.Readlink(filepath.Join(dir, "..data"))
	symlink(t, ts, filepath.Join(dir, "..data_tmp"))
	if err := os.Rename(filepath.Join(dir, "..data_tmp"), filepath.Join(dir, "..data")); err != nil {
		t.Fatal(err)
	}
	for k := range keys {
		if _, err := os.Lstat(filepath.Join(dir, k)); os.IsNotExist(err) {
			symlink(t, "..data/"+k, filepath.Join(dir, k))
		}
	}
	ents, _ := os.ReadDir(dir)
	for _, e := range ents {
		if _, ok := keys[e.Name()]; !ok && !strings.HasPrefix(e.Name(), "..") {
			os.Remove(filepath.Join(dir, e.Name()))
		}
	}
	if old != "" {
		os.RemoveAll(filepath.Join(dir, old))
	}
}

// sourceOf is what Create gives the watcher for a mount of src.
func sourceOf(t *testing.T, src string, readonly bool) Source {
	t.Helper()
	_, sig, err := Tree(src, 1<<20)
	if err != nil {
		t.Fatal(err)
	}
	return Source{Key: src, ReadOnly: readonly, Sig: sig}
}

// fileData returns the content of path in a copied tree.
func fileData(files []*agent.CopiedFile, path string) (string, bool) {
	for _, f := range files {
		if f.Path == path {
			return string(f.Data), true
		}
	}
	return "", false
}

// TestCopyWatcherPoll drives the watcher one poll at a time.
func TestCopyWatcherPoll(t *testing.T) {
	ctx := context.Background()
	for _, tc := range []struct {
		name string
		// setup makes the sources and adds containers; change changes the host;
		// check checks what reached the agent at the poll after change.
		run func(t *testing.T, w *Watcher, a *fakeAgent, dir string, logs *bytes.Buffer)
	}{
		{name: "nothing changed", run: func(t *testing.T, w *Watcher, a *fakeAgent, dir string, _ *bytes.Buffer) {
			kubeletVolume(t, dir, "..1", map[string]string{"key": "v1"})
			w.Add("c1", []Source{sourceOf(t, dir, true)})
			w.poll(ctx)
			if c := a.take(); len(c) != 0 {
				t.Fatalf("%d updates of an unchanged source", len(c))
			}
		}},
		{name: "kubelet update", run: func(t *testing.T, w *Watcher, a *fakeAgent, dir string, _ *bytes.Buffer) {
			kubeletVolume(t, dir, "..1", map[string]string{"key": "v1", "gone": "x"})
			w.Add("c1", []Source{sourceOf(t, dir, true)})
			kubeletVolume(t, dir, "..2", map[string]string{"key": "v2", "added": "y"})
			w.poll(ctx)
			c := a.take()
			if len(c) != 1 || c[0].GetKey() != dir {
				t.Fatalf("updates %v, want one of %s", c, dir)
			}
			files := c[0].GetFiles()
			if v, _ := fileData(files, "..2/key"); v != "v2" {
				t.Errorf("..2/key is %q", v)
			}
			if v, _ := fileData(files, "..2/added"); v != "y" {
				t.Errorf("..2/added is %q", v)
			}
			if _, ok := fileData(files, "gone"); ok {
				t.Error("the deleted key is still sent")
			}
			w.poll(ctx)
			if c := a.take(); len(c) != 0 {
				t.Fatalf("%d updates after the source settled", len(c))
			}
		}},
		{name: "file rewritten with the same size and mtime", run: func(t *testing.T, w *Watcher, a *fakeAgent, dir string, _ *bytes.Buffer) {
			f := filepath.Join(dir, "token")
			write(t, f, "aaaa")
			st, _ := os.Stat(f)
			w.Add("c1", []Source{sourceOf(t, f, true)})
			write(t, f, "bbbb")
			os.Chtimes(f, st.ModTime(), st.ModTime())
			w.poll(ctx)
			if c := a.take(); len(c) != 1 || string(c[0].GetFiles()[0].GetData()) != "bbbb" {
				t.Fatalf("updates %v, want one with bbbb", c)
			}
		}},
		{name: "writable source never refreshed", run: func(t *testing.T, w *Watcher, a *fakeAgent, dir string, _ *bytes.Buffer) {
			ro, rw := filepath.Join(dir, "ro"), filepath.Join(dir, "rw")
			mkdir(t, ro)
			mkdir(t, rw)
			// c1 mounts both read-only; c2 mounts rw writable: the pod writes its copy.
			w.Add("c1", []Source{sourceOf(t, ro, true), sourceOf(t, rw, true)})
			w.Add("c2", []Source{sourceOf(t, rw, false)})
			write(t, filepath.Join(ro, "f"), "x")
			write(t, filepath.Join(rw, "f"), "x")
			w.poll(ctx)
			c := a.take()
			if len(c) != 1 || c[0].GetKey() != ro {
				t.Fatalf("updates %v, want one of %s only", c, ro)
			}
			// It stays unwatched when the writer is gone: the copy holds what it wrote.
			w.Remove("c2")
			write(t, filepath.Join(rw, "g"), "x")
			w.poll(ctx)
			if c := a.take(); len(c) != 0 {
				t.Fatalf("updates %v of a source a container wrote", c)
			}
		}},
		{name: "over the limit, then back under", run: func(t *testing.T, w *Watcher, a *fakeAgent, dir string, logs *bytes.Buffer) {
			write(t, filepath.Join(dir, "a"), "1234")
			w.Add("c1", []Source{sourceOf(t, dir, true)})
			write(t, filepath.Join(dir, "b"), strings.Repeat("x", 100)) // limit 64
			w.poll(ctx)
			w.poll(ctx)
			if c := a.take(); len(c) != 0 {
				t.Fatalf("updates %v of a source over the limit", c)
			}
			out := logs.String()
			for _, want := range []string{"level=warning", "size=104", "path=\"" + dir, "limit=64", "keep the previous content"} {
				if !strings.Contains(out, want) {
					t.Errorf("log does not say %q:\n%s", want, out)
				}
			}
			if n := strings.Count(out, "level=warning"); n != 1 {
				t.Errorf("%d warnings for one lasting problem, want 1", n)
			}
			os.Remove(filepath.Join(dir, "b"))
			write(t, filepath.Join(dir, "a"), "5678")
			w.poll(ctx)
			if c := a.take(); len(c) != 1 {
				t.Fatalf("updates %v, want one once back under the limit", c)
			}
		}},
		{name: "agent failure retried", run: func(t *testing.T, w *Watcher, a *fakeAgent, dir string, logs *bytes.Buffer) {
			write(t, filepath.Join(dir, "a"), "1")
			w.Add("c1", []Source{sourceOf(t, dir, true)})
			write(t, filepath.Join(dir, "a"), "2")
			a.fail(errdefs.ErrUnavailable)
			w.poll(ctx)
			w.poll(ctx)
			if c := a.take(); len(c) != 2 {
				t.Fatalf("%d updates, want a retry at each poll", len(c))
			}
			if !strings.Contains(logs.String(), "level=warning") {
				t.Errorf("no warning after two failures:\n%s", logs)
			}
			a.fail(nil)
			w.poll(ctx)
			w.poll(ctx)
			if c := a.take(); len(c) != 1 {
				t.Fatalf("%d updates, want one that succeeds and none after", len(c))
			}
		}},
		{name: "forgotten with its last container", run: func(t *testing.T, w *Watcher, a *fakeAgent, dir string, _ *bytes.Buffer) {
			write(t, filepath.Join(dir, "a"), "1")
			w.Add("c1", []Source{sourceOf(t, dir, true)})
			w.Add("c2", []Source{sourceOf(t, dir, true)})
			w.Remove("c1")
			write(t, filepath.Join(dir, "a"), "2")
			w.poll(ctx)
			if c := a.take(); len(c) != 1 {
				t.Fatalf("%d updates while c2 uses it, want 1", len(c))
			}
			w.Remove("c2")
			write(t, filepath.Join(dir, "a"), "3")
			w.poll(ctx)
			if c := a.take(); len(c) != 0 {
				t.Fatalf("%d updates after its last container was deleted", len(c))
			}
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var logs bytes.Buffer
			l := logrus.New()
			l.Out = &logs
			l.Formatter = &logrus.TextFormatter{DisableTimestamp: true}
			a := newFakeAgent()
			// An hour: the poller goroutine never ticks; the test polls.
			w := NewWatcher(log.WithLogger(ctx, logrus.NewEntry(l)), a, nil, time.Hour, 64)
			t.Cleanup(w.Close)
			tc.run(t, w, a, t.TempDir(), &logs)
		})
	}
}

// TestCopyWatcherGoroutine checks the poller goroutine: it runs while a source
// is watched, refreshes on its own, and ends with the last container using a
// watched source, with close and with the pod's VM.
func TestCopyWatcherGoroutine(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	write(t, filepath.Join(dir, "a"), "1")
	a := newFakeAgent()
	podDone := make(chan struct{})
	w := NewWatcher(ctx, a, podDone, 10*time.Millisecond, 1<<20)

	waitPollers(t, 0, "before anything is watched")
	w.Add("rw", []Source{sourceOf(t, dir+"/a", false)})
	waitPollers(t, 0, "for a writable source only")
	w.Add("c1", []Source{sourceOf(t, dir, true)})
	waitPollers(t, 1, "for a watched source")
	write(t, filepath.Join(dir, "a"), "2")
	select {
	case <-a.got:
	case <-time.After(time.Minute):
		t.Fatal("the change never reached the agent")
	}
	w.Remove("c1") // returns when the poller has ended
	waitPollers(t, 0, "after the last watched source went")
	w.Add("c2", []Source{sourceOf(t, dir, true)})
	waitPollers(t, 1, "again")
	w.Close()
	waitPollers(t, 0, "after close")
	w.Add("c3", []Source{sourceOf(t, dir, true)})
	waitPollers(t, 0, "after close and add")

	// The VM ends under a running poller.
	w = NewWatcher(ctx, a, podDone, 10*time.Millisecond, 1<<20)
	w.Add("c1", []Source{sourceOf(t, dir, true)})
	waitPollers(t, 1, "for a watched source")
	close(podDone)
	waitPollers(t, 0, "after the pod's VM ended")
	w.Close()
}

// waitPollers waits (a minute at most) until n copy watcher goroutines run: one
// that was told to end may take a moment to be gone from the stacks.
func waitPollers(t *testing.T, n int, when string) {
	t.Helper()
	deadline := time.Now().Add(time.Minute)
	for {
		got := pollers()
		if got == n {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d pollers %s, want %d", got, when, n)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// pollers counts the running copy watcher goroutines.
func pollers() int {
	buf := make([]byte, 1<<20)
	buf = buf[:runtime.Stack(buf, true)]
	// A poller that has not run yet shows as a wrapper of add: count by creator.
	return strings.Count(string(buf), "created by github.com/caisson-containers/caisson/shim/copies.(*Watcher).Add ")
}

// BenchmarkTreeSignature measures what the poller does at each interval for an
// unchanged source, a kubelet-shaped volume of 100 keys of 8 KiB (800 KiB),
// against copying it (what a change costs): the metric sig/copy is the ratio.
func BenchmarkTreeSignature(b *testing.B) {
	dir := b.TempDir()
	ts := filepath.Join(dir, "..2026_11_23_17_00_00.1")
	if err := os.Mkdir(ts, 0o755); err != nil {
		b.Fatal(err)
	}
	os.Symlink(filepath.Base(ts), filepath.Join(dir, "..data"))
	for i := range 100 {
		k := "key" + strconv.Itoa(i)
		os.WriteFile(filepath.Join(ts, k), bytes.Repeat([]byte{'x'}, 8<<10), 0o644)
		os.Symlink("..data/"+k, filepath.Join(dir, k))
	}
	measure := func(f func() error) time.Duration {
		start := time.Now()
		for range 200 {
			if err := f(); err != nil {
				b.Fatal(err)
			}
		}
		return time.Since(start) / 200
	}
	var sig, cp time.Duration
	for b.Loop() {
		cp = measure(func() error { _, _, err := Tree(dir, 1<<20); return err })
		sig = measure(func() error { _, err := treeSignature(dir); return err })
	}
	b.ReportMetric(float64(sig)/float64(cp), "sig/copy")
	b.ReportMetric(float64(sig.Microseconds()), "sig-µs")
}
