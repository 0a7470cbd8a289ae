// Package hostile drives the real shim, through a real containerd, against a guest that
// is compromised: a fake QEMU (./fakeqemu) whose agent (./hostileagent) misbehaves in
// one way per test case. For each, the shim's memory stays bounded, every task call
// returns within its deadline (shim/pod/deadline.go), containerd keeps answering and a
// runc container keeps running, the task can be killed and deleted, and nothing is left
// behind: no shim, no QEMU, no pod state (sockets, logs, disks), no mount.
package hostile

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	eventstypes "github.com/containerd/containerd/api/events"
	"github.com/containerd/containerd/api/services/tasks/v1"
	containerd "github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/pkg/cio"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/containerd/v2/pkg/oci"
	"github.com/containerd/typeurl/v2"

	"github.com/caisson-containers/caisson/integration-tests/harness"
	"github.com/caisson-containers/caisson/integration-tests/hostile/hostileagent"
	"github.com/caisson-containers/caisson/internal/testutil"
	"github.com/caisson-containers/caisson/shim/config"
	"github.com/caisson-containers/caisson/shim/pod"
	"github.com/caisson-containers/caisson/shim/podid"
)

const (
	runtimeName = "io.containerd.caisson.v2"
	snapshotter = "caisson"
	// maxRSSGrowth bounds how much the shim's resident memory may grow under a behaviour.
	maxRSSGrowth = 16 << 20
	// slack is added to each deadline: the shim's own work around the agent's call.
	slack = 5 * time.Second
	// killBound bounds a SIGKILL: the guest's answer (SignalTimeout), else the VM's
	// kill (shim/vmm/qemu's killWait).
	killBound = pod.SignalTimeout + 10*time.Second + slack
	// drainTimeout is shim/task's wait for a process's output after its exit.
	drainTimeout = 5 * time.Second
	// runcID is the runc container that runs beside the hostile pods.
	runcID = "runc-neighbour"
)

// hostileCase is one behaviour and what the shim must make of it.
type hostileCase struct {
	b hostileagent.Behaviour
	// startFails: the task's Start fails (the guest did not answer in time, broke the
	// connection, or went away), within its deadline.
	startFails bool
	// during runs after Start, while the shim's memory and containerd are watched.
	during func(t *testing.T, ctx context.Context, r *run)
	// after runs once the task and container are deleted.
	after func(t *testing.T, r *run)
}

// run is one case's container as the checks see it.
type run struct {
	e       *harness.Env
	id      string
	task    containerd.Task
	qemuPid int
	stdout  *countingWriter
	oom     *oomWatch
	runcID  string
}

func TestHostileGuest(t *testing.T) {
	fake := buildFakeQEMU(t)
	e := harness.Start(t, harness.Options{Runtime: func(c *config.Config) {
		c.Hypervisor.Path = fake
		c.Hypervisor.Accelerator = "tcg" // no accelerator probe: it would run the fake
		c.Hypervisor.Template = false
		c.Guest.SharedFS = "copy" // no virtiofsd: the fake has no vhost-user device
		// The fake's WrongIDs reports OOM kills of the runc container (fakeqemu).
		c.Guest.KernelParams = "hostile.others=" + runcID
	}})
	ctx := e.Context(t)
	image := e.ImportBusybox(t)

	// A runc container runs through every case: what a hostile guest does to its pod must
	// not reach it. WrongIDs reports OOM kills of it.
	if err := image.Unpack(ctx, "overlayfs"); err != nil {
		t.Fatal(err)
	}
	runcC := newContainer(t, e, image, runcID, "io.containerd.runc.v2", "overlayfs")
	runcTask, err := runcC.NewTask(ctx, cio.NullIO)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { runcTask.Delete(context.WithoutCancel(ctx), containerd.WithProcessKill) })
	if err := runcTask.Start(ctx); err != nil {
		t.Fatal(err)
	}
	oom := watchOOM(t, e)

	for _, tc := range []hostileCase{
		{b: hostileagent.Benign},
		{b: hostileagent.Hang, startFails: true},
		{b: hostileagent.Late},
		{b: hostileagent.ExitMidCall, startFails: true},
		{b: hostileagent.FloodStdout, during: func(t *testing.T, ctx context.Context, r *run) {
			// The flood passes through (containerd reads it), and the shim buffers none of it.
			const want = 64 << 20
			waitFor(t, ctx, 60*time.Second, "64 MiB of the flood to reach containerd", func() bool { return r.stdout.n.Load() >= want })
		}},
		{b: hostileagent.JunkFrames, startFails: true},
		{b: hostileagent.OversizedFrame, startFails: true},
		{b: hostileagent.OversizedMessage},
		{b: hostileagent.ManyStreams},
		{b: hostileagent.PingFlood},
		{b: hostileagent.BogusOOM,
			during: func(t *testing.T, ctx context.Context, r *run) {
				waitFor(t, ctx, 30*time.Second, "an OOM event of the container", func() bool { return r.oom.count(r.id) > 0 })
			},
			after: func(t *testing.T, r *run) {
				// The burst, and what the rate let through while the guest sent its 5,000.
				if n := r.oom.count(r.id); n > 50 {
					t.Errorf("%d of the guest's %d OOM events of the container reached containerd, want at most 50", n, hostileagent.BogusOOMCount)
				}
			}},
		{b: hostileagent.WrongIDs,
			during: func(t *testing.T, ctx context.Context, r *run) {
				// The guest's last event is of its own container: once it is in, the
				// others were read before it.
				waitFor(t, ctx, 30*time.Second, "the OOM event of the container", func() bool { return r.oom.count(r.id) > 0 })
			},
			after: func(t *testing.T, r *run) {
				for _, other := range append([]string{r.runcID}, hostileagent.WrongIDTargets...) {
					if n := r.oom.count(other); n > 0 {
						t.Errorf("%d OOM events the guest made up for container %.64q, not its own, reached containerd", n, other)
					}
				}
			}},
		{b: hostileagent.BogusPids, during: func(t *testing.T, ctx context.Context, r *run) {
			checkPids(t, ctx, r)
		}},
	} {
		t.Run(string(tc.b), func(t *testing.T) {
			runCase(t, e, image, tc, &run{e: e, id: string(tc.b), oom: oom, runcID: runcC.ID()})
		})
	}

	if st, err := runcTask.Status(ctx); err != nil || st.Status != containerd.Running {
		t.Errorf("the runc container beside the hostile pods is %v (%v), want running", st.Status, err)
	}
	if n := oom.count(runcC.ID()); n > 0 {
		t.Errorf("%d OOM events of the runc container, which had none", n)
	}
}

// runCase runs one container against the behaviour and checks the bounds.
func runCase(t *testing.T, e *harness.Env, image containerd.Image, tc hostileCase, r *run) {
	ctx := e.Context(t)
	responsive := watchContainerd(t, e)
	c := newContainer(t, e, image, r.id, runtimeName, snapshotter)
	r.stdout = &countingWriter{}

	var task containerd.Task
	err := within(t, "Create", pod.BootTimeout+pod.SlowTimeout, func(ctx context.Context) (err error) {
		task, err = c.NewTask(ctx, cio.NewCreator(cio.WithStreams(nil, r.stdout, io.Discard)))
		return err
	})
	if err != nil {
		t.Fatalf("create: %v", err)
	}
	r.task = task
	shim := processWith(t, "containerd-shim-caisson-v2", "-id\x00"+r.id+"\x00")
	r.qemuPid = processWith(t, "qemu-system-x86_64", podid.StateDir(e.StateDir, harness.Namespace, r.id)+"/")
	rss := watchRSS(t, shim)

	exit, err := task.Wait(ctx)
	if err != nil {
		t.Fatal(err)
	}
	err = within(t, "Start", pod.ControlTimeout+slack, task.Start)
	switch {
	case tc.startFails && err == nil:
		t.Errorf("Start succeeded against a guest that %s", tc.b)
	case !tc.startFails && err != nil:
		t.Errorf("Start: %v", err)
	case err != nil:
		t.Logf("Start failed, as it should: %v", err)
	}
	if tc.during != nil {
		tc.during(t, ctx, r)
	}

	// Kill and delete, whatever state the behaviour left the task in.
	var st containerd.Status
	within(t, "Status", pod.ControlTimeout+slack, func(ctx context.Context) (err error) {
		st, err = task.Status(ctx)
		return err
	})
	if st.Status != containerd.Stopped {
		if err := within(t, "Kill", killBound, func(ctx context.Context) error { return task.Kill(ctx, syscall.SIGKILL) }); err != nil {
			t.Logf("Kill: %v", err)
		}
	}
	// Every case ends with the process exited: killed by the guest, or with its VM
	// (a guest that is silent or broke its connection, or went away).
	select {
	case s := <-exit:
		t.Logf("task exited %d", s.ExitCode())
	case <-time.After(killBound + drainTimeout):
		t.Errorf("no exit within %s of the kill", killBound+drainTimeout)
	}
	if err := within(t, "Delete", pod.SlowTimeout+slack, func(ctx context.Context) error {
		_, err := task.Delete(ctx)
		return err
	}); err != nil {
		t.Errorf("delete the task: %v", err)
	}
	growth := rss()
	t.Logf("shim RSS growth %d KiB", growth>>10)
	if growth > maxRSSGrowth {
		t.Errorf("the shim's RSS grew by %d MiB, over %d MiB", growth>>20, maxRSSGrowth>>20)
	}
	if err := c.Delete(ctx, containerd.WithSnapshotCleanup); err != nil {
		t.Errorf("delete the container: %v", err)
	}

	// Nothing left: the shim, QEMU, the pod's state directory.
	for _, p := range []struct {
		what string
		pid  int
	}{{"shim", shim}, {"qemu", r.qemuPid}} {
		waitFor(t, ctx, 30*time.Second, p.what+" to exit", func() bool { return syscall.Kill(p.pid, 0) != nil })
	}
	dir := podid.StateDir(e.StateDir, harness.Namespace, r.id)
	waitFor(t, ctx, 20*time.Second, "the pod's state to go", func() bool {
		_, err := os.Stat(dir)
		return os.IsNotExist(err)
	})
	if err := responsive(); err != nil {
		t.Errorf("containerd stopped answering while the guest %s: %v", tc.b, err)
	}
	if tc.after != nil {
		tc.after(t, r)
	}
}

// checkPids: containerd sees QEMU's pid for every process, never the pids the guest
// reports (1, the shim's own).
func checkPids(t *testing.T, ctx context.Context, r *run) {
	want := uint32(r.qemuPid)
	if got := r.task.Pid(); got != want {
		t.Errorf("task pid %d, want QEMU's %d", got, want)
	}
	resp, err := r.e.Client.TaskService().Get(ctx, &tasks.GetRequest{ContainerID: r.id})
	if err != nil {
		t.Fatal(err)
	}
	if got := resp.GetProcess().GetPid(); got != want {
		t.Errorf("task state pid %d, want QEMU's %d", got, want)
	}
	pids, err := r.task.Pids(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range pids {
		if p.Pid != want {
			t.Errorf("task pids %v, want only QEMU's %d", pids, want)
		}
	}
	spec, err := r.task.Spec(ctx)
	if err != nil {
		t.Fatal(err)
	}
	p, err := r.task.Exec(ctx, "bogus-exec", spec.Process, cio.NullIO)
	if err != nil {
		t.Fatal(err)
	}
	if err := p.Start(ctx); err != nil {
		t.Fatal(err)
	}
	if got := p.Pid(); got != want {
		t.Errorf("exec pid %d, want QEMU's %d", got, want)
	}
}

// within runs f with a context that outlives bound and fails t if f took longer.
func within(t *testing.T, what string, bound time.Duration, f func(context.Context) error) error {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), bound+30*time.Second)
	defer cancel()
	ctx = containerdNamespace(ctx)
	start := time.Now()
	err := f(ctx)
	if took := time.Since(start); took > bound {
		t.Errorf("%s took %s, over its bound of %s", what, took.Round(time.Millisecond), bound)
	}
	return err
}

func containerdNamespace(ctx context.Context) context.Context {
	return namespaces.WithNamespace(ctx, harness.Namespace)
}

// waitFor polls cond until it holds, failing t after limit.
func waitFor(t *testing.T, ctx context.Context, limit time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(limit)
	for !cond() {
		if time.Now().After(deadline) || ctx.Err() != nil {
			t.Errorf("waited %s for %s", limit, what)
			return
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// buildFakeQEMU builds ./fakeqemu as qemu-system-x86_64 (the harness's leak check knows
// QEMU processes by that name) in a directory of its own.
func buildFakeQEMU(t *testing.T) string {
	testutil.RequireRoot(t)
	dir := t.TempDir()
	// The shim may run QEMU as another user: the binary is readable by all.
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	bin := filepath.Join(dir, "qemu-system-x86_64")
	cmd := exec.Command("go", "build", "-o", bin, "./fakeqemu")
	cmd.Dir = filepath.Join(testutil.RepoRoot(t), "integration-tests", "hostile")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("build the fake QEMU: %v\n%s", err, out)
	}
	return bin
}

func newContainer(t *testing.T, e *harness.Env, image containerd.Image, id, runtime, snap string) containerd.Container {
	t.Helper()
	ctx := e.Context(t)
	c, err := e.Client.NewContainer(ctx, id,
		containerd.WithImage(image),
		containerd.WithSnapshotter(snap),
		containerd.WithNewSnapshot(id+"-rootfs", image),
		containerd.WithRuntime(runtime, nil),
		containerd.WithNewSpec(oci.WithImageConfig(image), oci.WithProcessArgs("sleep", "100000")))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Delete(context.WithoutCancel(ctx), containerd.WithSnapshotCleanup) })
	return c
}

// processWith finds the process whose argv[0] ends with name and whose command line
// contains arg.
func processWith(t *testing.T, name, arg string) int {
	t.Helper()
	entries, _ := os.ReadDir("/proc")
	for _, en := range entries {
		pid, err := strconv.Atoi(en.Name())
		if err != nil {
			continue
		}
		b, err := os.ReadFile(filepath.Join("/proc", en.Name(), "cmdline"))
		if err != nil {
			continue
		}
		argv0, _, _ := bytes.Cut(b, []byte{0})
		if filepath.Base(string(argv0)) == name && bytes.Contains(b, []byte(arg)) {
			return pid
		}
	}
	t.Fatalf("no %s process with %q", name, arg)
	return 0
}

// watchRSS samples pid's resident memory until the returned function is called, which
// returns the growth over the first sample.
func watchRSS(t *testing.T, pid int) func() int64 {
	first := rssOf(pid)
	if first == 0 {
		t.Fatalf("no VmRSS for shim %d", pid)
	}
	var peak atomic.Int64
	peak.Store(first)
	done := make(chan struct{})
	stopped := make(chan struct{})
	go func() {
		defer close(stopped)
		for {
			if v := rssOf(pid); v > peak.Load() {
				peak.Store(v)
			}
			select {
			case <-done:
				return
			case <-time.After(20 * time.Millisecond):
			}
		}
	}()
	return func() int64 {
		close(done)
		<-stopped
		return peak.Load() - first
	}
}

// rssOf is VmRSS of pid in bytes (0 if it is gone).
func rssOf(pid int) int64 {
	f, err := os.Open(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), "VmRSS:"); ok {
			kb, _ := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
			return kb << 10
		}
	}
	return 0
}

// watchContainerd asks containerd its version every 100 ms, each answer due within 5 s,
// until the returned function is called, which returns the first failure.
func watchContainerd(t *testing.T, e *harness.Env) func() error {
	ctx := e.Context(t)
	done := make(chan struct{})
	result := make(chan error, 1)
	go func() {
		var first error
		for {
			vctx, cancel := context.WithTimeout(ctx, 5*time.Second)
			_, err := e.Client.Version(vctx)
			cancel()
			if err != nil && first == nil {
				first = err
			}
			select {
			case <-done:
				result <- first
				return
			case <-time.After(100 * time.Millisecond):
			}
		}
	}()
	return func() error {
		close(done)
		return <-result
	}
}

// oomWatch counts containerd's TaskOOM events per container.
type oomWatch struct {
	mu     sync.Mutex
	counts map[string]int
}

func watchOOM(t *testing.T, e *harness.Env) *oomWatch {
	ctx, cancel := context.WithCancel(e.Context(t))
	t.Cleanup(cancel)
	w := &oomWatch{counts: map[string]int{}}
	envelopes, errs := e.Client.EventService().Subscribe(ctx, `topic=="/tasks/oom"`)
	go func() {
		for {
			select {
			case env := <-envelopes:
				v, err := typeurl.UnmarshalAny(env.Event)
				if err != nil {
					continue
				}
				if ev, ok := v.(*eventstypes.TaskOOM); ok {
					w.mu.Lock()
					w.counts[ev.ContainerID]++
					w.mu.Unlock()
				}
			case <-errs:
				return
			}
		}
	}()
	return w
}

func (w *oomWatch) count(id string) int {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.counts[id]
}

// countingWriter counts what it is given and keeps none of it.
type countingWriter struct{ n atomic.Int64 }

func (c *countingWriter) Write(p []byte) (int, error) {
	c.n.Add(int64(len(p)))
	return len(p), nil
}
