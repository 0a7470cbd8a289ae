package snapshotter

import (
	"bytes"
	"compress/gzip"
	"context"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/containerd/containerd/v2/core/content"
	"github.com/containerd/containerd/v2/core/diff"
	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/errdefs"
	erofs "github.com/erofs/go-erofs"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"golang.org/x/sys/unix"

	"github.com/caisson-containers/caisson/snapshotter/config"
	"github.com/caisson-containers/caisson/snapshotter/differ"
	"github.com/caisson-containers/caisson/snapshotter/snapshottest"
)

// differLayer is BaseLayer with what only Caisson's differ keeps: trusted.* and
// security.* xattrs and 255-byte names; and hardlinks to each kind of non-directory.
func differLayer() []layerEntry {
	es := snapshottest.BaseLayer()
	return append(es,
		linkE("dev/null2", "dev/null", 0o660, 0, 0),
		linkE("dev/fifo2", "dev/fifo", 0o660, 0, 0),
		// A link of a link, three names for one inode.
		linkE("usr/bin/tool3", "sbin/tool", 0o755, 0, 0),
		snapshottest.WithXattrs(fileE("etc/trusted", "t\n", 0o644, 0, 0), "trusted.caisson", "kept", "user.a", "b"),
		snapshottest.WithXattrs(dirE("etc/tdir", 0o750, 7, 8), "trusted.overlay.opaque", "y", "security.selinux", "system_u:object_r:etc_t:s0"),
		fileE("long/"+strings.Repeat("m", 255), "255\n", 0o600, 3, 4),
		// A parent directory the tar does not list.
		fileE("implicit/parent/file", "p\n", 0o644, 0, 0),
	)
}

// TestUnpackThroughDiffer: a layer with every kind of entry Caisson's differ
// writes itself, and a layer of whiteouts and an opaque directory above it. Each
// image, mounted alone, shows exactly the layer; no writable image was made.
func TestUnpackThroughDiffer(t *testing.T) {
	requireHost(t)
	h := newHarness(t, t.TempDir())
	sn := h.newSnapshotter(nil)
	base := differLayer()
	if err := h.unpack(sn, "l1", "", h.addBlob(buildTar(t, base))); err != nil {
		t.Fatal(err)
	}
	if err := h.unpack(sn, "l2", "l1", h.addBlob(buildTar(t, snapshottest.UpperLayer()))); err != nil {
		t.Fatal(err)
	}
	want := snapshottest.Expect(base)
	want = append(want,
		snapshottest.Entry{Path: "implicit", Mode: os.ModeDir | 0o755},
		snapshottest.Entry{Path: "implicit/parent", Mode: os.ModeDir | 0o755})
	for _, tc := range []struct {
		key  string
		want []snapshottest.Entry
	}{
		{"l1", want},
		{"l2", snapshottest.UpperImage()},
	} {
		t.Run(tc.key, func(t *testing.T) {
			if !h.applied(sn, tc.key) {
				t.Error("the layer was not written by Caisson's differ")
			}
			if _, err := os.Lstat(sn.writablePath(h.idOf(sn, tc.key))); !os.IsNotExist(err) {
				t.Errorf("a writable image exists: %v", err)
			}
			fi, err := os.Stat(sn.layerPath(h.idOf(sn, tc.key)))
			if err != nil {
				t.Fatal(err)
			}
			if fi.Size()%(2<<20) != 0 {
				t.Errorf("layer image of %d bytes is not padded to 2MiB", fi.Size())
			}
			assertFlatPlain(t, sn.layerPath(h.idOf(sn, tc.key)))
			h.withLayerImage(sn, tc.key, func(root string) {
				if err := snapshottest.Check(root, tc.want); err != nil {
					t.Error(err)
				}
				if tc.key != "l1" {
					return
				}
				// Link counts: every name of an inode counts.
				for p, want := range map[string]uint64{"usr/bin/tool": 3, "sbin/tool": 3, "data/file": 2, "dev/null": 2, "dev/fifo2": 2, "etc/passwd": 1, "usr": 3} {
					var st unix.Stat_t
					if err := unix.Lstat(filepath.Join(root, p), &st); err != nil {
						t.Error(err)
					} else if st.Nlink != want {
						t.Errorf("%s: %d links, want %d", p, st.Nlink, want)
					}
				}
			})
		})
	}
	checkConsistent(t, h, sn, "l1", "l2")
}

// TestCommitAppliedAndWritten: a snapshot whose layer Caisson's differ wrote, then
// activated and written through its mounts, has two versions of its content.
// Commit refuses with FailedPrecondition and changes nothing; the snapshot can
// be removed.
func TestCommitAppliedAndWritten(t *testing.T) {
	requireHost(t)
	h := newHarness(t, t.TempDir())
	sn := h.newSnapshotter(nil)
	mounts, err := sn.Prepare(h.ctx, "active", "")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := h.applier.Apply(h.ctx, h.addBlob(buildTar(t, []layerEntry{fileE("f", "f", 0o644, 0, 0)})), mounts); err != nil {
		t.Fatal(err)
	}
	if !h.applied(sn, "active") {
		t.Fatal("the layer was not written by Caisson's differ")
	}
	// Mounts now shows the applied layer, read-only (shape C), and the differ
	// refuses to apply to it.
	now, err := sn.Mounts(h.ctx, "active")
	if err != nil {
		t.Fatal(err)
	}
	if len(now) != 1 || now[0].Type != "erofs" || now[0].Source != sn.layerPath(h.idOf(sn, "active")) || !now[0].ReadOnly() {
		t.Fatalf("mounts after the apply: %+v, want the applied layer read-only", now)
	}
	h.withMounted(now, func(root string) {
		if err := snapshottest.Check(root, expectAll([]layerEntry{fileE("f", "f", 0o644, 0, 0)})); err != nil {
			t.Error(err)
		}
	})
	if _, err := h.applier.Apply(h.ctx, h.addBlob(buildTar(t, []layerEntry{fileE("g", "g", 0o644, 0, 0)})), now); !errdefs.IsFailedPrecondition(err) {
		t.Errorf("apply to the applied snapshot's mounts: got %v, want FailedPrecondition", err)
	}
	// Writing through the mounts Prepare returned creates the writable image.
	h.withMounted(mounts, func(root string) {
		if err := os.WriteFile(filepath.Join(root, "g"), []byte("g"), 0o644); err != nil {
			t.Fatal(err)
		}
	})
	err = sn.Commit(h.ctx, "committed", "active")
	if !errdefs.IsFailedPrecondition(err) || !strings.Contains(err.Error(), "written to afterwards") {
		t.Fatalf("commit: got %v, want FailedPrecondition saying why", err)
	}
	if info, err := sn.Stat(h.ctx, "active"); err != nil || info.Kind != snapshots.KindActive {
		t.Fatalf("after the refused commit: %v %v, want the snapshot still active", info.Kind, err)
	}
	id := h.idOf(sn, "active")
	for _, p := range []string{sn.layerPath(id), sn.writablePath(id)} {
		if _, err := os.Stat(p); err != nil {
			t.Errorf("after the refused commit: %v", err)
		}
	}
	if err := sn.Remove(h.ctx, "active"); err != nil {
		t.Fatal(err)
	}
	checkConsistent(t, h, sn)
}

// TestWriteLayerTakesOnlyItsOwn: WriteLayer is NotImplemented, before writing
// anything, for mounts it must not take.
func TestWriteLayerTakesOnlyItsOwn(t *testing.T) {
	requireHost(t)
	h := newHarness(t, t.TempDir())
	sn := h.newSnapshotter(nil)
	if err := h.unpack(sn, "base", "", h.addBlob(buildTar(t, []layerEntry{fileE("f", "f", 0o644, 0, 0)}))); err != nil {
		t.Fatal(err)
	}
	other := h.newSnapshotter(func(c *config.Config) { c.Root = filepath.Join(h.dir, "other") })
	activated, err := sn.Prepare(h.ctx, "activated", "base")
	if err != nil {
		t.Fatal(err)
	}
	h.withMounted(activated, func(string) {})
	view, err := sn.View(h.ctx, "view", "base")
	if err != nil {
		t.Fatal(err)
	}
	otherMounts, err := other.Prepare(h.ctx, "x", "")
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name   string
		mounts []mount.Mount
	}{
		{"view", view},
		{"another snapshotter's", otherMounts},
		{"activated", activated},
		{"a plain bind", []mount.Mount{{Type: "bind", Source: h.dir, Options: []string{"rbind"}}}},
		{"none", nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			called := false
			err := sn.WriteLayer(h.ctx, tc.mounts, false, func(context.Context, *os.File, string) error { called = true; return nil })
			if !errdefs.IsNotImplemented(err) || called {
				t.Errorf("got %v (writer called: %v), want NotImplemented before writing", err, called)
			}
		})
	}
	// The differ declines another snapshotter's mounts, fallback or not, so
	// that the diff service tries its next differ.
	desc := h.addBlob(buildTar(t, []layerEntry{fileE("g", "g", 0o644, 0, 0)}))
	if _, err := differ.New(h.cs, []differ.LayerWriter{sn}, h.walking, nil).Apply(h.ctx, desc, otherMounts); !errdefs.IsNotImplemented(err) {
		t.Errorf("apply to another snapshotter's mounts: got %v, want NotImplemented", err)
	}
}

// TestDifferCompressedAndSynced: a gzip layer goes through the fast path (the
// stream processors decompress it; the diff id is the tar's), synced on request.
func TestDifferCompressedAndSynced(t *testing.T) {
	requireHost(t)
	h := newHarness(t, t.TempDir())
	sn := h.newSnapshotter(nil)
	entries := []layerEntry{dirE("d", 0o755, 0, 0), fileE("d/f", strings.Repeat("gz", 5000), 0o644, 0, 0)}
	tarData := buildTar(t, entries)
	var gz bytes.Buffer
	zw := gzip.NewWriter(&gz)
	zw.Write(tarData)
	zw.Close()
	desc := ocispec.Descriptor{MediaType: ocispec.MediaTypeImageLayerGzip, Digest: digest.FromBytes(gz.Bytes()), Size: int64(gz.Len())}
	if err := content.WriteBlob(h.ctx, h.cs, desc.Digest.String(), bytes.NewReader(gz.Bytes()), desc); err != nil {
		t.Fatal(err)
	}
	mounts, err := sn.Prepare(h.ctx, "active", "")
	if err != nil {
		t.Fatal(err)
	}
	applied, err := h.applier.Apply(h.ctx, desc, mounts, diff.WithSyncFs(true))
	if err != nil {
		t.Fatal(err)
	}
	if applied.Digest != digest.FromBytes(tarData) || applied.Size != int64(len(tarData)) || applied.MediaType != ocispec.MediaTypeImageLayer {
		t.Errorf("applied %+v, want the uncompressed tar's digest and size", applied)
	}
	if !h.applied(sn, "active") {
		t.Error("the layer was not written by Caisson's differ")
	}
	if err := sn.Commit(h.ctx, "c", "active"); err != nil {
		t.Fatal(err)
	}
	h.withLayerImage(sn, "c", func(root string) {
		if err := snapshottest.Check(root, expectAll(entries)); err != nil {
			t.Error(err)
		}
	})
}

// TestDifferFallsBack: a layer go-erofs cannot write (it replaces one of its own
// entries) goes to containerd's differ through Caisson's, re-read from the
// content store; the committed layer holds what containerd's differ wrote.
func TestDifferFallsBack(t *testing.T) {
	requireHost(t)
	h := newHarness(t, t.TempDir())
	sn := h.newSnapshotter(nil)
	entries := []layerEntry{dirE("d", 0o755, 0, 0), fileE("d/f", "first", 0o644, 0, 0), fileE("d/f", "second", 0o600, 0, 0)}
	if err := h.unpack(sn, "l", "", h.addBlob(buildTar(t, entries))); err != nil {
		t.Fatal(err)
	}
	if h.applied(sn, "l") {
		t.Error("Caisson's differ wrote a layer it cannot write exactly")
	}
	h.withLayerImage(sn, "l", func(root string) {
		want := []snapshottest.Entry{
			{Path: "d", Mode: os.ModeDir | 0o755, ModTime: epoch},
			{Path: "d/f", Mode: 0o600, ModTime: epoch, Data: []byte("second")},
		}
		if err := snapshottest.Check(root, want); err != nil {
			t.Error(err)
		}
	})
	checkConsistent(t, h, sn, "l")
}

// assertFlatPlain checks that every regular file of the EROFS image at p keeps
// its data in blocks of its own (flat-plain), which DAX needs.
func assertFlatPlain(t *testing.T, p string) {
	t.Helper()
	f, err := os.Open(p)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	img, err := erofs.Open(f)
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	if err := fs.WalkDir(img, ".", func(p string, d fs.DirEntry, err error) error {
		if err != nil || !d.Type().IsRegular() {
			return err
		}
		fi, err := d.Info()
		if err != nil {
			return err
		}
		if st := fi.Sys().(*erofs.Stat); st.InodeLayout != 0 {
			t.Errorf("%s: inode layout %d, want 0 (flat-plain)", p, st.InodeLayout)
		}
		n++
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	if n == 0 {
		t.Error("no regular file in the image")
	}
}

// TestMountsOfAppliedSnapshot: an active snapshot whose layer Caisson's differ
// wrote shows, through Mounts, that layer over its parents, read-only (shape C).
func TestMountsOfAppliedSnapshot(t *testing.T) {
	requireHost(t)
	h := newHarness(t, t.TempDir())
	sn := h.newSnapshotter(nil)
	if err := h.unpack(sn, "l1", "", h.addBlob(buildTar(t, snapshottest.BaseLayer()))); err != nil {
		t.Fatal(err)
	}
	mounts, err := sn.Prepare(h.ctx, "active", "l1")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := h.applier.Apply(h.ctx, h.addBlob(buildTar(t, snapshottest.UpperLayer())), mounts); err != nil {
		t.Fatal(err)
	}
	now, err := sn.Mounts(h.ctx, "active")
	if err != nil {
		t.Fatal(err)
	}
	if len(now) != 3 || now[0].Source != sn.layerPath(h.idOf(sn, "active")) || now[1].Source != sn.layerPath(h.idOf(sn, "l1")) ||
		now[2].Type != "format/overlay" || !now[2].ReadOnly() {
		t.Fatalf("mounts %+v, want the applied layer over l1, read-only", now)
	}
	h.withMounted(now, func(root string) {
		if err := snapshottest.Check(root, snapshottest.Merged()); err != nil {
			t.Error(err)
		}
	})
	if err := sn.Commit(h.ctx, "l2", "active"); err != nil {
		t.Fatal(err)
	}
	checkConsistent(t, h, sn, "l1", "l2")
}
