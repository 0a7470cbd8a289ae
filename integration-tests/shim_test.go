package integration

import (
	"bytes"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	containerd "github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/pkg/cio"
	"github.com/containerd/containerd/v2/pkg/oci"

	"github.com/caisson-containers/caisson/integration-tests/harness"
	"github.com/caisson-containers/caisson/internal/testutil"
	"github.com/caisson-containers/caisson/shim/config"
)

const (
	runtimeName  = "io.containerd.caisson.v2"
	snapshotter  = "caisson"
	guestRelease = "6.1.0-56-cloud-amd64"
)

// ctr is the real ctr binary against the test's containerd.
func ctr(t *testing.T, e *harness.Env, args ...string) (string, int) {
	t.Helper()
	bin := testutil.RequireBinary(t, "ctr")
	cmd := exec.Command(bin, append([]string{"--address", e.Address, "--namespace", harness.Namespace}, args...)...)
	var out, errOut bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errOut
	err := cmd.Run()
	code := 0
	if ee, ok := err.(*exec.ExitError); ok {
		code = ee.ExitCode()
	} else if err != nil {
		t.Fatalf("ctr %v: %v", args, err)
	}
	if code != 0 || t.Failed() {
		t.Logf("ctr %v stderr:\n%s", args, errOut.String())
	}
	return out.String(), code
}

func TestCtrRunShowsTheGuestKernel(t *testing.T) {
	e := harness.Start(t, harness.Options{})
	e.ImportBusybox(t)
	out, code := ctr(t, e, "run", "--rm", "--runtime", runtimeName, "--snapshotter", snapshotter, harness.BusyboxRef, "uname", "uname", "-r")
	if code != 0 {
		t.Fatalf("ctr run exited %d:\n%s", code, out)
	}
	host, _ := exec.Command("uname", "-r").Output()
	if got := strings.TrimSpace(out); got != guestRelease || got == strings.TrimSpace(string(host)) {
		t.Fatalf("uname -r in the container = %q, want the guest's %q (host: %q)", got, guestRelease, strings.TrimSpace(string(host)))
	}
	out, code = ctr(t, e, "run", "--rm", "--runtime", runtimeName, "--snapshotter", snapshotter, harness.BusyboxRef, "exit3", "sh", "-c", "echo bye; exit 3")
	if code != 3 || !strings.Contains(out, "bye") {
		t.Fatalf("ctr run of `exit 3` exited %d, want 3:\n%s", code, out)
	}
}

// newContainer creates a container on the busybox image with the caisson runtime and snapshotter.
func newContainer(t *testing.T, e *harness.Env, image containerd.Image, id string, opts ...oci.SpecOpts) containerd.Container {
	t.Helper()
	return newContainerOn(t, e, image, caissonRuntime, id, opts...)
}

type outputs struct{ stdout, stderr syncBuffer }

// syncBuffer is a bytes.Buffer safe for concurrent writers.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

func startTask(t *testing.T, ctx context.Context, c containerd.Container, o *outputs) (containerd.Task, <-chan containerd.ExitStatus) {
	t.Helper()
	task, err := c.NewTask(ctx, cio.NewCreator(cio.WithStreams(nil, &o.stdout, &o.stderr)))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { task.Delete(context.WithoutCancel(ctx), containerd.WithProcessKill) })
	exit, err := task.Wait(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := task.Start(ctx); err != nil {
		t.Fatal(err)
	}
	return task, exit
}

func execIn(t *testing.T, ctx context.Context, task containerd.Task, id string, terminal bool, args ...string) (string, uint32) {
	t.Helper()
	spec, err := task.Spec(ctx)
	if err != nil {
		t.Fatal(err)
	}
	pspec := *spec.Process
	pspec.Args = args
	pspec.Terminal = terminal
	var out syncBuffer // stdout and stderr are copied concurrently
	opts := []cio.Opt{cio.WithStreams(nil, &out, &out)}
	if terminal {
		opts = append(opts, cio.WithTerminal)
	}
	p, err := task.Exec(ctx, id, &pspec, cio.NewCreator(opts...))
	if err != nil {
		t.Fatalf("exec %s: %v", id, err)
	}
	defer p.Delete(ctx)
	exit, err := p.Wait(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := p.Start(ctx); err != nil {
		t.Fatalf("start exec %s: %v", id, err)
	}
	if terminal {
		if err := p.Resize(ctx, 123, 45); err != nil {
			t.Fatalf("resize: %v", err)
		}
	}
	st := <-exit
	p.IO().Wait()
	return out.String(), st.ExitCode()
}

func dirSize(t *testing.T, dir string) int64 {
	var n int64
	filepath.Walk(dir, func(_ string, info os.FileInfo, err error) error {
		if err == nil && info.Mode().IsRegular() {
			if st, ok := info.Sys().(*syscall.Stat_t); ok {
				n += st.Blocks * 512
			}
		}
		return nil
	})
	return n
}

func TestTaskLifecycle(t *testing.T) {
	e := harness.Start(t, harness.Options{})
	image := e.ImportBusybox(t)
	ctx := e.Context(t)
	before := dirSize(t, e.StateDir)

	c := newContainer(t, e, image, "life", oci.WithProcessArgs("sh", "-c", "echo started; exec sleep 1000"))
	var o outputs
	task, exit := startTask(t, ctx, c, &o)

	out, code := execIn(t, ctx, task, "plain", false, "sh", "-c", "echo out; echo err >&2; exit 4")
	if code != 4 || !strings.Contains(out, "out") || !strings.Contains(out, "err") {
		t.Fatalf("exec: code %d, output %q", code, out)
	}
	out, code = execIn(t, ctx, task, "tty", true, "sh", "-c", "sleep 0.5; stty size; tty")
	if code != 0 || !strings.Contains(out, "45 123") || !strings.Contains(out, "/dev/pts/") {
		t.Fatalf("tty exec: code %d, output %q (want the resized 45 123 and a pts)", code, out)
	}
	mounts, _ := execIn(t, ctx, task, "mounts", false, "cat", "/proc/mounts")
	var root string
	for _, l := range strings.Split(mounts, "\n") {
		if f := strings.Fields(l); len(f) > 1 && f[1] == "/" {
			root = l
		}
	}
	if !strings.HasPrefix(root, "overlay / overlay") || !strings.Contains(root, "lowerdir=") || !strings.Contains(root, "upperdir=") {
		t.Fatalf("the rootfs is not an overlay: %q\n%s", root, mounts)
	}
	layerFile, _ := execIn(t, ctx, task, "layer", false, "cat", "/etc/caisson-layer")
	if strings.TrimSpace(layerFile) != "second layer" {
		t.Fatalf("file of the top layer: %q", layerFile)
	}
	// The layers are attached devices: with DAX (the default), the two EROFS layers are
	// virtio-pmem devices and the writable image a virtio-blk disk; the overlay's lower
	// and upper directories are the storages the shim named after those files. (The
	// third pmem device is the guest's kernel modules image, docs/guest.md.)
	checkDevices(t, ctx, task, 2+1, 1)
	if n := strings.Count(root, "/run/caisson/storage/"); n != 4 { // 2 lowers, upper, work
		t.Errorf("overlay names %d storage directories, want 4: %s", n, root)
	}

	// No image data was copied: the state dir grew by at most 1 MiB.
	if grew := dirSize(t, e.StateDir) - before; grew > 1<<20 {
		t.Errorf("state dir grew by %d bytes for one container, want ≤ 1 MiB", grew)
	}

	if err := task.Kill(ctx, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	select {
	case st := <-exit:
		if st.ExitCode() != 137 {
			t.Fatalf("killed task exited %d, want 137", st.ExitCode())
		}
	case <-time.After(30 * time.Second):
		t.Fatal("the killed task did not exit")
	}
	if !strings.Contains(o.stdout.String(), "started") {
		t.Errorf("init output %q lacks 'started'", o.stdout.String())
	}
	if _, err := task.Delete(ctx); err != nil {
		t.Fatal(err)
	}
	if err := c.Delete(ctx, containerd.WithSnapshotCleanup); err != nil {
		t.Fatal(err)
	}
	waitNoQEMU(t, e)
}

// waitNoQEMU waits for the pod VMs of the environment to be gone.
func waitNoQEMU(t *testing.T, e *harness.Env) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for time.Now().Before(deadline) {
		if len(e.QEMUs()) == 0 {
			return
		}
		time.Sleep(100 * time.Millisecond)
	}
	t.Fatalf("QEMU still running: %v", e.QEMUs())
}

// A pod made with containerd's client and the CRI annotations: pause first, then
// two containers in the same VM, each with its own rootfs.
func TestPodContainersShareOneVM(t *testing.T) {
	e := harness.Start(t, harness.Options{})
	image := e.ImportBusybox(t)
	ctx := e.Context(t)
	const pod = "pod1"
	pause := newContainer(t, e, image, pod, oci.WithProcessArgs("sleep", "100000"),
		oci.WithAnnotations(map[string]string{"io.kubernetes.cri.container-type": "sandbox", "io.kubernetes.cri.sandbox-id": pod}))
	var po outputs
	startTask(t, ctx, pause, &po)

	var tasks []containerd.Task
	for _, id := range []string{"app1", "app2"} {
		c := newContainer(t, e, image, id, oci.WithProcessArgs("sh", "-c", "echo "+id+" > /mine; exec sleep 100000"),
			oci.WithAnnotations(map[string]string{"io.kubernetes.cri.container-type": "container", "io.kubernetes.cri.sandbox-id": pod}))
		var o outputs
		task, _ := startTask(t, ctx, c, &o)
		tasks = append(tasks, task)
	}
	if pids := e.QEMUs(); len(pids) != 1 {
		t.Fatalf("%d QEMU processes for one pod, want 1: %v", len(pids), pids)
	}
	for i, task := range tasks {
		out, code := execIn(t, ctx, task, "cat", false, "sh", "-c", "sleep 0.2; cat /mine; uname -r")
		want := []string{"app1", "app2"}[i]
		if code != 0 || !strings.Contains(out, want) || strings.Contains(out, []string{"app2", "app1"}[i]) || !strings.Contains(out, guestRelease) {
			t.Fatalf("container %s sees %q (code %d): want its own /mine and the guest kernel", want, out, code)
		}
	}
}

// kill -9 of QEMU: every task of the pod exits, and nothing is left after delete.
func TestQEMUKilled(t *testing.T) {
	e := harness.Start(t, harness.Options{})
	image := e.ImportBusybox(t)
	ctx := e.Context(t)
	c := newContainer(t, e, image, "victim", oci.WithProcessArgs("sleep", "100000"))
	var o outputs
	task, exit := startTask(t, ctx, c, &o)
	pids := e.QEMUs()
	if len(pids) != 1 {
		t.Fatalf("QEMU processes: %v", pids)
	}
	var pid int
	for _, ch := range pids[0] {
		pid = pid*10 + int(ch-'0')
	}
	syscall.Kill(pid, syscall.SIGKILL)
	select {
	case st := <-exit:
		t.Logf("task exited %d after QEMU was killed", st.ExitCode())
		if st.ExitCode() == 0 {
			t.Fatal("task reported success after its VM was killed")
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the task did not exit after its VM was killed")
	}
	if _, err := task.Delete(ctx); err != nil {
		t.Fatal(err)
	}
	if err := c.Delete(ctx, containerd.WithSnapshotCleanup); err != nil {
		t.Fatal(err)
	}
	waitNoQEMU(t, e)
}

// checkDevices counts the guest's pmem and virtio-blk devices, which a container sees in /sys/block.
func checkDevices(t *testing.T, ctx context.Context, task containerd.Task, wantPmem, wantBlk int) {
	t.Helper()
	out, _ := execIn(t, ctx, task, "devices-"+strconv.Itoa(wantPmem), false, "ls", "/sys/block")
	pmem, blk := 0, 0
	for _, d := range strings.Fields(out) {
		switch {
		case strings.HasPrefix(d, "pmem"):
			pmem++
		case strings.HasPrefix(d, "vd"):
			blk++
		}
	}
	if pmem != wantPmem || blk != wantBlk {
		t.Fatalf("guest block devices %q: %d pmem and %d virtio-blk, want %d and %d", out, pmem, blk, wantPmem, wantBlk)
	}
}

// With storage.dax = false every layer is a read-only virtio-blk disk.
func TestLayersOnVirtioBlkWithoutDAX(t *testing.T) {
	e := harness.Start(t, harness.Options{Runtime: func(c *config.Config) { c.Storage.DAX = false }})
	image := e.ImportBusybox(t)
	ctx := e.Context(t)
	c := newContainer(t, e, image, "nodax", oci.WithProcessArgs("sleep", "100000"))
	var o outputs
	task, _ := startTask(t, ctx, c, &o)
	checkDevices(t, ctx, task, 0, 3+1) // and the kernel modules image
	out, code := execIn(t, ctx, task, "layer", false, "cat", "/etc/caisson-layer")
	if code != 0 || strings.TrimSpace(out) != "second layer" {
		t.Fatalf("reading the top layer: %q (%d)", out, code)
	}
}
