package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/core/mount/manager"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/errdefs"
	bolt "go.etcd.io/bbolt"
)

// mountManager is containerd's mount manager over a bolt db in dir, allowed to
// create writable images under dir.
func mountManager(t *testing.T, dir string) mount.Manager {
	t.Helper()
	if err := os.MkdirAll(filepath.Join(dir, "mm", "t"), 0o700); err != nil {
		t.Fatal(err)
	}
	db, err := bolt.Open(filepath.Join(dir, "mm", "mounts.db"), 0o600, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	mm, err := manager.NewManager(db, filepath.Join(dir, "mm", "t"), manager.WithAllowedRoot(dir))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { mm.(io.Closer).Close() })
	return mm
}

// withMounted activates and mounts ms on a temporary directory for fn.
func withMounted(t *testing.T, ctx context.Context, mm mount.Manager, dir string, ms []mount.Mount, fn func(root string)) {
	t.Helper()
	target, err := os.MkdirTemp(dir, "m-")
	if err != nil {
		t.Fatal(err)
	}
	defer os.Remove(target)
	system := ms
	if ai, err := mm.Activate(ctx, filepath.Base(target), ms); err == nil {
		system = ai.System
		defer mm.Deactivate(ctx, filepath.Base(target))
	} else if !errdefs.IsNotImplemented(err) { // nothing for the manager to do
		t.Fatal(err)
	}
	if err := mount.All(system, target); err != nil {
		t.Fatal(err)
	}
	defer mount.UnmountAll(target, 0)
	fn(target)
}

// TestKillDuringCommit kills the daemon with SIGKILL while mkfs.erofs is building
// a layer. After a restart the snapshot is still active and intact, the
// half-built image and the commit mount are gone (Cleanup at start), and the
// same Commit then succeeds.
func TestKillDuringCommit(t *testing.T) {
	buildDaemon(t)
	dir := t.TempDir()
	root := filepath.Join(dir, "root")
	sock := filepath.Join(dir, "s.sock")
	ctx := namespaces.WithNamespace(context.Background(), "test")
	mm := mountManager(t, dir)
	// Runs last: whatever a failed run left mounted under the root (the killed
	// daemon's commit mount) goes, so its loop device is freed.
	t.Cleanup(func() { unmountUnder(t, root) })

	d := startDaemon(t, root, sock, writeConfig(t, dir, "1GiB"))
	t.Cleanup(func() {
		if d != nil {
			d.kill()
		}
	})
	sn := d.snapshotter()
	mounts, err := sn.Prepare(ctx, "active", "")
	if err != nil {
		t.Fatal(err)
	}
	big := make([]byte, 48<<20)
	rand.Read(big)
	withMounted(t, ctx, mm, dir, mounts, func(r string) {
		for i := range 4 {
			if err := os.WriteFile(filepath.Join(r, fmt.Sprintf("big%d", i)), big, 0o644); err != nil {
				t.Fatal(err)
			}
		}
		for i := range 3000 {
			if err := os.WriteFile(filepath.Join(r, fmt.Sprintf("small%04d", i)), []byte("s"), 0o644); err != nil {
				t.Fatal(err)
			}
		}
	})

	commitErr := make(chan error, 1)
	go func() { commitErr <- sn.Commit(ctx, "committed", "active") }()
	deadline := time.Now().Add(60 * time.Second)
	for {
		tmp, _ := filepath.Glob(filepath.Join(root, "snapshots", "*", "layer.erofs.tmp"))
		if len(tmp) > 0 {
			break
		}
		select {
		case err := <-commitErr:
			t.Fatalf("commit finished (%v) before the kill: make the layer bigger", err)
		case <-time.After(5 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			t.Fatal("no layer image was being built")
		}
	}
	d.kill()
	d = nil
	if err := <-commitErr; err == nil {
		t.Fatal("commit succeeded although the daemon was killed during it")
	}
	time.Sleep(100 * time.Millisecond) // mkfs.erofs gets SIGKILL from its dead parent
	if procs := processesMentioning(t, root); len(procs) > 0 {
		t.Fatalf("processes left working in the root after the kill: %v", procs)
	}
	if leftovers, _ := filepath.Glob(filepath.Join(root, "snapshots", "*", "layer.erofs.tmp")); len(leftovers) == 0 {
		t.Log("the kill left no half-built image (mkfs.erofs had finished)")
	}

	d = startDaemon(t, root, sock, writeConfig(t, dir, "1GiB"))
	sn = d.snapshotter()
	if info, err := sn.Stat(ctx, "active"); err != nil || info.Kind != snapshots.KindActive {
		t.Fatalf("after restart: %v %v, want the snapshot still active", info.Kind, err)
	}
	if _, err := sn.Stat(ctx, "committed"); err == nil {
		t.Fatal("the interrupted commit is visible after restart")
	}
	if leftovers, _ := filepath.Glob(filepath.Join(root, "snapshots", "*", "*.tmp")); len(leftovers) > 0 {
		t.Errorf("half-built images after restart: %v", leftovers)
	}
	if mi, _ := os.ReadFile("/proc/self/mountinfo"); bytes.Contains(mi, []byte(root+"/")) {
		t.Error("the killed commit's mount is still there after restart")
	}

	if err := sn.Commit(ctx, "committed", "active"); err != nil {
		t.Fatal(err)
	}
	vm, err := sn.View(ctx, "view", "committed")
	if err != nil {
		t.Fatal(err)
	}
	withMounted(t, ctx, mm, dir, vm, func(r string) {
		got, err := os.ReadFile(filepath.Join(r, "big3"))
		if err != nil || !bytes.Equal(got, big) {
			t.Errorf("big3 after the retried commit: %v (equal %v)", err, bytes.Equal(got, big))
		}
		entries, _ := os.ReadDir(r)
		if len(entries) != 3004 {
			t.Errorf("%d entries in the layer, want 3004", len(entries))
		}
	})
	for _, k := range []string{"view", "committed"} {
		if err := sn.Remove(ctx, k); err != nil {
			t.Fatal(err)
		}
	}
	if err := d.stop(); err != nil {
		t.Fatal(err)
	}
	d = nil
	if left, _ := os.ReadDir(filepath.Join(root, "snapshots")); len(left) > 0 {
		t.Errorf("snapshot directories left after removing everything: %v", left)
	}
}

// processesMentioning lists processes whose command line contains s.
func processesMentioning(t *testing.T, s string) []string {
	t.Helper()
	var out []string
	pids, _ := filepath.Glob("/proc/[0-9]*/cmdline")
	for _, p := range pids {
		b, err := os.ReadFile(p)
		if err != nil {
			continue
		}
		cmd := strings.ReplaceAll(string(b), "\x00", " ")
		if strings.Contains(cmd, s) && !strings.Contains(cmd, ".test") {
			out = append(out, cmd)
		}
	}
	return out
}

// unmountUnder unmounts every mount point below dir, deepest first.
func unmountUnder(t *testing.T, dir string) {
	mi, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return
	}
	var points []string
	for _, line := range strings.Split(string(mi), "\n") {
		f := strings.Fields(line)
		if len(f) > 4 && strings.HasPrefix(f[4], dir+"/") {
			points = append(points, f[4])
		}
	}
	for i := len(points) - 1; i >= 0; i-- {
		if err := mount.UnmountAll(points[i], 0); err != nil {
			t.Errorf("unmount %s: %v", points[i], err)
		}
	}
}

// TestSIGTERMDuringCommit: a SIGTERM while a Commit runs lets it finish; then
// the daemon exits 0 and removes its socket.
func TestSIGTERMDuringCommit(t *testing.T) {
	buildDaemon(t)
	dir := t.TempDir()
	root := filepath.Join(dir, "root")
	sock := filepath.Join(dir, "s.sock")
	ctx := namespaces.WithNamespace(context.Background(), "test")
	mm := mountManager(t, dir)
	t.Cleanup(func() { unmountUnder(t, root) })

	d := startDaemon(t, root, sock, writeConfig(t, dir, "1GiB"))
	sn := d.snapshotter()
	mounts, err := sn.Prepare(ctx, "active", "")
	if err != nil {
		d.kill()
		t.Fatal(err)
	}
	big := make([]byte, 48<<20)
	rand.Read(big)
	withMounted(t, ctx, mm, dir, mounts, func(r string) {
		for i := range 4 {
			if err := os.WriteFile(filepath.Join(r, fmt.Sprintf("big%d", i)), big, 0o644); err != nil {
				t.Fatal(err)
			}
		}
	})
	commitErr := make(chan error, 1)
	go func() { commitErr <- sn.Commit(ctx, "committed", "active") }()
	deadline := time.Now().Add(60 * time.Second)
	for {
		if tmp, _ := filepath.Glob(filepath.Join(root, "snapshots", "*", "layer.erofs.tmp")); len(tmp) > 0 {
			break
		}
		if time.Now().After(deadline) {
			d.kill()
			t.Fatal("no layer image was being built")
		}
		time.Sleep(5 * time.Millisecond)
	}
	if err := d.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if err := <-commitErr; err != nil {
		t.Fatalf("commit interrupted by SIGTERM: %v", err)
	}
	if err := d.stop(); err != nil { // already stopping: this waits for the exit
		t.Fatal(err)
	}
	layers, _ := filepath.Glob(filepath.Join(root, "snapshots", "*", "layer.erofs"))
	if len(layers) != 1 {
		t.Fatalf("layer images after the stop: %v", layers)
	}
}
