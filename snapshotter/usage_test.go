package snapshotter

import (
	"bytes"
	"os"
	"path/filepath"
	"testing"
)

// TestUsage: an active snapshot uses nothing until activated, then what its
// sparse writable image has allocated; a committed one uses its layer image.
func TestUsage(t *testing.T) {
	requireHost(t)
	h := newHarness(t, t.TempDir())
	sn := h.newSnapshotter(nil)
	mounts, err := sn.Prepare(h.ctx, "a", "")
	if err != nil {
		t.Fatal(err)
	}
	if u, err := sn.Usage(h.ctx, "a"); err != nil || u.Size != 0 {
		t.Fatalf("usage before activation: %+v %v, want 0", u, err)
	}
	h.withMounted(mounts, func(root string) {
		if err := os.WriteFile(filepath.Join(root, "f"), bytes.Repeat([]byte{1}, 8<<20), 0o644); err != nil {
			t.Fatal(err)
		}
	})
	u, err := sn.Usage(h.ctx, "a")
	if err != nil || u.Size < 8<<20 || u.Size > 128<<20 {
		t.Fatalf("usage after writing 8 MiB: %+v %v", u, err)
	}
	if err := sn.Commit(h.ctx, "c", "a"); err != nil {
		t.Fatal(err)
	}
	u, err = sn.Usage(h.ctx, "c")
	if err != nil || u.Size < 8<<20 || u.Size > 9<<20 {
		t.Fatalf("committed usage: %+v %v, want the layer's ~8 MiB", u, err)
	}
	if _, err := os.Stat(sn.writablePath(h.idOf(sn, "c"))); !os.IsNotExist(err) {
		t.Fatalf("the writable image outlived the commit: %v", err)
	}
}
