package rootfs

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/errdefs"
)

func rw(src string) mount.Mount {
	return mount.Mount{Type: "mkfs/ext4", Source: src,
		Options: []string{"X-containerd.mkfs.fs=ext4", "X-containerd.mkfs.size=67108864", "rw", "loop"}}
}

func layer(src string) mount.Mount {
	return mount.Mount{Type: "erofs", Source: src, Options: []string{"ro", "loop"}}
}

var (
	rwDev = Device{Source: "/s/3/rw.ext4", FSType: "ext4", Mkfs: &Mkfs{FS: "ext4", Size: 64 << 20}}
	l1    = Device{Source: "/s/2/layer.erofs", FSType: "erofs", ReadOnly: true}
	l2    = Device{Source: "/s/1/layer.erofs", FSType: "erofs", ReadOnly: true}
)

// The shapes of docs/mounts.md, as the snapshotter returns them.
func TestParseContractShapes(t *testing.T) {
	for _, tc := range []struct {
		name   string
		mounts []mount.Mount
		want   Plan
	}{
		{
			name: "A: active with two parents",
			mounts: []mount.Mount{rw("/s/3/rw.ext4"), layer("/s/2/layer.erofs"), layer("/s/1/layer.erofs"),
				{Type: "format/mkdir/overlay", Source: "overlay", Options: []string{
					"X-containerd.mkdir.path={{ mount 0 }}/upper:0755", "X-containerd.mkdir.path={{ mount 0 }}/work:0755",
					"upperdir={{ mount 0 }}/upper", "workdir={{ mount 0 }}/work", "lowerdir={{ overlay 1 2 }}", "index=off"}}},
			want: Plan{Devices: []Device{rwDev, l1, l2}, Lower: []Ref{{Device: 1}, {Device: 2}},
				Upper: &Ref{0, "upper"}, Work: &Ref{0, "work"}, Options: []string{"index=off"}},
		},
		{
			name: "A: active with one parent",
			mounts: []mount.Mount{rw("/s/3/rw.ext4"), layer("/s/2/layer.erofs"),
				{Type: "format/mkdir/overlay", Source: "overlay", Options: []string{
					"upperdir={{ mount 0 }}/upper", "workdir={{ mount 0 }}/work", "lowerdir={{ mount 1 }}"}}},
			want: Plan{Devices: []Device{rwDev, l1}, Lower: []Ref{{Device: 1}}, Upper: &Ref{0, "upper"}, Work: &Ref{0, "work"}},
		},
		{
			name: "B: active without parent",
			mounts: []mount.Mount{rw("/s/3/rw.ext4"), {Type: "format/mkdir/bind", Source: "{{ mount 0 }}/upper",
				Options: []string{"X-containerd.mkdir.path={{ mount 0 }}/upper:0755", "rw", "rbind"}}},
			want: Plan{Devices: []Device{rwDev}, Upper: &Ref{0, "upper"}},
		},
		{
			name:   "C: view of one layer",
			mounts: []mount.Mount{layer("/s/2/layer.erofs")},
			want:   Plan{Devices: []Device{l1}, Lower: []Ref{{Device: 0}}},
		},
		{
			name: "C: view of two layers",
			mounts: []mount.Mount{layer("/s/2/layer.erofs"), layer("/s/1/layer.erofs"),
				{Type: "format/overlay", Source: "overlay", Options: []string{"ro", "lowerdir={{ overlay 0 1 }}"}}},
			want: Plan{Devices: []Device{l1, l2}, Lower: []Ref{{Device: 0}, {Device: 1}}, Options: []string{"ro"}},
		},
		{
			name: "reversed overlay range and explicit lower list",
			mounts: []mount.Mount{layer("/s/2/layer.erofs"), layer("/s/1/layer.erofs"),
				{Type: "format/overlay", Source: "overlay", Options: []string{"lowerdir={{ overlay 1 0 }}"}}},
			want: Plan{Devices: []Device{l1, l2}, Lower: []Ref{{Device: 1}, {Device: 0}}},
		},
		{
			name:   "plain ext4 writable image",
			mounts: []mount.Mount{{Type: "ext4", Source: "/s/9/rw.ext4", Options: []string{"rw", "loop"}}},
			want:   Plan{Devices: []Device{{Source: "/s/9/rw.ext4", FSType: "ext4"}}, Upper: &Ref{Device: 0}},
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := Parse(tc.mounts)
			if err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(*got, tc.want) {
				t.Fatalf("got  %+v\nwant %+v", *got, tc.want)
			}
		})
	}
}

// WithTmpfsUpper drops the writable image and renumbers the layers; plans it does not
// apply to come back as they are.
func TestWithTmpfsUpper(t *testing.T) {
	active := Plan{Devices: []Device{rwDev, l1, l2}, Lower: []Ref{{Device: 1}, {Device: 2, Path: "p"}},
		Upper: &Ref{0, "upper"}, Work: &Ref{0, "work"}, Options: []string{"index=off"}}
	// A writable image that is listed after the layers it sits on.
	rwLast := Plan{Devices: []Device{l1, rwDev}, Lower: []Ref{{Device: 0}}, Upper: &Ref{1, "upper"}, Work: &Ref{1, "work"}}
	noParent := Plan{Devices: []Device{rwDev}, Upper: &Ref{0, "upper"}}
	view := Plan{Devices: []Device{l1, l2}, Lower: []Ref{{Device: 0}, {Device: 1}}, Options: []string{"ro"}}
	for _, tc := range []struct {
		name string
		in   *Plan
		want *Plan
	}{
		{"active with two parents", &active, &Plan{Devices: []Device{l1, l2}, Lower: []Ref{{Device: 0}, {Device: 1, Path: "p"}},
			TmpfsUpper: true, Options: []string{"index=off"}}},
		{"writable image last", &rwLast, &Plan{Devices: []Device{l1}, Lower: []Ref{{Device: 0}}, TmpfsUpper: true}},
		{"no parent: kept", &noParent, &noParent},
		{"a view: kept", &view, &view},
		{"none", nil, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := tc.in.WithTmpfsUpper(); !reflect.DeepEqual(got, tc.want) {
				t.Fatalf("got  %+v\nwant %+v", got, tc.want)
			}
		})
	}
	if active.Upper == nil || len(active.Devices) != 3 {
		t.Errorf("the plan it was given changed: %+v", active)
	}
}

func TestParseRejects(t *testing.T) {
	overlay := func(opts ...string) mount.Mount {
		return mount.Mount{Type: "format/mkdir/overlay", Source: "overlay", Options: opts}
	}
	for _, tc := range []struct {
		name   string
		mounts []mount.Mount
		want   string
	}{
		{"nothing", nil, "no rootfs mounts"},
		{"host overlay", []mount.Mount{{Type: "overlay", Source: "overlay", Options: []string{"lowerdir=/a"}}}, "needs a host directory"},
		{"host bind", []mount.Mount{{Type: "bind", Source: "/var/lib/x", Options: []string{"rbind"}}}, "needs a host directory"},
		{"unknown type", []mount.Mount{{Type: "xfs", Source: "/a"}}, `"xfs" is not supported`},
		{"relative source", []mount.Mount{layer("layer.erofs")}, "not an absolute path"},
		{"erofs rw", []mount.Mount{{Type: "erofs", Source: "/a", Options: []string{"rw"}}}, "read-only"},
		{"unknown device option", []mount.Mount{{Type: "erofs", Source: "/a", Options: []string{"ro", "device=/b"}}}, `"device=/b"`},
		{"mkfs without size", []mount.Mount{{Type: "mkfs/ext4", Source: "/a", Options: []string{"rw"}}}, "mkfs.size"},
		{"mkfs xfs", []mount.Mount{{Type: "mkfs/xfs", Source: "/a", Options: []string{"X-containerd.mkfs.size=1M"}}}, `"xfs" is not supported`},
		{"mkfs bad size", []mount.Mount{{Type: "mkfs/ext4", Source: "/a", Options: []string{"X-containerd.mkfs.size=lots"}}}, "mkfs.size=lots"},
		{"two devices, no overlay", []mount.Mount{layer("/a"), layer("/b")}, "without an overlay"},
		{"overlay not last", []mount.Mount{layer("/a"), overlay("lowerdir={{ mount 0 }}"), layer("/b")}, "not supported"},
		{"mount out of range", []mount.Mount{layer("/a"), overlay("lowerdir={{ mount 3 }}")}, "names mount 3"},
		{"overlay range out of range", []mount.Mount{layer("/a"), overlay("lowerdir={{ overlay 0 4 }}")}, "names mount 1"},
		{"host path lowerdir", []mount.Mount{layer("/a"), overlay("lowerdir=/var/lib/layer")}, "host paths cannot reach"},
		{"escaping sub-directory", []mount.Mount{rw("/r"), layer("/a"), overlay("lowerdir={{ mount 1 }}", "upperdir={{ mount 0 }}/../x", "workdir={{ mount 0 }}/work")}, "clean relative"},
		{"upper on a layer", []mount.Mount{rw("/r"), layer("/a"), overlay("lowerdir={{ mount 1 }}", "upperdir={{ mount 1 }}/upper", "workdir={{ mount 0 }}/work")}, "read-only device"},
		{"writable lower", []mount.Mount{rw("/r"), layer("/a"), overlay("lowerdir={{ overlay 0 1 }}")}, "not read-only"},
		{"upper without work", []mount.Mount{rw("/r"), layer("/a"), overlay("lowerdir={{ mount 1 }}", "upperdir={{ mount 0 }}/upper")}, "both upperdir and workdir"},
		{"no lowerdir", []mount.Mount{rw("/r"), overlay("upperdir={{ mount 0 }}/u", "workdir={{ mount 0 }}/w")}, "without lowerdir"},
		{"option not allowed", []mount.Mount{layer("/a"), overlay("lowerdir={{ mount 0 }}", "xino=on")}, `"xino=on" is not allowed`},
		{"stray mkdir", []mount.Mount{rw("/r"), layer("/a"), overlay("lowerdir={{ mount 1 }}", "upperdir={{ mount 0 }}/upper", "workdir={{ mount 0 }}/work", "X-containerd.mkdir.path={{ mount 0 }}/etc:0755")}, "neither upperdir nor workdir"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p, err := Parse(tc.mounts)
			if err == nil {
				t.Fatalf("accepted: %+v", p)
			}
			if !errdefs.IsInvalidArgument(err) || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("error %q, want InvalidArgument mentioning %q", err, tc.want)
			}
		})
	}
}

func TestFormatCreatesOnlyOnce(t *testing.T) {
	if _, err := exec.LookPath("mkfs.ext4"); err != nil {
		t.Skip("needs mkfs.ext4 (make deps)")
	}
	dir := t.TempDir()
	d := Device{Source: filepath.Join(dir, "rw.ext4"), FSType: "ext4", Mkfs: &Mkfs{FS: "ext4", Size: 64 << 20}}
	if err := Format(context.Background(), d); err != nil {
		t.Fatal(err)
	}
	st, err := os.Stat(d.Source)
	if err != nil || st.Size() != 64<<20 {
		t.Fatalf("image: %v, %v", st, err)
	}
	out, err := exec.Command("dumpe2fs", "-h", d.Source).CombinedOutput()
	if err != nil || !strings.Contains(string(out), "Filesystem magic number:  0xEF53") {
		t.Fatalf("not an ext4 image: %v\n%s", err, out)
	}
	// An existing image is left alone (it holds a container's writes).
	os.WriteFile(d.Source, []byte("keep me"), 0o644)
	if err := Format(context.Background(), d); err != nil {
		t.Fatal(err)
	}
	if b, _ := os.ReadFile(d.Source); string(b) != "keep me" {
		t.Fatal("Format overwrote an existing image")
	}
	// A failing mkfs leaves nothing behind.
	bad := Device{Source: filepath.Join(dir, "bad.ext4"), FSType: "ext4", Mkfs: &Mkfs{FS: "ext4", Size: 4096}}
	if err := Format(context.Background(), bad); err == nil {
		t.Fatal("mkfs of a 4 KiB image succeeded")
	}
	if entries, _ := os.ReadDir(dir); len(entries) != 1 {
		t.Fatalf("left behind: %v", entries)
	}
}
