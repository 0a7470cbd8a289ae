package snapshotter

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/core/snapshots/storage"
	"github.com/containerd/errdefs"
	"github.com/containerd/log"
)

// Commit turns the active snapshot key into the committed snapshot name: a layer
// image written by WriteLayer is adopted as it is; otherwise the /upper directory
// of its writable image becomes the layer image (docs/mounts.md, "Commit"), then
// the writable image is removed. The caller must have unmounted (deactivated) the
// snapshot's mounts.
//
// The layer is built outside any metadata transaction. A failure (a bad tree, a
// full disk) leaves the snapshot active and unchanged; a crash leaves at most a
// stale image that a retried Commit overwrites or Cleanup removes.
func (s *Snapshotter) Commit(ctx context.Context, name, key string, opts ...snapshots.Opt) error {
	var (
		id   string
		info snapshots.Info
	)
	if err := s.ms.WithTransaction(ctx, false, func(ctx context.Context) (err error) {
		id, info, _, err = storage.GetInfo(ctx, key)
		return err
	}); err != nil {
		return err
	}
	if info.Kind != snapshots.KindActive {
		return fmt.Errorf("snapshot %q is not active: %w", key, errdefs.ErrFailedPrecondition)
	}
	ctx = log.WithLogger(ctx, log.G(ctx).WithField("key", key).WithField("id", id))

	// One commit of a snapshot at a time: a second one waits, then finds the
	// snapshot committed (or still active, if the first failed).
	unlock := s.lockID(id)
	defer unlock()
	if err := s.ms.WithTransaction(ctx, false, func(ctx context.Context) (err error) {
		var again string
		again, info, _, err = storage.GetInfo(ctx, key)
		if err == nil && (again != id || info.Kind != snapshots.KindActive) {
			err = fmt.Errorf("snapshot %q was committed or replaced meanwhile: %w", key, errdefs.ErrNotFound)
		}
		return err
	}); err != nil {
		return err
	}

	dst := s.layerPath(id)
	adopted, err := s.appliedLayer(id)
	if err != nil {
		return err
	}
	if adopted {
		// The differ wrote the layer from the tar (WriteLayer). Anything
		// written through the mounts since is in the writable image, which the
		// layer does not have: refuse rather than lose either.
		if _, err := os.Lstat(s.writablePath(id)); err == nil {
			return fmt.Errorf("commit %q: the snapshot has a layer applied from a tar and was also activated and written to afterwards; "+
				"commit one or the other (remove the snapshot and unpack again): %w", key, errdefs.ErrFailedPrecondition)
		} else if !errors.Is(err, os.ErrNotExist) {
			return err
		}
	} else if err := s.buildLayer(ctx, id, dst); err != nil {
		return fmt.Errorf("commit %q: %w", key, err)
	}
	usage, err := fileUsage(dst)
	if err != nil {
		return err
	}
	if s.cfg.HostMounts {
		// Children's mounts name the layer's directory: mount it before anyone
		// can see the commit.
		if err := s.mountLayer(id); err != nil {
			return fmt.Errorf("commit %q: %w", key, err)
		}
	}
	if err := s.ms.WithTransaction(ctx, true, func(ctx context.Context) error {
		_, err := storage.CommitActive(ctx, key, name, usage, opts...)
		return err
	}); err != nil {
		if s.cfg.HostMounts {
			if uerr := unmountLayer(s.snapshotDir(id)); uerr != nil {
				log.G(ctx).WithError(uerr).Warn("failed to unmount the layer of a failed commit")
			}
		}
		// Still active (or gone): the layer image is not referenced by a
		// committed snapshot; keep the writable image, drop a built layer (an
		// applied one stays, for a retried Commit).
		if !adopted {
			if rerr := os.Remove(dst); rerr != nil && !errors.Is(rerr, os.ErrNotExist) {
				log.G(ctx).WithError(rerr).Warn("failed to remove uncommitted layer image")
			}
		}
		return fmt.Errorf("commit %q: %w", key, err)
	}
	// The staging space is freed now; a crash before this leaves a writable
	// image beside a committed layer, which Cleanup removes.
	for _, p := range []string{s.writablePath(id), filepath.Join(s.snapshotDir(id), appliedName),
		s.upperPath(id), filepath.Join(s.snapshotDir(id), workName)} {
		if err := os.RemoveAll(p); err != nil && !errors.Is(err, os.ErrNotExist) {
			log.G(ctx).WithError(err).WithField("path", p).Warn("failed to remove a file of the committed snapshot")
		}
	}
	log.G(ctx).WithField("name", name).WithField("bytes", usage.Size).Debug("committed layer")
	return nil
}

// buildLayer builds dst from the /upper directory of id's writable image, or an
// empty layer if the image was never created. The caller holds lockID(id).
func (s *Snapshotter) buildLayer(ctx context.Context, id, dst string) (retErr error) {
	if s.cfg.HostMounts {
		// The writes are in the host upper directory. (A Caisson container's are
		// not: the shim gives the VM an image of its own, docs/mounts.md.)
		return s.builder.Build(ctx, s.upperPath(id), dst)
	}
	rw := s.writablePath(id)
	mnt := filepath.Join(s.root, "mnt", id)

	if err := os.Mkdir(mnt, 0o700); err != nil && !errors.Is(err, os.ErrExist) {
		return err
	}
	defer func() {
		if err := os.Remove(mnt); err != nil && retErr == nil {
			retErr = fmt.Errorf("remove commit mount point: %w", err)
		}
	}()

	if _, err := os.Stat(rw); errors.Is(err, os.ErrNotExist) {
		// Never activated: nothing was written; the layer is empty.
		return s.builder.Build(ctx, filepath.Join(s.root, "empty"), dst)
	} else if err != nil {
		return err
	}
	// noload: read the image as it is even if its journal was not replayed.
	m := mount.Mount{Type: "ext4", Source: rw, Options: []string{"ro", "loop", "noload"}}
	if err := m.Mount(mnt); err != nil {
		return fmt.Errorf("mount writable image: %w", err)
	}
	defer func() {
		if err := mount.UnmountAll(mnt, 0); err != nil && retErr == nil {
			retErr = fmt.Errorf("unmount writable image: %w", err)
		}
	}()
	src := filepath.Join(mnt, "upper")
	fi, err := os.Lstat(src)
	switch {
	case errors.Is(err, os.ErrNotExist):
		// Formatted but no upper directory was ever made: an empty layer.
		return s.builder.Build(ctx, filepath.Join(s.root, "empty"), dst)
	case err != nil:
		return err
	case !fi.IsDir():
		return fmt.Errorf("writable image's upper is not a directory: %w", errdefs.ErrFailedPrecondition)
	}
	return s.builder.Build(ctx, src, dst)
}
