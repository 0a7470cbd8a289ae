package rootfs

import (
	"os"
	"path"
	"path/filepath"
	"strings"
	"testing"

	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/errdefs"
)

// FuzzParse plans arbitrary mount lists, encoded one mount a line as
// "type<TAB>source<TAB>option,option,...". ROOT in an input stands for a snapshotter
// root holding snapshots 1 (layer.erofs) and 2 (layer.ext4), so that host mounts
// (host.go) find their layer images. Parse must refuse with an InvalidArgument, and a
// plan it returns must be one the agent can assemble: devices it can attach, lower
// layers read-only, upper and work on the same writable device in separate
// directories, references inside their device, only allowed overlay options.
func FuzzParse(f *testing.F) {
	root := f.TempDir()
	for _, img := range []string{"snapshots/1/layer.erofs", "snapshots/2/layer.ext4"} {
		p := filepath.Join(root, img)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			f.Fatal(err)
		}
		if err := os.WriteFile(p, nil, 0o644); err != nil {
			f.Fatal(err)
		}
	}
	for _, ms := range [][]mount.Mount{
		{rw("/s/3/rw.ext4"), layer("/s/2/layer.erofs"), layer("/s/1/layer.erofs"),
			{Type: "format/mkdir/overlay", Source: "overlay", Options: []string{
				"X-containerd.mkdir.path={{ mount 0 }}/upper:0755", "X-containerd.mkdir.path={{ mount 0 }}/work:0755",
				"upperdir={{ mount 0 }}/upper", "workdir={{ mount 0 }}/work", "lowerdir={{ overlay 1 2 }}", "index=off"}}},
		{rw("/s/3/rw.ext4"), {Type: "format/mkdir/bind", Source: "{{ mount 0 }}/upper",
			Options: []string{"X-containerd.mkdir.path={{ mount 0 }}/upper:0755", "rw", "rbind"}}},
		{layer("/s/2/layer.erofs"), layer("/s/1/layer.erofs"),
			{Type: "format/overlay", Source: "overlay", Options: []string{"lowerdir={{ mount 0 }}:{{ mount 1 }}"}}},
		{layer("/s/1/layer.erofs")},
		{{Type: "ext4", Source: "/s/1/layer.ext4", Options: []string{"ro", "noload"}}},
		{{Type: "overlay", Source: "overlay", Options: []string{"lowerdir=ROOT/snapshots/2/fs:ROOT/snapshots/1/fs",
			"upperdir=ROOT/snapshots/3/upper", "workdir=ROOT/snapshots/3/work", "index=off"}}},
		{{Type: "overlay", Source: "overlay", Options: []string{"lowerdir=ROOT/snapshots/1/fs"}}},
		{{Type: "bind", Source: "ROOT/snapshots/3/upper", Options: []string{"rbind", "rw"}}},
		{{Type: "bind", Source: "ROOT/snapshots/2/fs", Options: []string{"rbind", "ro"}}},
		{{Type: "bind", Source: "/home/user", Options: []string{"rbind"}}},
	} {
		f.Add(encodeMounts(ms))
	}
	f.Fuzz(func(t *testing.T, in string) {
		mounts := decodeMounts(strings.ReplaceAll(in, "ROOT", root))
		p, err := Parse(mounts)
		if err != nil {
			if !errdefs.IsInvalidArgument(err) {
				t.Errorf("Parse: %v: not an InvalidArgument", err)
			}
			return
		}
		checkPlan(t, p)
	})
}

func encodeMounts(ms []mount.Mount) string {
	var lines []string
	for _, m := range ms {
		lines = append(lines, m.Type+"\t"+m.Source+"\t"+strings.Join(m.Options, ","))
	}
	return strings.Join(lines, "\n")
}

func decodeMounts(s string) []mount.Mount {
	var ms []mount.Mount
	for _, line := range strings.Split(s, "\n") {
		f := strings.SplitN(line, "\t", 3)
		for len(f) < 3 {
			f = append(f, "")
		}
		m := mount.Mount{Type: f[0], Source: f[1]}
		if f[2] != "" {
			m.Options = strings.Split(f[2], ",")
		}
		ms = append(ms, m)
	}
	return ms
}

func checkPlan(t *testing.T, p *Plan) {
	t.Helper()
	if len(p.Devices) == 0 {
		t.Fatalf("plan without devices: %+v", p)
	}
	for i, d := range p.Devices {
		switch {
		case !path.IsAbs(d.Source):
			t.Errorf("device %d: source %q is not absolute", i, d.Source)
		case d.FSType != "erofs" && d.FSType != "ext4":
			t.Errorf("device %d: file system %q", i, d.FSType)
		case d.FSType == "erofs" && !d.ReadOnly:
			t.Errorf("device %d: writable erofs", i)
		case d.Mkfs != nil && (d.Mkfs.FS != "ext4" || d.Mkfs.Size <= 0 || d.ReadOnly):
			t.Errorf("device %d: mkfs %+v (read-only %v)", i, d.Mkfs, d.ReadOnly)
		}
	}
	ref := func(what string, r Ref) bool {
		if r.Device < 0 || r.Device >= len(p.Devices) {
			t.Errorf("%s: device %d of %d", what, r.Device, len(p.Devices))
			return false
		}
		if r.Path != "" && (path.IsAbs(r.Path) || path.Clean(r.Path) != r.Path || r.Path == ".." || strings.HasPrefix(r.Path, "../")) {
			t.Errorf("%s: path %q leaves its device", what, r.Path)
		}
		return true
	}
	if len(p.Lower) == 0 && p.Upper == nil {
		t.Errorf("plan with neither lower layers nor an upper: %+v", p)
	}
	for i, r := range p.Lower {
		if ref("lower", r) && !p.Devices[r.Device].ReadOnly {
			t.Errorf("lower %d on writable device %d", i, r.Device)
		}
	}
	if p.Upper != nil && ref("upper", *p.Upper) && p.Devices[p.Upper.Device].ReadOnly {
		t.Errorf("upper on read-only device %d", p.Upper.Device)
	}
	if p.Work != nil {
		if !ref("work", *p.Work) {
			return
		}
		// overlayfs: "workdir and upperdir must reside under the same mount" and
		// "must be separate subtrees".
		switch u, w := p.Upper, p.Work; {
		case u == nil:
			t.Errorf("work without upper")
		case u.Device != w.Device:
			t.Errorf("upper on device %d, work on device %d", u.Device, w.Device)
		case nested(u.Path, w.Path):
			t.Errorf("upper %q and work %q are not separate directories", u.Path, w.Path)
		}
	}
	if p.Upper != nil && p.Work == nil && (len(p.Lower) > 0 || len(p.Options) > 0) {
		t.Errorf("an upper without work, over lower layers %v or with overlay options %v", p.Lower, p.Options)
	}
	for _, o := range p.Options {
		if !OverlayOptionAllowed(o) {
			t.Errorf("overlay option %q passed on", o)
		}
	}
}

// nested reports whether a and b (clean relative paths, "" the root) are the same
// directory or one is inside the other.
func nested(a, b string) bool {
	in := func(x, y string) bool { return x == "" || x == y || strings.HasPrefix(y, x+"/") }
	return in(a, b) || in(b, a)
}
