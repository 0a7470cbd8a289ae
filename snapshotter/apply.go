package snapshotter

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"

	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/core/snapshots/storage"
	"github.com/containerd/errdefs"
	"github.com/containerd/log"

	"github.com/caisson-containers/caisson/snapshotter/layer"
)

// appliedName marks a snapshot directory whose layer image was written by
// WriteLayer (and not left by an interrupted Commit).
const appliedName = "layer.applied"

// LayerWriteFunc writes a layer image into f, from offset 0. dir is the snapshot's
// directory, for scratch files (removed before it returns).
type LayerWriteFunc = func(ctx context.Context, f *os.File, dir string) error

// WriteLayer writes the layer image of the active snapshot whose mounts are
// mounts with write, so that Commit adopts it instead of building one from the
// writable image (docs/mounts.md, "Unpack"). It handles only what it can do
// exactly, and returns errdefs.ErrNotImplemented, before calling write, for
// everything else: mounts that are not an active snapshot of this snapshotter
// (shape A or B), a snapshot whose writable image exists (it may hold changes
// the layer would miss), and layer_filesystem "ext4".
//
// The image is written to a temporary file in the snapshot's directory, padded to
// dax_alignment and renamed into place; on error nothing is left. With sync, the
// image and the rename are synced before it returns.
func (s *Snapshotter) WriteLayer(ctx context.Context, mounts []mount.Mount, sync bool, write LayerWriteFunc) (retErr error) {
	if s.builder.FS != layer.EROFS && s.builder.FS != "" {
		return fmt.Errorf("layer_filesystem %q: only EROFS layers are written from a tar: %w", s.builder.FS, errdefs.ErrNotImplemented)
	}
	id, ok := s.activeID(mounts)
	if s.cfg.HostMounts {
		id, ok = s.hostActiveID(mounts)
	}
	if !ok {
		return fmt.Errorf("not the mounts of an active caisson snapshot under %s: %w", s.root, errdefs.ErrNotImplemented)
	}
	unlock := s.lockID(id)
	defer unlock()

	key, err := s.activeKey(ctx, id)
	if err != nil {
		return err
	}
	ctx = log.WithLogger(ctx, log.G(ctx).WithField("key", key).WithField("id", id))

	if s.cfg.HostMounts {
		if empty, err := s.upperEmpty(id); err != nil {
			return err
		} else if !empty {
			return fmt.Errorf("snapshot %q was written to (its upper directory is not empty): %w", key, errdefs.ErrNotImplemented)
		}
	} else {
		switch _, err := os.Lstat(s.writablePath(id)); {
		case err == nil:
			return fmt.Errorf("snapshot %q was activated (its writable image exists): %w", key, errdefs.ErrNotImplemented)
		case !errors.Is(err, os.ErrNotExist):
			return err
		}
	}
	dst := s.layerPath(id)
	switch _, err := os.Lstat(dst); {
	case err == nil:
		return fmt.Errorf("snapshot %q already has an applied layer: %w", key, errdefs.ErrFailedPrecondition)
	case !errors.Is(err, os.ErrNotExist):
		return err
	}

	dir := s.snapshotDir(id)
	tmp := dst + layer.TempSuffix
	if err := os.Remove(tmp); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	f, err := os.OpenFile(tmp, os.O_CREATE|os.O_EXCL|os.O_RDWR, 0o600)
	if err != nil {
		return err
	}
	defer func() {
		f.Close()
		if retErr != nil {
			os.Remove(tmp)
			if errors.Is(retErr, syscall.ENOSPC) {
				retErr = fmt.Errorf("%w (%w)", retErr, errdefs.ErrResourceExhausted)
			}
		}
	}()
	if err := write(ctx, f, dir); err != nil {
		return err
	}
	if err := layer.Pad(f, s.cfg.DAXAlignment); err != nil {
		return err
	}
	if sync {
		if err := f.Sync(); err != nil {
			return fmt.Errorf("sync layer image: %w", err)
		}
	}
	if err := f.Close(); err != nil {
		return err
	}
	// The marker first: a layer image without it is a crashed Commit's.
	if err := os.WriteFile(filepath.Join(dir, appliedName), nil, 0o600); err != nil {
		return err
	}
	if err := os.Rename(tmp, dst); err != nil {
		os.Remove(filepath.Join(dir, appliedName))
		return fmt.Errorf("rename layer image: %w", err)
	}
	if s.cfg.HostMounts {
		// The snapshot's mounts now show the layer (see mounts): mount it.
		if err := s.mountLayer(id); err != nil {
			os.Remove(filepath.Join(dir, appliedName))
			os.Remove(dst)
			return err
		}
	}
	if sync {
		if err := layer.SyncDir(dir); err != nil {
			return err
		}
	}
	log.G(ctx).Debug("layer written from tar")
	return nil
}

// Owns reports whether mounts are this snapshotter's (any shape of
// docs/mounts.md): whether some mount's source is one of its files.
func (s *Snapshotter) Owns(mounts []mount.Mount) bool {
	snaps := filepath.Join(s.root, "snapshots") + string(filepath.Separator)
	for _, m := range mounts {
		src := filepath.Clean(m.Source)
		if strings.HasPrefix(src, snaps) || src == filepath.Join(s.root, "empty") {
			return true
		}
		// Host mounts: an overlay over this snapshotter's directories.
		for _, o := range m.Options {
			if _, dirs, ok := strings.Cut(o, "dir="); ok && strings.HasPrefix(dirs, snaps) {
				return true
			}
		}
	}
	return false
}

// activeID returns the snapshot id of mounts if they are shape A or B of this
// snapshotter.
func (s *Snapshotter) activeID(mounts []mount.Mount) (string, bool) {
	if len(mounts) < 2 || mounts[0].Type != "mkfs/ext4" {
		return "", false
	}
	switch mounts[len(mounts)-1].Type {
	case "format/mkdir/overlay", "format/mkdir/bind":
	default:
		return "", false
	}
	src := filepath.Clean(mounts[0].Source)
	dir := filepath.Dir(src)
	if filepath.Base(src) != writableName || filepath.Dir(dir) != filepath.Join(s.root, "snapshots") {
		return "", false
	}
	return filepath.Base(dir), true
}

// appliedLayer reports whether snapshot id has a layer image written by
// WriteLayer.
func (s *Snapshotter) appliedLayer(id string) (bool, error) {
	for _, p := range []string{filepath.Join(s.snapshotDir(id), appliedName), s.layerPath(id)} {
		if _, err := os.Lstat(p); errors.Is(err, os.ErrNotExist) {
			return false, nil
		} else if err != nil {
			return false, err
		}
	}
	return true, nil
}

// activeKey is the key of the active snapshot id, which the caller has locked.
func (s *Snapshotter) activeKey(ctx context.Context, id string) (string, error) {
	var key string
	err := s.ms.WithTransaction(ctx, false, func(ctx context.Context) error {
		ids, err := storage.IDMap(ctx)
		if err != nil {
			return err
		}
		var known bool
		if key, known = ids[id]; !known {
			return fmt.Errorf("snapshot id %s: %w", id, errdefs.ErrNotFound)
		}
		_, info, _, err := storage.GetInfo(ctx, key)
		if err != nil {
			return err
		}
		if info.Kind != snapshots.KindActive {
			return fmt.Errorf("snapshot %q is not active: %w", key, errdefs.ErrFailedPrecondition)
		}
		return nil
	})
	return key, err
}
