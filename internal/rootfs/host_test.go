package rootfs

import (
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/errdefs"
)

// hostRoot lays out a snapshotter root with host mounts: snapshots 1 (EROFS) and
// 2 (ext4) are committed layers, 3 is active.
func hostRoot(t *testing.T) string {
	root := t.TempDir()
	for id, file := range map[string]string{"1": "layer.erofs", "2": "layer.ext4", "3": ""} {
		dir := filepath.Join(root, "snapshots", id)
		if err := os.MkdirAll(filepath.Join(dir, "fs"), 0o755); err != nil {
			t.Fatal(err)
		}
		if file != "" {
			if err := os.WriteFile(filepath.Join(dir, file), nil, 0o644); err != nil {
				t.Fatal(err)
			}
		}
	}
	return root
}

func TestParseHostMounts(t *testing.T) {
	root := hostRoot(t)
	snap := func(id, sub string) string { return filepath.Join(root, "snapshots", id, sub) }
	rw := Device{Source: snap("3", "rw.ext4"), FSType: "ext4", Mkfs: &Mkfs{FS: "ext4", Size: HostWritableSize}}
	l1 := Device{Source: snap("1", "layer.erofs"), FSType: "erofs", ReadOnly: true}
	l2 := Device{Source: snap("2", "layer.ext4"), FSType: "ext4", ReadOnly: true}
	for _, tc := range []struct {
		name string
		m    mount.Mount
		want Plan
	}{
		{
			name: "active with two parents",
			m: mount.Mount{Type: "overlay", Source: "overlay", Options: []string{
				"upperdir=" + snap("3", "upper"), "workdir=" + snap("3", "work"),
				"lowerdir=" + snap("1", "fs") + ":" + snap("2", "fs"), "redirect_dir=on"}},
			want: Plan{Devices: []Device{rw, l1, l2}, Lower: []Ref{{Device: 1}, {Device: 2}},
				Upper: &Ref{Device: 0, Path: "upper"}, Work: &Ref{Device: 0, Path: "work"}, Options: []string{"redirect_dir=on"}},
		},
		{
			name: "active with one parent",
			m: mount.Mount{Type: "overlay", Source: "overlay", Options: []string{
				"upperdir=" + snap("3", "upper"), "workdir=" + snap("3", "work"), "lowerdir=" + snap("1", "fs")}},
			want: Plan{Devices: []Device{rw, l1}, Lower: []Ref{{Device: 1}},
				Upper: &Ref{Device: 0, Path: "upper"}, Work: &Ref{Device: 0, Path: "work"}},
		},
		{
			name: "active without parents",
			m:    mount.Mount{Type: "bind", Source: snap("3", "upper"), Options: []string{"rw", "rbind"}},
			want: Plan{Devices: []Device{rw}, Upper: &Ref{Device: 0, Path: "upper"}},
		},
		{
			name: "view of two layers",
			m:    mount.Mount{Type: "overlay", Source: "overlay", Options: []string{"ro", "lowerdir=" + snap("1", "fs") + ":" + snap("2", "fs")}},
			want: Plan{Devices: []Device{l1, l2}, Lower: []Ref{{Device: 0}, {Device: 1}}, Options: []string{"ro"}},
		},
		{
			name: "view of one layer",
			m:    mount.Mount{Type: "bind", Source: snap("1", "fs"), Options: []string{"ro", "rbind"}},
			want: Plan{Devices: []Device{l1}, Lower: []Ref{{Device: 0}}},
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p, err := Parse([]mount.Mount{tc.m})
			if err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(*p, tc.want) {
				t.Errorf("plan\n%+v\nwant\n%+v", *p, tc.want)
			}
		})
	}
}

func TestParseHostMountsRejects(t *testing.T) {
	root := hostRoot(t)
	snap := func(id, sub string) string { return filepath.Join(root, "snapshots", id, sub) }
	other := t.TempDir()
	for _, tc := range []struct {
		name string
		m    mount.Mount
		want string
	}{
		{
			name: "a layer directory without an image",
			m:    mount.Mount{Type: "bind", Source: snap("3", "fs"), Options: []string{"ro", "rbind"}},
			want: "has no layer image beside it",
		},
		{
			name: "a directory that is no snapshot's",
			m:    mount.Mount{Type: "overlay", Source: "overlay", Options: []string{"lowerdir=/var/lib/other/fs"}},
			want: "needs a host directory",
		},
		{
			name: "layers of two roots",
			m: mount.Mount{Type: "overlay", Source: "overlay", Options: []string{
				"lowerdir=" + snap("1", "fs") + ":" + filepath.Join(other, "snapshots", "9", "fs")}},
			want: "needs a host directory",
		},
		{
			name: "upper and work of two snapshots",
			m: mount.Mount{Type: "overlay", Source: "overlay", Options: []string{
				"upperdir=" + snap("3", "upper"), "workdir=" + snap("1", "work"), "lowerdir=" + snap("1", "fs")}},
			want: "needs a host directory",
		},
		{
			name: "a read-only bind of an upper directory",
			m:    mount.Mount{Type: "bind", Source: snap("3", "upper"), Options: []string{"ro", "rbind"}},
			want: "needs a host directory",
		},
		{
			name: "an overlay option outside the allow-list",
			m: mount.Mount{Type: "overlay", Source: "overlay", Options: []string{
				"upperdir=" + snap("3", "upper"), "workdir=" + snap("3", "work"), "lowerdir=" + snap("1", "fs"), "xino=on"}},
			want: `overlay option "xino=on" is not allowed`,
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Parse([]mount.Mount{tc.m})
			if err == nil || !strings.Contains(err.Error(), tc.want) || !errdefs.IsInvalidArgument(err) {
				t.Errorf("Parse = %v, want InvalidArgument containing %q", err, tc.want)
			}
		})
	}
}
