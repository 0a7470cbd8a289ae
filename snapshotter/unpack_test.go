package snapshotter

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/caisson-containers/caisson/snapshotter/config"
	"github.com/caisson-containers/caisson/snapshotter/snapshottest"
)

func TestUnpackLayers(t *testing.T) {
	requireHost(t)
	h := newHarness(t, t.TempDir())
	sn := h.newSnapshotter(nil)

	base, upper := snapshottest.BaseLayer(), snapshottest.UpperLayer()
	if err := h.unpack(sn, "l1", "", h.addBlob(buildTar(t, base))); err != nil {
		t.Fatal(err)
	}
	if err := h.unpack(sn, "l2", "l1", h.addBlob(buildTar(t, upper))); err != nil {
		t.Fatal(err)
	}
	for _, k := range []string{"l1", "l2"} {
		if !h.applied(sn, k) {
			t.Errorf("%s was not written by Caisson's differ", k)
		}
	}
	for _, tc := range []struct {
		name  string
		mount func(fn func(root string))
		want  []snapshottest.Entry
	}{
		{"base image", func(fn func(string)) { h.withLayerImage(sn, "l1", fn) }, snapshottest.Expect(base)},
		{"upper image", func(fn func(string)) { h.withLayerImage(sn, "l2", fn) }, snapshottest.UpperImage()},
		{"merged view", func(fn func(string)) { h.withView(sn, "l2", fn) }, snapshottest.Merged()},
		{"container rootfs", func(fn func(string)) {
			// A container's active snapshot over both layers.
			mounts, err := sn.Prepare(h.ctx, "ctr", "l2")
			if err != nil {
				t.Fatal(err)
			}
			defer sn.Remove(h.ctx, "ctr")
			h.withMounted(mounts, fn)
		}, snapshottest.Merged()},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tc.mount(func(root string) {
				if err := snapshottest.Check(root, tc.want); err != nil {
					t.Error(err)
				}
			})
		})
	}
}

func TestUnpackManyFiles(t *testing.T) {
	requireHost(t)
	h := newHarness(t, t.TempDir())
	sn := h.newSnapshotter(nil)

	var entries []layerEntry
	for d := range 100 {
		dir := fmt.Sprintf("d%03d", d)
		entries = append(entries, dirE(dir, 0o755, 0, 0))
		for f := range 100 {
			entries = append(entries, fileE(fmt.Sprintf("%s/f%03d", dir, f), fmt.Sprintf("file %d/%d\n", d, f), 0o644, d, f))
		}
	}
	if err := h.unpack(sn, "many", "", h.addBlob(buildTar(t, entries))); err != nil {
		t.Fatal(err)
	}
	if !h.applied(sn, "many") {
		t.Error("the layer was not written by Caisson's differ")
	}
	h.withLayerImage(sn, "many", func(root string) {
		if err := snapshottest.Check(root, expectAll(entries)); err != nil {
			t.Error(err)
		}
	})
}

// TestUnpackSparse unpacks a PAX 1.0 sparse file written by GNU tar: the file
// reads back whole (size and content). containerd's archive package writes the
// holes as zeros, so the staging image and the layer hold them as data.
func TestUnpackSparse(t *testing.T) {
	requireHost(t)
	gnutar := testutilBinary(t, "tar")
	h := newHarness(t, t.TempDir())
	sn := h.newSnapshotter(nil)

	src := t.TempDir()
	if err := os.Mkdir(filepath.Join(src, "data"), 0o755); err != nil {
		t.Fatal(err)
	}
	f, err := os.Create(filepath.Join(src, "data", "sparse"))
	if err != nil {
		t.Fatal(err)
	}
	payload := []byte(strings.Repeat("sparse!\n", 512))
	if _, err := f.WriteAt(payload, 8<<20); err != nil {
		t.Fatal(err)
	}
	f.Close()
	for _, p := range []string{"data/sparse", "data"} {
		if err := os.Chtimes(filepath.Join(src, p), epoch, epoch); err != nil {
			t.Fatal(err)
		}
	}
	out, err := exec.Command(gnutar, "--sparse", "--format=pax", "--numeric-owner", "-C", src, "-cf", "-", "data").Output()
	if err != nil {
		t.Fatalf("tar: %v", err)
	}
	if !strings.Contains(string(out), "GNU.sparse") {
		t.Fatal("GNU tar did not write a sparse entry")
	}
	if err := h.unpack(sn, "sparse", "", h.addBlob(out)); err != nil {
		t.Fatal(err)
	}
	if !h.applied(sn, "sparse") {
		t.Error("the layer was not written by Caisson's differ")
	}
	want := []snapshottest.Entry{
		{Path: "data", Mode: os.ModeDir | 0o755, ModTime: epoch},
		{Path: "data/sparse", Mode: 0o644, ModTime: epoch, Data: append(make([]byte, 8<<20), payload...)},
	}
	h.withLayerImage(sn, "sparse", func(root string) {
		if err := snapshottest.Check(root, want); err != nil {
			t.Error(err)
		}
	})
}

// TestLongNameLimit: Linux allows 255-byte names. Caisson's differ stores them
// (go-erofs has no such limit). Unpacked by containerd's differ alone into the
// writable image, the EROFS commit stores them too: it reads the image in
// userspace and writes the layer with the same writer (mkfs.erofs 1.5, which
// truncates them, is not involved); so does the ext4 layer fallback.
func TestLongNameLimit(t *testing.T) {
	requireHost(t)
	name := "dir/" + strings.Repeat("n", 255)
	entries := []layerEntry{dirE("dir", 0o755, 0, 0), fileE(name, "255\n", 0o644, 0, 0)}

	t.Run("caisson differ", func(t *testing.T) {
		h := newHarness(t, t.TempDir())
		sn := h.newSnapshotter(nil)
		if err := h.unpack(sn, "long", "", h.addBlob(buildTar(t, entries))); err != nil {
			t.Fatal(err)
		}
		if !h.applied(sn, "long") {
			t.Error("the layer was not written by Caisson's differ")
		}
		h.withLayerImage(sn, "long", func(root string) {
			if err := snapshottest.Check(root, expectAll(entries)); err != nil {
				t.Error(err)
			}
		})
	})

	t.Run("walking differ", func(t *testing.T) {
		h := newHarness(t, t.TempDir())
		sn := h.newSnapshotter(nil)
		desc := h.addBlob(buildTar(t, entries))
		if err := h.unpackWith(h.walking, sn, "long", "", desc, desc.Digest); err != nil {
			t.Fatal(err)
		}
		h.withLayerImage(sn, "long", func(root string) {
			if err := snapshottest.Check(root, expectAll(entries)); err != nil {
				t.Error(err)
			}
		})
	})

	t.Run("ext4 layers", func(t *testing.T) {
		// Caisson's differ writes only EROFS layers: it hands this to containerd's.
		ext := newHarness(t, t.TempDir())
		sn4 := ext.newSnapshotter(func(c *config.Config) { c.LayerFilesystem = config.LayerExt4 })
		if err := ext.unpack(sn4, "long", "", ext.addBlob(buildTar(t, entries))); err != nil {
			t.Fatal(err)
		}
		if ext.applied(sn4, "long") {
			t.Error("Caisson's differ wrote an ext4 snapshotter's layer")
		}
		ext.withView(sn4, "long", func(root string) {
			if err := snapshottest.Check(root, expectAll(entries)); err != nil {
				t.Error(err)
			}
		})
	})
}
