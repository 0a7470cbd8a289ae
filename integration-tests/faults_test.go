package integration

import (
	"bytes"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	containerd "github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/pkg/cio"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/containerd/v2/pkg/oci"
	"github.com/containerd/containerd/v2/pkg/shim"
	"github.com/opencontainers/runtime-spec/specs-go"

	"github.com/caisson-containers/caisson/integration-tests/harness"
)

// shimPid finds the shim serving container id.
func shimPid(t testing.TB, id string) int {
	t.Helper()
	entries, _ := os.ReadDir("/proc")
	for _, en := range entries {
		b, err := os.ReadFile(filepath.Join("/proc", en.Name(), "cmdline"))
		if err != nil {
			continue
		}
		args := bytes.Split(b, []byte{0})
		if filepath.Base(string(args[0])) != "containerd-shim-caisson-v2" {
			continue
		}
		for i, a := range args {
			if string(a) == "-id" && i+1 < len(args) && string(args[i+1]) == id {
				pid, _ := strconv.Atoi(en.Name())
				return pid
			}
		}
	}
	t.Fatalf("no shim for %s", id)
	return 0
}

// kill -9 of the shim: containerd sees the task exit, runs the shim's cleanup, and
// the VM and its state are gone.
func TestShimKilled(t *testing.T) {
	e := harness.Start(t, harness.Options{})
	image := e.ImportBusybox(t)
	ctx := e.Context(t)
	c := newContainer(t, e, image, "orphan", oci.WithProcessArgs("sleep", "100000"))
	var o outputs
	task, exit := startTask(t, ctx, c, &o)
	if len(e.QEMUs()) != 1 {
		t.Fatal("no VM")
	}
	killShim(t, ctx, e, c, task, exit)
}

// killShim kills the shim of c with SIGKILL, waits for containerd to report the task's
// exit, deletes task and container, and waits for the VM and the pod's state to go.
func killShim(t *testing.T, ctx context.Context, e *harness.Env, c containerd.Container, task containerd.Task, exit <-chan containerd.ExitStatus) {
	t.Helper()
	ns, _ := namespaces.Namespace(ctx)
	address, err := shim.ReadAddress(filepath.Join(e.Dir, "state", "io.containerd.runtime.v2.task", ns, c.ID(), "address"))
	if err != nil {
		t.Fatal(err)
	}
	socket := strings.TrimPrefix(address, "unix://")
	syscall.Kill(shimPid(t, c.ID()), syscall.SIGKILL)
	select {
	case st := <-exit:
		t.Logf("task exited %d after its shim was killed", st.ExitCode())
	case <-time.After(30 * time.Second):
		t.Fatal("containerd did not report the task's exit after its shim was killed")
	}
	task.Delete(ctx)
	if err := c.Delete(ctx, containerd.WithSnapshotCleanup); err != nil {
		t.Fatal(err)
	}
	waitNoQEMU(t, e)
	waitNoPodState(t, e)
	// The dead shim could not remove its socket; its cleanup (shim delete) does.
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(100 * time.Millisecond) {
		if _, err := os.Stat(socket); os.IsNotExist(err) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the dead shim's socket %s is left", socket)
		}
	}
}

// waitNoPodState waits for containerd's cleanup after a dead shim, which it runs
// asynchronously (`shim delete`), to remove the pod's state.
func waitNoPodState(t *testing.T, e *harness.Env) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		var left []string
		entries, _ := os.ReadDir(e.StateDir)
		for _, en := range entries {
			if en.Name() != "probes" {
				left = append(left, en.Name())
			}
		}
		if len(left) == 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("pod state left in %s: %v", e.StateDir, left)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// The agent is the guest's PID 1: the kernel does not deliver SIGKILL to it, and
// its death panics the guest kernel, which ends the VM (panic=-1, -no-reboot). This
// crashes the guest kernel outright, through sysrq from a privileged container, and
// checks that the pod's task exits and nothing is left behind.
func TestGuestCrash(t *testing.T) {
	e := harness.Start(t, harness.Options{})
	image := e.ImportBusybox(t)
	ctx := e.Context(t)
	c := newContainer(t, e, image, "crash", oci.WithProcessArgs("sleep", "100000"), oci.WithPrivileged)
	var o outputs
	task, exit := startTask(t, ctx, c, &o)
	spec, err := task.Spec(ctx)
	if err != nil {
		t.Fatal(err)
	}
	pspec := *spec.Process
	pspec.Args = []string{"sh", "-c", "echo c > /proc/sysrq-trigger"}
	p, err := task.Exec(ctx, "sysrq", &pspec, cio.NullIO)
	if err != nil {
		t.Fatal(err)
	}
	// The exec never returns: the guest dies under it.
	if err := p.Start(ctx); err != nil {
		t.Fatal(err)
	}
	select {
	case st := <-exit:
		if st.ExitCode() != 255 {
			t.Fatalf("task exited %d after the guest crashed, want 255 (its VM ended)", st.ExitCode())
		}
	case <-time.After(60 * time.Second):
		t.Fatal("the task did not exit after the guest kernel crashed")
	}
	task.Delete(ctx)
	if err := c.Delete(ctx, containerd.WithSnapshotCleanup); err != nil {
		t.Fatal(err)
	}
	waitNoQEMU(t, e)
}

// kill -9 of the shim of a container with a shared volume (a writable host directory):
// the cleanup of the dead shim's pod (containerd's `shim delete`) detaches the share
// before it removes the pod's state, so the volume keeps all its data, and no mount or
// virtiofsd of the pod is left.
func TestShimKilledWithVolume(t *testing.T) {
	e := harness.Start(t, harness.Options{})
	image := e.ImportBusybox(t)
	ctx := e.Context(t)
	vol := t.TempDir()
	if err := os.WriteFile(filepath.Join(vol, "precious"), []byte("keep"), 0o644); err != nil {
		t.Fatal(err)
	}
	c := newContainer(t, e, image, "orphan-vol",
		oci.WithMounts([]specs.Mount{{Type: "bind", Source: vol, Destination: "/vol", Options: []string{"rbind", "rw"}}}),
		oci.WithProcessArgs("sh", "-c", "echo from-guest > /vol/written && sleep 100000"))
	var o outputs
	task, exit := startTask(t, ctx, c, &o)
	deadline := time.Now().Add(30 * time.Second)
	for {
		if b, _ := os.ReadFile(filepath.Join(vol, "written")); string(b) == "from-guest\n" {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the container's write did not reach the volume")
		}
		time.Sleep(100 * time.Millisecond)
	}
	killShim(t, ctx, e, c, task, exit)
	for name, want := range map[string]string{"precious": "keep", "written": "from-guest\n"} {
		if b, err := os.ReadFile(filepath.Join(vol, name)); err != nil || string(b) != want {
			t.Errorf("volume file %s after the cleanup: %q, %v; want %q", name, b, err, want)
		}
	}
	if out, _ := exec.Command("pgrep", "-f", "virtiofsd.*"+e.StateDir).Output(); len(bytes.TrimSpace(out)) > 0 {
		t.Errorf("virtiofsd left: %s", out)
	}
}
