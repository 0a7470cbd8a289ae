package snapshotter

import (
	"context"
	"fmt"
	"os"
	"path/filepath"

	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/core/snapshots/storage"
	"github.com/containerd/log"
)

// Prepare creates an active snapshot of parent and returns its mounts (docs/mounts.md
// shapes A and B). Nothing is written but the metadata and an empty snapshot
// directory: the writable image is created by whoever activates its mkfs mount.
func (s *Snapshotter) Prepare(ctx context.Context, key, parent string, opts ...snapshots.Opt) ([]mount.Mount, error) {
	return s.create(ctx, snapshots.KindActive, key, parent, opts)
}

// View creates a read-only snapshot of parent and returns its mounts (shape C).
func (s *Snapshotter) View(ctx context.Context, key, parent string, opts ...snapshots.Opt) ([]mount.Mount, error) {
	return s.create(ctx, snapshots.KindView, key, parent, opts)
}

func (s *Snapshotter) create(ctx context.Context, kind snapshots.Kind, key, parent string, opts []snapshots.Opt) (_ []mount.Mount, retErr error) {
	// The directory is made under a temporary name first and renamed to the
	// snapshot's id inside the transaction that creates it, so a crash leaves
	// either a new-* directory or a complete snapshot (both Cleanup's business).
	td, err := os.MkdirTemp(filepath.Join(s.root, "snapshots"), tempDirPrefix)
	if err != nil {
		return nil, fmt.Errorf("create snapshot directory: %w", err)
	}
	release := s.hold(filepath.Base(td))
	defer release()
	defer func() {
		if td != "" {
			if err := os.RemoveAll(td); err != nil {
				log.G(ctx).WithError(err).WithField("path", td).Warn("failed to remove temporary snapshot directory")
			}
		}
	}()

	var (
		snap  storage.Snapshot
		info  snapshots.Info
		chain []layerRef
	)
	if err := s.ms.WithTransaction(ctx, true, func(ctx context.Context) (err error) {
		snap, err = storage.CreateSnapshot(ctx, kind, key, parent, opts...)
		if err != nil {
			return err
		}
		if _, info, _, err = storage.GetInfo(ctx, key); err != nil {
			return err
		}
		if kind == snapshots.KindActive {
			// A bad size label fails Prepare, not the first activation.
			if _, err := s.writableSize(info); err != nil {
				return err
			}
		}
		if kind == snapshots.KindActive && s.cfg.HostMounts {
			if err := makeUpper(td); err != nil {
				return err
			}
		}
		dir := s.snapshotDir(snap.ID)
		if err := os.Rename(td, dir); err != nil {
			return fmt.Errorf("create snapshot directory: %w", err)
		}
		// Until the transaction commits, the directory is the temporary one:
		// if the commit fails, the id may be handed out again.
		td = dir
		return nil
	}); err != nil {
		return nil, err
	}
	td = ""
	chain = s.layers(snap)
	return s.mounts(snap, info, chain)
}

// Mounts returns the mounts of the active or view snapshot key: an active
// snapshot whose layer WriteLayer wrote shows it read-only over its parents
// (docs/mounts.md, "Unpack"). A committed snapshot has none:
// ErrFailedPrecondition, as from containerd's snapshotters.
func (s *Snapshotter) Mounts(ctx context.Context, key string) ([]mount.Mount, error) {
	var (
		snap storage.Snapshot
		info snapshots.Info
	)
	if err := s.ms.WithTransaction(ctx, false, func(ctx context.Context) (err error) {
		if snap, err = storage.GetSnapshot(ctx, key); err != nil {
			return err
		}
		_, info, _, err = storage.GetInfo(ctx, key)
		return err
	}); err != nil {
		return nil, err
	}
	return s.mounts(snap, info, s.layers(snap))
}
