package snapshotter

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/core/snapshots/storage"
	"github.com/containerd/errdefs"
	"github.com/moby/sys/mountinfo"
	"golang.org/x/sys/unix"
)

// Host mounts (mount_mode "host", docs/mounts.md "Host mounts"): for containerd
// 1.7–2.1, which mount a container's rootfs on the host themselves, every
// committed layer stays loop-mounted read-only at ROOT/snapshots/ID/fs, and an
// active snapshot's writes go to the host directories ROOT/snapshots/ID/upper
// and work. Mounts are plain overlay and bind mounts over those directories.
const (
	layerMountName = "fs"
	upperName      = "upper"
	workName       = "work"
)

func (s *Snapshotter) layerMountPath(id string) string {
	return filepath.Join(s.snapshotDir(id), layerMountName)
}

func (s *Snapshotter) upperPath(id string) string {
	return filepath.Join(s.snapshotDir(id), upperName)
}

// hostMounts is mounts for mount_mode "host": lowers (top-most first) are
// mounted layers; an active snapshot (upper != "") adds its upper directory.
func (s *Snapshotter) hostMounts(id string, lowers []layerRef, active bool) []mount.Mount {
	dirs := make([]string, len(lowers))
	for i, l := range lowers {
		dirs[i] = s.layerMountPath(l.id)
	}
	if active {
		if len(dirs) == 0 {
			return []mount.Mount{{Type: "bind", Source: s.upperPath(id), Options: []string{"rw", "rbind"}}}
		}
		opts := []string{
			"upperdir=" + s.upperPath(id),
			"workdir=" + filepath.Join(s.snapshotDir(id), workName),
			"lowerdir=" + strings.Join(dirs, ":"),
		}
		return []mount.Mount{{Type: "overlay", Source: "overlay", Options: append(opts, s.cfg.OverlayOptions...)}}
	}
	switch len(dirs) {
	case 0:
		return []mount.Mount{{Type: "bind", Source: filepath.Join(s.root, "empty"), Options: []string{"ro", "rbind"}}}
	case 1:
		return []mount.Mount{{Type: "bind", Source: dirs[0], Options: []string{"ro", "rbind"}}}
	}
	opts := []string{"ro", "lowerdir=" + strings.Join(dirs, ":")}
	for _, o := range s.cfg.OverlayOptions {
		if o != "volatile" { // volatile needs an upper directory
			opts = append(opts, o)
		}
	}
	return []mount.Mount{{Type: "overlay", Source: "overlay", Options: opts}}
}

// makeUpper creates an active snapshot's upper and work directories in dir.
func makeUpper(dir string) error {
	for _, name := range []string{upperName, workName} {
		if err := os.Mkdir(filepath.Join(dir, name), 0o755); err != nil {
			return fmt.Errorf("create %s directory: %w", name, err)
		}
	}
	return nil
}

// mountLayer loop-mounts id's layer image read-only at its fs directory, unless
// it is mounted there already.
func (s *Snapshotter) mountLayer(id string) error {
	target := s.layerMountPath(id)
	if err := os.Mkdir(target, 0o755); err != nil && !errors.Is(err, os.ErrExist) {
		return err
	}
	if mounted, err := mountinfo.Mounted(target); err != nil {
		return err
	} else if mounted {
		return nil
	}
	m := mount.Mount{Type: s.builder.MountType(), Source: s.layerPath(id), Options: []string{"ro", "loop"}}
	if err := m.Mount(target); err != nil {
		return fmt.Errorf("mount layer %s: %w", id, err)
	}
	return nil
}

// unmountLayer undoes mountLayer, if the layer is mounted.
func unmountLayer(dir string) error {
	target := filepath.Join(dir, layerMountName)
	if _, err := os.Lstat(target); errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err := mount.UnmountAll(target, 0); err != nil {
		return fmt.Errorf("unmount layer at %s: %w", target, err)
	}
	return nil
}

// mountCommitted mounts every committed layer that is not mounted: after a
// reboot, or when a snapshotter that used template mounts restarts with host mounts.
func (s *Snapshotter) mountCommitted(ctx context.Context) error {
	var ids []string
	if err := s.ms.WithTransaction(ctx, false, func(ctx context.Context) error {
		return storage.WalkInfo(ctx, func(ctx context.Context, info snapshots.Info) error {
			if info.Kind != snapshots.KindCommitted {
				return nil
			}
			id, _, _, err := storage.GetInfo(ctx, info.Name)
			ids = append(ids, id)
			return err
		})
	}); err != nil && !errdefs.IsNotFound(err) { // a new store has no buckets yet
		return err
	}
	var errs []error
	for _, id := range ids {
		errs = append(errs, s.mountLayer(id))
	}
	return errors.Join(errs...)
}

// unmountLayers unmounts every layer mounted under the snapshot directories,
// but those a mount still uses (an overlay of a running container): they stay
// mounted, and New finds them so.
func (s *Snapshotter) unmountLayers() error {
	dirs, err := os.ReadDir(filepath.Join(s.root, "snapshots"))
	if err != nil {
		return err
	}
	var errs []error
	for _, d := range dirs {
		if err := unmountLayer(filepath.Join(s.root, "snapshots", d.Name())); err != nil && !errors.Is(err, unix.EBUSY) {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// hostActiveID returns the snapshot id of host mounts of an active snapshot:
// an overlay whose upperdir, or a bind whose source, is a snapshot's upper directory.
func (s *Snapshotter) hostActiveID(mounts []mount.Mount) (string, bool) {
	if len(mounts) != 1 {
		return "", false
	}
	m := mounts[0]
	var upper string
	switch m.Type {
	case "overlay":
		for _, o := range m.Options {
			if v, ok := strings.CutPrefix(o, "upperdir="); ok {
				upper = v
			}
		}
	case "bind", "rbind":
		upper = m.Source
	}
	upper = filepath.Clean(upper)
	dir := filepath.Dir(upper)
	if filepath.Base(upper) != upperName || filepath.Dir(dir) != filepath.Join(s.root, "snapshots") {
		return "", false
	}
	return filepath.Base(dir), true
}

// upperEmpty reports whether id's upper directory holds nothing.
func (s *Snapshotter) upperEmpty(id string) (bool, error) {
	entries, err := os.ReadDir(s.upperPath(id))
	if err != nil {
		return false, err
	}
	return len(entries) == 0, nil
}
