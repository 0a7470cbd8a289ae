package snapshotter

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/containerd/containerd/v2/core/mount"

	"github.com/caisson-containers/caisson/snapshotter/snapshottest"
)

// TestCleanupOrphans plants what crashes leave behind — a half-created snapshot
// directory, a directory whose metadata is gone, a half-built layer, a writable
// image beside a committed layer, a commit mount — and checks that Cleanup
// removes exactly those.
func TestCleanupOrphans(t *testing.T) {
	requireHost(t)
	h := newHarness(t, t.TempDir())
	sn := h.newSnapshotter(nil)
	if err := h.unpack(sn, "base", "", h.addBlob(buildTar(t, []layerEntry{fileE("f", "f", 0o644, 0, 0)}))); err != nil {
		t.Fatal(err)
	}
	if _, err := sn.Prepare(h.ctx, "active", "base"); err != nil {
		t.Fatal(err)
	}
	baseDir, activeDir := sn.snapshotDir(h.idOf(sn, "base")), sn.snapshotDir(h.idOf(sn, "active"))
	write := func(p string) string {
		t.Helper()
		if err := os.MkdirAll(filepath.Dir(p), 0o700); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte("x"), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	orphans := []string{
		write(filepath.Join(sn.root, "snapshots", "new-123456", "x")),
		write(filepath.Join(sn.root, "snapshots", "999", "layer.erofs")),
		write(filepath.Join(baseDir, "rw.ext4")),
		write(filepath.Join(activeDir, "layer.erofs.tmp")),
	}
	keep := []string{
		filepath.Join(baseDir, "layer.erofs"),
		write(filepath.Join(activeDir, "rw.ext4")),
	}
	stale := filepath.Join(sn.root, "mnt", "42")
	if err := os.MkdirAll(stale, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := mount.All([]mount.Mount{{Type: "tmpfs", Source: "tmpfs", Options: []string{"size=1m"}}}, stale); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { mount.UnmountAll(stale, 0) })

	if err := sn.Cleanup(h.ctx); err != nil {
		t.Fatal(err)
	}
	for _, p := range append(orphans, stale) {
		if _, err := os.Stat(p); !os.IsNotExist(err) {
			t.Errorf("%s survived Cleanup (%v)", p, err)
		}
	}
	for _, p := range keep {
		if _, err := os.Stat(p); err != nil {
			t.Errorf("Cleanup removed %s: %v", p, err)
		}
	}
	checkConsistent(t, h, sn, "active", "base")
}

// TestCleanupDuringCommit runs Cleanup over and over while a Commit builds its
// layer: the commit's mount and half-built image are not orphans.
func TestCleanupDuringCommit(t *testing.T) {
	requireHost(t)
	h := newHarness(t, t.TempDir())
	sn := h.newSnapshotter(nil)
	entries := []layerEntry{dirE("d", 0o755, 0, 0)}
	for i := range 2000 {
		entries = append(entries, fileE(fmt.Sprintf("d/f%04d", i), strings.Repeat("y", i), 0o644, 0, 0))
	}
	mounts, err := sn.Prepare(h.ctx, "active", "")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := h.applier.Apply(h.ctx, h.addBlob(buildTar(t, entries)), mounts); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- sn.Commit(h.ctx, "c", "active") }()
	for running := true; running; {
		select {
		case err := <-done:
			if err != nil {
				t.Fatalf("commit alongside Cleanup: %v", err)
			}
			running = false
		default:
			if err := sn.Cleanup(h.ctx); err != nil {
				t.Fatal(err)
			}
		}
	}
	h.withLayerImage(sn, "c", func(root string) {
		if err := snapshottest.Check(root, expectAll(entries)); err != nil {
			t.Error(err)
		}
	})
	checkConsistent(t, h, sn, "c")
}
