package container

import (
	"context"
	"os"
	"path/filepath"
	"testing"

	"github.com/containerd/errdefs"

	"github.com/caisson-containers/caisson/internal/testutil"
)

func TestWarmUp(t *testing.T) {
	if testing.Short() {
		t.Skip("runs containers; skipped with -short")
	}
	rt := newTestRuntime(t)
	bb := testutil.RequireBinary(t, "busybox")
	tmp := t.TempDir()
	t.Setenv("TMPDIR", tmp) // where WarmUp keeps its rootfs while it runs
	ctx := context.Background()

	// The process runs: busybox takes its applet from args[0], where it is mounted.
	for _, tc := range []struct {
		args   []string
		status int
	}{
		{[]string{"/bin/true"}, 0},
		{[]string{"/bin/false"}, 1},
		{[]string{"/sbin/sh", "-c", "echo > /x || exit 7"}, 7}, // a read-only rootfs
	} {
		exit, err := rt.WarmUp(ctx, bb, tc.args...)
		if err != nil {
			t.Fatalf("WarmUp %q: %v", tc.args, err)
		}
		if exit.Status != tc.status {
			t.Errorf("WarmUp %q: exit status %d, want %d", tc.args, exit.Status, tc.status)
		}
		// Nothing of it is left: the container, its state, its rootfs.
		if _, err := rt.Get(warmUpID); !errdefs.IsNotFound(err) {
			t.Errorf("after WarmUp %q: Get(%s) = %v, want NotFound", tc.args, warmUpID, err)
		}
		if fileExists(filepath.Join(rt.root, warmUpID)) {
			t.Errorf("after WarmUp %q: libcontainer's state of %s is left", tc.args, warmUpID)
		}
		if left, _ := os.ReadDir(tmp); len(left) != 0 {
			t.Errorf("after WarmUp %q: %s holds %v", tc.args, tmp, left)
		}
	}

	// A container runs as before after it.
	root := busyboxRootfs(t)
	c, err := rt.Create(ctx, CreateOpts{ID: "after", Spec: testSpec(root, "echo", "ok"), Rootfs: root, Stdio: Stdio{Stdout: true}})
	if err != nil {
		t.Fatal(err)
	}
	out := collect(c.Init())
	if err := c.Start(ctx); err != nil {
		t.Fatal(err)
	}
	<-out.done
	if e, _ := c.Init().Wait(ctx); e.Status != 0 || out.stdout.String() != "ok\n" {
		t.Errorf("container after the warm-up: exit %d, stdout %q", e.Status, out.stdout.String())
	}
	if _, err := rt.Delete(ctx, "after", false); err != nil {
		t.Fatal(err)
	}

	// Bad input, and a taken id.
	if _, err := rt.WarmUp(ctx, bb); !errdefs.IsInvalidArgument(err) {
		t.Errorf("WarmUp without args: %v, want InvalidArgument", err)
	}
	if _, err := rt.WarmUp(ctx, bb, "bin/true"); !errdefs.IsInvalidArgument(err) {
		t.Errorf("WarmUp with a relative path: %v, want InvalidArgument", err)
	}
	if err := rt.Reserve(warmUpID); err != nil {
		t.Fatal(err)
	}
	if _, err := rt.WarmUp(ctx, bb, "/bin/true"); !errdefs.IsAlreadyExists(err) {
		t.Errorf("WarmUp while %s is taken: %v, want AlreadyExists", warmUpID, err)
	}
	rt.Unreserve(warmUpID)
}
