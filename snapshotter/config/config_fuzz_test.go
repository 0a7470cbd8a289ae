package config

import (
	"fmt"
	"path/filepath"
	"strconv"
	"testing"

	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/errdefs"

	"github.com/caisson-containers/caisson/internal/rootfs"
)

// FuzzDecode decodes and resolves arbitrary TOML. Neither may panic; a refusal is an
// InvalidArgument; and what Resolve accepts must be usable: sizes within their bounds,
// an absolute root, and the mounts the snapshotter then returns (a writable image of
// DefaultWritableSize under an overlay with OverlayOptions, shapes A and C of
// docs/mounts.md) planned by the shim without error. Resolving it again gives the same.
func FuzzDecode(f *testing.F) {
	f.Add(``)
	f.Add(`root = "/srv/snap"
default_writable_size = "512MiB"
layer_filesystem = "ext4"
dax_alignment = "0"
mkfs_options = ["-T0"]
overlay_options = ["redirect_dir=on", "index=off", "volatile"]
mount_mode = "host"`)
	f.Add(`default_writable_size = "9EiB"`)
	f.Add(`default_writable_size = "1e30"`)
	f.Add(`dax_alignment = "-4KiB"`)
	f.Add(`overlay_options = ["lowerdir=/etc", "ro", "upperdir="]`)
	f.Add(`root = "relative"`)
	f.Add("[extra]\nkey = 1")
	f.Fuzz(func(t *testing.T, doc string) {
		c, err := Decode([]byte(doc))
		if err != nil {
			checkInvalid(t, err)
			return
		}
		r, err := c.Resolve()
		if err != nil {
			checkInvalid(t, err)
			return
		}
		switch {
		case !filepath.IsAbs(r.Root) || filepath.Clean(r.Root) != r.Root:
			t.Errorf("root %q", r.Root)
		case r.DefaultWritableSize < minimumWritableBytes:
			t.Errorf("default_writable_size %d", r.DefaultWritableSize)
		case r.DAXAlignment < 0 || r.DAXAlignment%4096 != 0:
			t.Errorf("dax_alignment %d", r.DAXAlignment)
		case r.LayerFilesystem != LayerEROFS && r.LayerFilesystem != LayerExt4:
			t.Errorf("layer_filesystem %q", r.LayerFilesystem)
		}
		again, err := Config{Root: r.Root, DefaultWritableSize: strconv.FormatInt(r.DefaultWritableSize, 10),
			LayerFilesystem: r.LayerFilesystem, DAXAlignment: strconv.FormatInt(r.DAXAlignment, 10),
			MkfsOptions: r.MkfsOptions, OverlayOptions: r.OverlayOptions, MountMode: map[bool]string{false: MountsTemplate, true: MountsHost}[r.HostMounts]}.Resolve()
		if err != nil || fmt.Sprint(again) != fmt.Sprint(r) {
			t.Errorf("resolving %+v again: %+v, %v", r, again, err)
		}
		layer := func(id int) mount.Mount {
			return mount.Mount{Type: r.LayerFilesystem, Source: filepath.Join(r.Root, "snapshots", strconv.Itoa(id), "layer."+r.LayerFilesystem), Options: []string{"ro", "loop"}}
		}
		active := []mount.Mount{
			{Type: "mkfs/ext4", Source: filepath.Join(r.Root, "snapshots", "3", "rw.ext4"), Options: []string{
				"X-containerd.mkfs.fs=ext4", fmt.Sprintf("X-containerd.mkfs.size=%d", r.DefaultWritableSize), "rw", "loop"}},
			layer(2), layer(1),
			{Type: "format/mkdir/overlay", Source: "overlay", Options: append([]string{
				"X-containerd.mkdir.path={{ mount 0 }}/upper:0755", "X-containerd.mkdir.path={{ mount 0 }}/work:0755",
				"upperdir={{ mount 0 }}/upper", "workdir={{ mount 0 }}/work", "lowerdir={{ overlay 1 2 }}"}, r.OverlayOptions...)},
		}
		p, err := rootfs.Parse(active)
		if err != nil {
			t.Fatalf("the shim refuses the active snapshot's mounts: %v", err)
		}
		if p.Devices[0].Mkfs.Size != r.DefaultWritableSize {
			t.Errorf("the shim makes a writable image of %d bytes, want %d", p.Devices[0].Mkfs.Size, r.DefaultWritableSize)
		}
		view := []mount.Mount{layer(2), layer(1), {Type: "format/overlay", Source: "overlay", Options: []string{"ro", "lowerdir={{ overlay 0 1 }}"}}}
		for _, o := range r.OverlayOptions {
			if o != "volatile" {
				view[2].Options = append(view[2].Options, o)
			}
		}
		if _, err := rootfs.Parse(view); err != nil {
			t.Errorf("the shim refuses a view's mounts: %v", err)
		}
	})
}

func checkInvalid(t *testing.T, err error) {
	t.Helper()
	if !errdefs.IsInvalidArgument(err) {
		t.Errorf("%v: not an InvalidArgument", err)
	}
}
