package snapshotter

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"testing"

	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/core/snapshots/storage"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/errdefs"

	"github.com/caisson-containers/caisson/internal/testutil"
	"github.com/caisson-containers/caisson/snapshotter/config"
)

// TestMountShapes checks every shape of docs/mounts.md exactly. It needs
// mkfs.erofs (for Commit of empty layers) but neither root nor mounts.
func TestMountShapes(t *testing.T) {
	testutil.RequireBinary(t, "mkfs.erofs")
	ctx := namespaces.WithNamespace(context.Background(), "test")
	c := config.Default()
	c.Root = t.TempDir()
	c.DefaultWritableSize = "1GiB"
	c.OverlayOptions = []string{"redirect_dir=on", "volatile"}
	r, err := c.Resolve()
	if err != nil {
		t.Fatal(err)
	}
	sn, err := New(ctx, r)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { sn.Close() })

	// A chain of three committed (empty) layers: l1 <- l2 <- l3.
	parent := ""
	for i := 1; i <= 3; i++ {
		key := fmt.Sprintf("a%d", i)
		if _, err := sn.Prepare(ctx, key, parent); err != nil {
			t.Fatal(err)
		}
		name := fmt.Sprintf("l%d", i)
		if err := sn.Commit(ctx, name, key); err != nil {
			t.Fatal(err)
		}
		parent = name
	}
	idOf := func(key string) string {
		var id string
		if err := sn.ms.WithTransaction(ctx, false, func(ctx context.Context) (err error) {
			id, _, _, err = storage.GetInfo(ctx, key)
			return err
		}); err != nil {
			t.Fatal(err)
		}
		return id
	}
	layer := func(name string) mount.Mount {
		id := idOf(name)
		return mount.Mount{Type: "erofs", Source: filepath.Join(r.Root, "snapshots", id, "layer.erofs"), Options: []string{"ro", "loop"}}
	}
	rw := func(key string, size string) mount.Mount {
		id := idOf(key)
		return mount.Mount{Type: "mkfs/ext4", Source: filepath.Join(r.Root, "snapshots", id, "rw.ext4"),
			Options: []string{"X-containerd.mkfs.fs=ext4", "X-containerd.mkfs.size=" + size, "rw", "loop"}}
	}
	upperOpts := []string{
		"X-containerd.mkdir.path={{ mount 0 }}/upper:0755",
		"X-containerd.mkdir.path={{ mount 0 }}/work:0755",
		"upperdir={{ mount 0 }}/upper", "workdir={{ mount 0 }}/work",
	}

	for _, tc := range []struct {
		name   string
		create func() ([]mount.Mount, error)
		want   func() []mount.Mount
	}{
		{
			name:   "A: one parent",
			create: func() ([]mount.Mount, error) { return sn.Prepare(ctx, "c1", "l1") },
			want: func() []mount.Mount {
				return []mount.Mount{rw("c1", "1073741824"), layer("l1"), {Type: "format/mkdir/overlay", Source: "overlay",
					Options: append(append(upperOpts[:4:4], "lowerdir={{ mount 1 }}"), "redirect_dir=on", "volatile")}}
			},
		},
		{
			name: "A: three parents, size label",
			create: func() ([]mount.Mount, error) {
				return sn.Prepare(ctx, "c3", "l3", snapshots.WithLabels(map[string]string{LabelWritableSize: "33554432"}))
			},
			want: func() []mount.Mount {
				return []mount.Mount{rw("c3", "33554432"), layer("l3"), layer("l2"), layer("l1"), {Type: "format/mkdir/overlay", Source: "overlay",
					Options: append(append(upperOpts[:4:4], "lowerdir={{ overlay 1 3 }}"), "redirect_dir=on", "volatile")}}
			},
		},
		{
			name:   "B: no parent",
			create: func() ([]mount.Mount, error) { return sn.Prepare(ctx, "c0", "") },
			want: func() []mount.Mount {
				return []mount.Mount{rw("c0", "1073741824"), {Type: "format/mkdir/bind", Source: "{{ mount 0 }}/upper",
					Options: []string{"X-containerd.mkdir.path={{ mount 0 }}/upper:0755", "rw", "rbind"}}}
			},
		},
		{
			name:   "C: view of nothing",
			create: func() ([]mount.Mount, error) { return sn.View(ctx, "v0", "") },
			want: func() []mount.Mount {
				return []mount.Mount{{Type: "bind", Source: filepath.Join(r.Root, "empty"), Options: []string{"ro", "rbind"}}}
			},
		},
		{
			name:   "C: view of one layer",
			create: func() ([]mount.Mount, error) { return sn.View(ctx, "v1", "l1") },
			want:   func() []mount.Mount { return []mount.Mount{layer("l1")} },
		},
		{
			name:   "C: view of three layers",
			create: func() ([]mount.Mount, error) { return sn.View(ctx, "v3", "l3") },
			want: func() []mount.Mount {
				return []mount.Mount{layer("l3"), layer("l2"), layer("l1"), {Type: "format/overlay", Source: "overlay",
					Options: []string{"ro", "lowerdir={{ overlay 0 2 }}", "redirect_dir=on"}}}
			},
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := tc.create()
			if err != nil {
				t.Fatal(err)
			}
			want := tc.want()
			if !reflect.DeepEqual(got, want) {
				t.Fatalf("mounts\n got %+v\nwant %+v", got, want)
			}
		})
	}

	t.Run("D: committed has no mounts", func(t *testing.T) {
		if _, err := sn.Mounts(ctx, "l1"); !errdefs.IsFailedPrecondition(err) {
			t.Fatalf("Mounts of a committed snapshot: %v, want FailedPrecondition", err)
		}
	})
	t.Run("bad size label", func(t *testing.T) {
		_, err := sn.Prepare(ctx, "bad", "l1", snapshots.WithLabels(map[string]string{LabelWritableSize: "1MiB"}))
		if !errdefs.IsInvalidArgument(err) {
			t.Fatalf("got %v, want InvalidArgument", err)
		}
		if _, err := sn.Stat(ctx, "bad"); !errdefs.IsNotFound(err) {
			t.Fatalf("a refused Prepare left a snapshot: %v", err)
		}
	})
	t.Run("layer padded to the DAX alignment", func(t *testing.T) {
		u, err := fileUsage(layer("l1").Source)
		if err != nil {
			t.Fatal(err)
		}
		if size := fileSize(t, layer("l1").Source); size%(2<<20) != 0 || size == 0 {
			t.Fatalf("layer size %d is not a positive multiple of 2 MiB", size)
		}
		if u.Size >= 2<<20 {
			t.Errorf("an empty layer takes %d bytes on disk: the padding should be a hole", u.Size)
		}
	})
}

func fileSize(t *testing.T, p string) int64 {
	fi, err := os.Stat(p)
	if err != nil {
		t.Fatal(err)
	}
	return fi.Size()
}
