package snapshotter

import (
	"archive/tar"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/errdefs"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"golang.org/x/sys/unix"

	"github.com/caisson-containers/caisson/snapshotter/snapshottest"
)

// checkConsistent asserts that the snapshotter's metadata lists exactly want
// (keys), that every snapshot directory belongs to one of them, and that nothing
// is left mounted under its root.
func checkConsistent(t *testing.T, h *harness, sn *Snapshotter, want ...string) {
	t.Helper()
	if err := sn.Cleanup(h.ctx); err != nil {
		t.Errorf("cleanup: %v", err)
	}
	var got []string
	if err := sn.Walk(h.ctx, func(ctx context.Context, info snapshots.Info) error {
		got = append(got, info.Name)
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	if strings.Join(got, ",") != strings.Join(want, ",") {
		t.Errorf("snapshots %v, want %v", got, want)
	}
	ids := map[string]bool{}
	for _, k := range want {
		ids[h.idOf(sn, k)] = true
	}
	dirs, err := os.ReadDir(filepath.Join(sn.root, "snapshots"))
	if err != nil {
		t.Fatal(err)
	}
	for _, d := range dirs {
		if !ids[d.Name()] {
			t.Errorf("orphan snapshot directory %s after Cleanup", d.Name())
		}
		files, _ := os.ReadDir(filepath.Join(sn.root, "snapshots", d.Name()))
		for _, f := range files {
			if strings.HasSuffix(f.Name(), ".tmp") {
				t.Errorf("half-built image %s/%s after Cleanup", d.Name(), f.Name())
			}
		}
	}
	mounts, _ := os.ReadFile("/proc/self/mountinfo")
	if strings.Contains(string(mounts), sn.root+"/") {
		t.Errorf("something is still mounted under %s", sn.root)
	}
}

// TestEscapingTar: entries that climb out with ../, write through a symlink
// pointing outside, or hardlink to something outside or missing. Caisson's differ
// refuses them with an InvalidArgument error naming the entry; the snapshot stays
// active, holds nothing, and is removable. containerd's differ (the fallback)
// resolves every path as if the layer's root were / (fs.RootPath), so they land
// inside the layer. Either way nothing is written outside it.
func TestEscapingTar(t *testing.T) {
	requireHost(t)
	outside := t.TempDir() // an absolute host path an entry tries to reach
	rel := strings.Repeat("../", 20) + strings.TrimPrefix(outside, "/")
	for _, tc := range []struct {
		name    string
		entries []layerEntry
		bad     string // the entry Caisson's differ names
	}{
		{
			name:    "dotdot",
			entries: []layerEntry{fileE(rel+"/pwned", "x", 0o644, 0, 0)},
			bad:     rel + "/pwned",
		},
		{
			name: "absolute symlink",
			entries: []layerEntry{
				symlinkE("evil", outside),
				fileE("evil/pwned", "x", 0o644, 0, 0),
			},
			bad: "evil/pwned",
		},
		{
			name: "relative symlink",
			entries: []layerEntry{
				dirE("d", 0o755, 0, 0),
				symlinkE("d/evil", rel),
				fileE("d/evil/pwned", "x", 0o644, 0, 0),
			},
			bad: "d/evil/pwned",
		},
		{
			name: "hardlink out",
			entries: []layerEntry{
				linkE("pwned", rel+"/../../etc/passwd", 0o644, 0, 0),
			},
			bad: "pwned",
		},
		{
			name: "hardlink to nothing",
			entries: []layerEntry{
				dirE("d", 0o755, 0, 0),
				linkE("d/pwned", "d/missing", 0o644, 0, 0),
			},
			bad: "d/pwned",
		},
		{
			name: "below a file",
			entries: []layerEntry{
				fileE("f", "x", 0o644, 0, 0),
				fileE("f/pwned", "x", 0o644, 0, 0),
			},
			bad: "f/pwned",
		},
	} {
		t.Run(tc.name+"/caisson", func(t *testing.T) {
			h := newHarness(t, t.TempDir())
			sn := h.newSnapshotter(nil)
			desc := h.addBlob(buildTar(t, tc.entries))
			mounts, err := sn.Prepare(h.ctx, "active", "")
			if err != nil {
				t.Fatal(err)
			}
			_, err = h.applier.Apply(h.ctx, desc, mounts)
			if !errdefs.IsInvalidArgument(err) || !strings.Contains(err.Error(), fmt.Sprintf("%q", tc.bad)) {
				t.Fatalf("apply: got %v, want an InvalidArgument error naming %q", err, tc.bad)
			}
			t.Log(err)
			assertNothingOutside(t, outside)
			if info, err := sn.Stat(h.ctx, "active"); err != nil || info.Kind != snapshots.KindActive {
				t.Fatalf("after the failed apply: %v %v, want the snapshot still active", info.Kind, err)
			}
			files, _ := os.ReadDir(sn.snapshotDir(h.idOf(sn, "active")))
			if len(files) != 0 {
				t.Errorf("the failed apply left %v in the snapshot directory", files)
			}
			if err := sn.Remove(h.ctx, "active"); err != nil {
				t.Fatal(err)
			}
			checkConsistent(t, h, sn)
		})
		t.Run(tc.name+"/walking", func(t *testing.T) {
			h := newHarness(t, t.TempDir())
			sn := h.newSnapshotter(nil)
			desc := h.addBlob(buildTar(t, tc.entries))
			err := h.unpackWith(h.walking, sn, "l", "", desc, desc.Digest)
			t.Logf("unpack: %v", err)
			assertNothingOutside(t, outside)
			if err != nil {
				checkConsistent(t, h, sn)
				return
			}
			// Confined: what it wrote is inside the layer, at the path it
			// names when / is the layer's root.
			h.withLayerImage(sn, "l", func(root string) {
				found := false
				filepath.WalkDir(root, func(p string, d os.DirEntry, err error) error {
					if err == nil && d.Name() == "pwned" {
						found = true
					}
					return nil
				})
				if !found && !strings.HasPrefix(tc.name, "hardlink") {
					t.Error("the confined entry is not in the layer")
				}
			})
			checkConsistent(t, h, sn, "l")
		})
	}
}

func assertNothingOutside(t *testing.T, outside string) {
	t.Helper()
	if _, err := os.Lstat(filepath.Join(outside, "pwned")); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("the tar wrote outside the layer: %v", err)
	}
	if entries, _ := os.ReadDir(outside); len(entries) != 0 {
		t.Fatalf("the tar wrote outside the layer: %v", entries)
	}
}

// TestTruncatedTar: a layer cut in the middle of a file fails to apply; one cut
// at a header boundary reads as a shorter, valid tar and is caught by the diff id
// check, as containerd's unpacker does. Either way no snapshot is left.
func TestTruncatedTar(t *testing.T) {
	requireHost(t)
	entries := []layerEntry{
		dirE("d", 0o755, 0, 0),
		fileE("d/a", strings.Repeat("a", 10000), 0o644, 0, 0),
		fileE("d/b", strings.Repeat("b", 10000), 0o644, 0, 0),
	}
	full := buildTar(t, entries)
	// Where d/b's header starts: the first two entries without the
	// end-of-archive blocks.
	boundary := len(buildTar(t, entries[:2])) - 1024
	for _, tc := range []struct {
		name string
		cut  int
		want string
	}{
		{"mid file", boundary - 4000, "unexpected EOF"},
		{"at a header", boundary, "wrong diff id"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := newHarness(t, t.TempDir())
			sn := h.newSnapshotter(nil)
			err := h.unpackDiffID(sn, "l", "", h.addBlob(full[:tc.cut]), digest.FromBytes(full))
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("got %v, want an error with %q", err, tc.want)
			}
			checkConsistent(t, h, sn)
		})
	}
}

// TestDiskFullDuringCommit puts the root on a small tmpfs: the staged layer fits,
// the EROFS image beside it does not. Commit fails with ENOSPC, the snapshot
// stays active and intact, nothing half-built remains, and once space is freed
// the same Commit succeeds.
func TestDiskFullDuringCommit(t *testing.T) {
	h, sn, root := smallRootSnapshotter(t, "80m")
	entries, desc := bigLayer(t, h)

	mounts, err := sn.Prepare(h.ctx, "active", "")
	if err != nil {
		t.Fatal(err)
	}
	// containerd's differ: the layer is staged in the writable image and
	// built by Commit.
	if _, err := h.walking.Apply(h.ctx, desc, mounts); err != nil {
		t.Fatal(err)
	}
	err = sn.Commit(h.ctx, "committed", "active")
	if !errors.Is(err, unix.ENOSPC) || !errdefs.IsResourceExhausted(err) {
		t.Fatalf("commit on a full disk: got %v, want a no-space error", err)
	}
	t.Log(err)
	if info, err := sn.Stat(h.ctx, "active"); err != nil || info.Kind != snapshots.KindActive {
		t.Fatalf("after the failed commit: %v %v, want the snapshot still active", info.Kind, err)
	}
	checkConsistent(t, h, sn, "active")

	// Grow the filesystem and retry the same Commit.
	if err := unix.Mount("tmpfs", root, "tmpfs", unix.MS_REMOUNT, "size=200m"); err != nil {
		t.Fatal(err)
	}
	if err := sn.Commit(h.ctx, "committed", "active"); err != nil {
		t.Fatal(err)
	}
	h.withLayerImage(sn, "committed", func(root string) {
		if err := snapshottest.Check(root, expectAll(entries)); err != nil {
			t.Error(err)
		}
	})
	checkConsistent(t, h, sn, "committed")
}

// TestDiskFullDuringApply: Caisson's differ writes the layer image at Apply (its
// data twice over while go-erofs spools it). On a full disk Apply fails with a
// no-space error, leaves nothing in the snapshot directory and the snapshot
// active; after space is freed a new Apply of the same snapshot succeeds.
func TestDiskFullDuringApply(t *testing.T) {
	h, sn, root := smallRootSnapshotter(t, "64m")
	entries, desc := bigLayer(t, h)

	mounts, err := sn.Prepare(h.ctx, "active", "")
	if err != nil {
		t.Fatal(err)
	}
	_, err = h.applier.Apply(h.ctx, desc, mounts)
	if !errors.Is(err, unix.ENOSPC) || !errdefs.IsResourceExhausted(err) {
		t.Fatalf("apply on a full disk: got %v, want a no-space error", err)
	}
	t.Log(err)
	if files, _ := os.ReadDir(sn.snapshotDir(h.idOf(sn, "active"))); len(files) != 0 {
		t.Errorf("the failed apply left %v", files)
	}
	checkConsistent(t, h, sn, "active")

	if err := unix.Mount("tmpfs", root, "tmpfs", unix.MS_REMOUNT, "size=200m"); err != nil {
		t.Fatal(err)
	}
	if _, err := h.applier.Apply(h.ctx, desc, mounts); err != nil {
		t.Fatal(err)
	}
	if err := sn.Commit(h.ctx, "committed", "active"); err != nil {
		t.Fatal(err)
	}
	h.withLayerImage(sn, "committed", func(root string) {
		if err := snapshottest.Check(root, expectAll(entries)); err != nil {
			t.Error(err)
		}
	})
	checkConsistent(t, h, sn, "committed")
}

// TestConcurrentPrepareRemove races Prepare and Remove of one key. Each call
// either succeeds or fails with AlreadyExists/NotFound; at the end metadata and
// directories agree.
func TestConcurrentPrepareRemove(t *testing.T) {
	requireHost(t)
	h := newHarness(t, t.TempDir())
	sn := h.newSnapshotter(nil)
	if err := h.unpack(sn, "base", "", h.addBlob(buildTar(t, []layerEntry{fileE("f", "f", 0o644, 0, 0)}))); err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	errc := make(chan error, 1000)
	for w := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range 50 {
				if (w+i)%2 == 0 {
					if _, err := sn.Prepare(h.ctx, "k", "base"); err != nil && !errdefs.IsAlreadyExists(err) {
						errc <- fmt.Errorf("prepare: %w", err)
					}
				} else {
					if err := sn.Remove(h.ctx, "k"); err != nil && !errdefs.IsNotFound(err) {
						errc <- fmt.Errorf("remove: %w", err)
					}
				}
			}
		}()
	}
	wg.Wait()
	close(errc)
	for err := range errc {
		t.Error(err)
	}
	if err := sn.Remove(h.ctx, "k"); err != nil && !errdefs.IsNotFound(err) {
		t.Fatal(err)
	}
	checkConsistent(t, h, sn, "base")
}

// TestConcurrentCommit commits one active snapshot from several goroutines:
// exactly one wins, the others fail cleanly, and the winner's layer is intact.
func TestConcurrentCommit(t *testing.T) {
	requireHost(t)
	h := newHarness(t, t.TempDir())
	sn := h.newSnapshotter(nil)
	entries := []layerEntry{dirE("d", 0o755, 0, 0), fileE("d/f", strings.Repeat("x", 1<<20), 0o644, 0, 0)}
	mounts, err := sn.Prepare(h.ctx, "active", "")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := h.applier.Apply(h.ctx, h.addBlob(buildTar(t, entries)), mounts); err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	errs := make([]error, 4)
	for i := range errs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs[i] = sn.Commit(h.ctx, fmt.Sprintf("c%d", i), "active")
		}()
	}
	wg.Wait()
	winner := ""
	for i, err := range errs {
		switch {
		case err == nil && winner == "":
			winner = fmt.Sprintf("c%d", i)
		case err == nil:
			t.Errorf("two commits of one snapshot succeeded")
		case !errdefs.IsNotFound(err):
			t.Errorf("losing commit: %v, want NotFound", err)
		}
	}
	if winner == "" {
		t.Fatalf("no commit succeeded: %v", errs)
	}
	h.withLayerImage(sn, winner, func(root string) {
		if err := snapshottest.Check(root, expectAll(entries)); err != nil {
			t.Error(err)
		}
	})
	checkConsistent(t, h, sn, winner)
}

// smallRootSnapshotter returns a snapshotter whose root is a tmpfs of the given
// size (unmounted at cleanup), and the root.
func smallRootSnapshotter(t *testing.T, size string) (*harness, *Snapshotter, string) {
	requireHost(t)
	dir := t.TempDir()
	h := newHarness(t, dir)
	root := filepath.Join(dir, "root")
	if err := os.Mkdir(root, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := mount.All([]mount.Mount{{Type: "tmpfs", Source: "tmpfs", Options: []string{"size=" + size}}}, root); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := mount.UnmountAll(root, 0); err != nil {
			t.Errorf("unmount tmpfs: %v", err)
		}
	})
	return h, h.newSnapshotter(nil), root
}

// bigLayer is a layer of one 45 MiB random file, added to h's content store.
func bigLayer(t *testing.T, h *harness) ([]layerEntry, ocispec.Descriptor) {
	blob := make([]byte, 45<<20)
	rand.Read(blob)
	entries := []layerEntry{dirE("d", 0o755, 0, 0), {Header: tar.Header{Typeflag: tar.TypeReg, Name: "d/big", Mode: 0o644, Size: int64(len(blob))}, Data: blob}}
	return entries, h.addBlob(buildTar(t, entries))
}
