package snapshotter

import (
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/errdefs"

	"archive/tar"
	"fmt"
	"github.com/caisson-containers/caisson/snapshotter/config"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/caisson-containers/caisson/snapshotter/snapshottest"
)

func whiteoutE(name string) layerEntry {
	return layerEntry{hdr: tar.Header{Typeflag: tar.TypeReg, Name: name, Mode: 0o644}}
}

// baseLayer exercises everything a layer can hold.
func baseLayer() []layerEntry {
	deep := "long"
	for i := range 6 {
		deep += "/" + strings.Repeat(string(rune('a'+i)), 60)
	}
	entries := []layerEntry{
		dirE("etc", 0o755, 0, 0),
		fileE("etc/passwd", "root:x:0:0:root:/root:/bin/sh\n", 0o644, 0, 0),
		symlinkE("etc/abs", "/etc/passwd"),
		dirE("usr", 0o755, 0, 0),
		dirE("usr/bin", 0o755, 0, 0),
		fileE("usr/bin/su", "#!setuid\n", 0o4755, 0, 0),
		fileE("usr/bin/wall", "#!setgid\n", 0o2755, 0, 5),
		fileE("usr/bin/tool", "tool v1\n", 0o755, 0, 0),
		dirE("sbin", 0o755, 0, 0),
		linkE("sbin/tool", "usr/bin/tool", 0o755, 0, 0),
		symlinkE("lib", "usr/lib"),
		dirE("shared", 0o2775, 0, 50),
		dirE("tmp", 0o1777, 0, 0),
		dirE("home", 0o755, 0, 0),
		dirE("home/user", 0o700, 1000, 1000),
		fileE("home/user/notes", "hi\n", 0o640, 1000, 1000),
		// containerd's archive package refuses trusted.* xattrs from a tar (it
		// logs "admin attributes from archive not supported"), so only user.*.
		withXattrs(fileE("home/user/x", "x", 0o644, 1000, 1000), "user.note", "hello", "user.other", "2"),
		withXattrs(dirE("home/user/xdir", 0o755, 1000, 1000), "user.dir", "d"),
		dirE("dev", 0o755, 0, 0),
		devE("dev/null", tar.TypeChar, 1, 3),
		devE("dev/sda", tar.TypeBlock, 8, 0),
		devE("dev/fifo", tar.TypeFifo, 0, 0),
		dirE("a", 0o755, 0, 0),
		dirE("a/b", 0o755, 0, 0),
		dirE("a/b/c", 0o755, 0, 0),
		fileE("a/b/c/f", "f", 0o644, 0, 0),
		dirE("opq", 0o755, 0, 0),
		fileE("opq/x", "x", 0o644, 0, 0),
		fileE("opq/y", "y", 0o644, 0, 0),
		dirE("long", 0o755, 0, 0),
		// The longest name mkfs.erofs 1.5 stores (see TestLongNameLimit).
		fileE("long/"+strings.Repeat("n", 254), "254-byte name\n", 0o644, 0, 0),
		dirE("data", 0o755, 0, 0),
		fileE("data/file", "data\n", 0o644, 0, 0),
		linkE("data/file-link", "data/file", 0o644, 0, 0),
	}
	// A path longer than tar's 100 and 255-byte limits: PAX headers.
	p := "long"
	for _, part := range strings.Split(strings.TrimPrefix(deep, "long/"), "/") {
		p += "/" + part
		entries = append(entries, dirE(p, 0o755, 0, 0))
	}
	return append(entries, fileE(p+"/leaf", "deep\n", 0o600, 0, 0))
}

// upperLayer deletes, makes opaque and replaces things of baseLayer.
func upperLayer() []layerEntry {
	return []layerEntry{
		dirE("a", 0o755, 0, 0),
		dirE("a/b", 0o755, 0, 0),
		whiteoutE("a/b/.wh.c"),
		dirE("etc", 0o755, 0, 0),
		whiteoutE("etc/.wh.passwd"),
		dirE("opq", 0o750, 0, 0),
		whiteoutE("opq/.wh..wh..opq"),
		fileE("opq/z", "z", 0o644, 0, 0),
		dirE("usr", 0o755, 0, 0),
		dirE("usr/bin", 0o755, 0, 0),
		fileE("usr/bin/tool", "tool v2\n", 0o755, 0, 0),
	}
}

func TestUnpackLayers(t *testing.T) {
	requireHost(t)
	h := newHarness(t, t.TempDir())
	sn := h.newSnapshotter(nil)

	base, upper := baseLayer(), upperLayer()
	if err := h.unpack(sn, "l1", "", h.addBlob(buildTar(t, base))); err != nil {
		t.Fatal(err)
	}
	if err := h.unpack(sn, "l2", "l1", h.addBlob(buildTar(t, upper))); err != nil {
		t.Fatal(err)
	}

	t.Run("base image", func(t *testing.T) {
		h.withLayerImage(sn, "l1", func(root string) {
			if err := snapshottest.Check(root, expectAll(base)); err != nil {
				t.Error(err)
			}
		})
	})

	wantUpper := expectAll(upper)
	for i := range wantUpper {
		if wantUpper[i].Path == "opq" {
			wantUpper[i].Xattrs = map[string]string{"trusted.overlay.opaque": "y"}
		}
	}
	wantUpper = append(wantUpper, snapshottest.Whiteout("a/b/c"), snapshottest.Whiteout("etc/passwd"))
	t.Run("upper image", func(t *testing.T) {
		h.withLayerImage(sn, "l2", func(root string) {
			if err := snapshottest.Check(root, wantUpper); err != nil {
				t.Error(err)
			}
		})
	})

	// The merged view: upper's entries replace base's, whiteouts and the opaque
	// directory hide what they name.
	merged := map[string]snapshottest.Entry{}
	var order []string
	add := func(e snapshottest.Entry) {
		if _, ok := merged[e.Path]; !ok {
			order = append(order, e.Path)
		}
		merged[e.Path] = e
	}
	for _, e := range expectAll(base) {
		add(e)
	}
	for _, e := range expectAll(upper) {
		add(e)
	}
	for _, gone := range []string{"a/b/c", "a/b/c/f", "etc/passwd", "opq/x", "opq/y"} {
		delete(merged, gone)
	}
	// sbin/tool was a hardlink of the old usr/bin/tool; it keeps the old content.
	st := merged["sbin/tool"]
	st.Link = ""
	merged["sbin/tool"] = st
	var wantMerged []snapshottest.Entry
	for _, p := range order {
		if e, ok := merged[p]; ok {
			wantMerged = append(wantMerged, e)
		}
	}
	t.Run("merged view", func(t *testing.T) {
		h.withView(sn, "l2", func(root string) {
			if err := snapshottest.Check(root, wantMerged); err != nil {
				t.Error(err)
			}
		})
	})

	t.Run("container rootfs", func(t *testing.T) {
		// A container's active snapshot over both layers shows the same tree,
		// and what it writes lands in its own writable image only.
		mounts, err := sn.Prepare(h.ctx, "ctr", "l2")
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { sn.Remove(h.ctx, "ctr") })
		h.withMounted(mounts, func(root string) {
			if err := snapshottest.Check(root, wantMerged); err != nil {
				t.Error(err)
			}
		})
	})
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
	want := []snapshottest.Entry{
		{Path: "data", Mode: os.ModeDir | 0o755, ModTime: epoch},
		{Path: "data/sparse", Mode: 0o644, ModTime: epoch, Data: append(make([]byte, 8<<20), payload...)},
	}
	h.withLayerImage(sn, "sparse", func(root string) {
		if err := snapshottest.Check(root, want); err != nil {
			t.Error(err)
		}
	})
	_ = time.Second
}

// TestLongNameLimit: Linux allows 255-byte names; erofs-utils 1.5 truncates them.
// An EROFS commit of such a layer fails with a clear error and leaves the
// snapshot active; the ext4 layer fallback stores it.
func TestLongNameLimit(t *testing.T) {
	requireHost(t)
	name := "dir/" + strings.Repeat("n", 255)
	entries := []layerEntry{dirE("dir", 0o755, 0, 0), fileE(name, "255\n", 0o644, 0, 0)}
	h := newHarness(t, t.TempDir())
	desc := h.addBlob(buildTar(t, entries))

	sn := h.newSnapshotter(nil)
	err := h.unpack(sn, "long", "", desc)
	if !errdefs.IsNotImplemented(err) || !strings.Contains(err.Error(), "255 bytes") {
		t.Fatalf("erofs commit of a 255-byte name: got %v, want a NotImplemented error naming the limit", err)
	}
	if info, err := sn.Stat(h.ctx, "extract-long"); err != nil || info.Kind != snapshots.KindActive {
		t.Fatalf("after the failed commit the snapshot should still be active: %v %v", info.Kind, err)
	}
	if err := sn.Remove(h.ctx, "extract-long"); err != nil {
		t.Fatal(err)
	}

	ext := newHarness(t, t.TempDir())
	sn4 := ext.newSnapshotter(func(c *config.Config) { c.LayerFilesystem = config.LayerExt4 })
	if err := ext.unpack(sn4, "long", "", ext.addBlob(buildTar(t, entries))); err != nil {
		t.Fatal(err)
	}
	ext.withView(sn4, "long", func(root string) {
		if err := snapshottest.Check(root, expectAll(entries)); err != nil {
			t.Error(err)
		}
	})
}
