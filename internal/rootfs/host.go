package rootfs

import (
	"fmt"
	"os"
	"path"
	"regexp"
	"strings"

	"github.com/containerd/containerd/v2/core/mount"
)

// Host mounts (docs/mounts.md, "Host mounts"): with mount_mode "host", for
// containerd 1.7–2.1, the snapshotter returns one plain overlay or bind over
// host directories: committed layers loop-mounted at ROOT/snapshots/ID/fs, and
// an active snapshot's ROOT/snapshots/ID/upper and work. The VM cannot use host
// directories, but each names its snapshot, and so the files behind it:
// fromHostMounts rewrites such a list into the template mounts of the same
// snapshot, which Parse plans as always.
//
// The writes of a container go to a writable image the shim creates beside the
// upper directory, ROOT/snapshots/ID/rw.ext4 (of HostWritableSize), not to the
// host upper directory, which stays empty: on containerd 1.7–2.1 a container's
// changes are not in a diff or commit of its snapshot.

// HostWritableSize is the apparent size of the writable image of a container on
// host mounts: the snapshotter's default_writable_size default (its label and
// setting do not reach the shim through host mounts).
const HostWritableSize = 10 << 30

var (
	hostLayerDir = regexp.MustCompile(`^(/.+)/snapshots/([0-9]+)/fs$`)
	hostUpperDir = regexp.MustCompile(`^(/.+)/snapshots/([0-9]+)/(upper|work)$`)
)

// fromHostMounts returns the template mounts of host mounts, and false if
// mounts are not host mounts of the snapshotter.
func fromHostMounts(mounts []mount.Mount) ([]mount.Mount, bool, error) {
	if len(mounts) != 1 {
		return nil, false, nil
	}
	m := mounts[0]
	switch m.Type {
	case "overlay":
		return hostOverlay(m)
	case "bind", "rbind":
		return hostBind(m)
	}
	return nil, false, nil
}

func hostOverlay(m mount.Mount) ([]mount.Mount, bool, error) {
	var (
		lowers        []string
		upper, work   string
		passed        []string
		root, snapDir string
	)
	for _, o := range m.Options {
		key, value, _ := strings.Cut(o, "=")
		switch key {
		case "lowerdir":
			lowers = strings.Split(value, ":")
		case "upperdir":
			upper = value
		case "workdir":
			work = value
		default:
			passed = append(passed, o)
		}
	}
	if len(lowers) == 0 {
		return nil, false, nil
	}
	var devices []mount.Mount
	if upper != "" || work != "" {
		u := hostUpperDir.FindStringSubmatch(path.Clean(upper))
		w := hostUpperDir.FindStringSubmatch(path.Clean(work))
		if u == nil || w == nil || u[3] != "upper" || w[3] != "work" || u[1] != w[1] || u[2] != w[2] {
			return nil, false, nil
		}
		root, snapDir = u[1], path.Join(u[1], "snapshots", u[2])
		devices = append(devices, writableMount(snapDir))
	}
	for _, l := range lowers {
		lm, lroot, ok, err := hostLayerMount(l, root)
		if !ok || err != nil {
			return nil, ok, err
		}
		root = lroot
		devices = append(devices, lm)
	}
	if upper == "" {
		// A read-only overlay of layers (a view).
		opts := append([]string{fmt.Sprintf("lowerdir={{ overlay 0 %d }}", len(devices)-1)}, passed...)
		return append(devices, mount.Mount{Type: "format/overlay", Source: "overlay", Options: opts}), true, nil
	}
	lowerdir := "lowerdir={{ mount 1 }}"
	if len(devices) > 2 {
		lowerdir = fmt.Sprintf("lowerdir={{ overlay 1 %d }}", len(devices)-1)
	}
	opts := append([]string{
		"X-containerd.mkdir.path={{ mount 0 }}/upper:0755",
		"X-containerd.mkdir.path={{ mount 0 }}/work:0755",
		"upperdir={{ mount 0 }}/upper",
		"workdir={{ mount 0 }}/work",
		lowerdir,
	}, passed...)
	return append(devices, mount.Mount{Type: "format/mkdir/overlay", Source: "overlay", Options: opts}), true, nil
}

func hostBind(m mount.Mount) ([]mount.Mount, bool, error) {
	src := path.Clean(m.Source)
	if u := hostUpperDir.FindStringSubmatch(src); u != nil && u[3] == "upper" {
		// The writable bind of a snapshot without parents.
		for _, o := range m.Options {
			if o == "ro" {
				return nil, false, nil
			}
		}
		return []mount.Mount{writableMount(path.Dir(src)), {
			Type:    "format/mkdir/bind",
			Source:  "{{ mount 0 }}/upper",
			Options: []string{"X-containerd.mkdir.path={{ mount 0 }}/upper:0755", "rw", "rbind"},
		}}, true, nil
	}
	lm, _, ok, err := hostLayerMount(src, "")
	if !ok || err != nil {
		return nil, ok, err
	}
	return []mount.Mount{lm}, true, nil
}

// hostLayerMount is the device mount of the layer mounted at dir
// (ROOT/snapshots/ID/fs): its image beside it, EROFS or ext4. A dir outside
// root (when root is set) is no layer of the same snapshotter.
func hostLayerMount(dir, root string) (mount.Mount, string, bool, error) {
	l := hostLayerDir.FindStringSubmatch(path.Clean(dir))
	if l == nil || (root != "" && l[1] != root) {
		return mount.Mount{}, "", false, nil
	}
	snapDir := path.Dir(path.Clean(dir))
	for _, fs := range []string{"erofs", "ext4"} {
		image := path.Join(snapDir, "layer."+fs)
		if _, err := os.Stat(image); err == nil {
			return mount.Mount{Type: fs, Source: image, Options: []string{"ro"}}, l[1], true, nil
		}
	}
	return mount.Mount{}, "", true, invalid("layer directory %s has no layer image beside it (layer.erofs or layer.ext4)", dir)
}

func writableMount(snapDir string) mount.Mount {
	return mount.Mount{
		Type:   "mkfs/ext4",
		Source: path.Join(snapDir, "rw.ext4"),
		Options: []string{
			"X-containerd.mkfs.fs=ext4",
			fmt.Sprintf("X-containerd.mkfs.size=%d", HostWritableSize),
			"rw",
		},
	}
}
