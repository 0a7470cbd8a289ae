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
	"github.com/containerd/log"

	"github.com/caisson-containers/caisson/snapshotter/layer"
)

// Remove deletes the snapshot key and its files. A committed snapshot with
// children is ErrFailedPrecondition (from the metadata store).
func (s *Snapshotter) Remove(ctx context.Context, key string) error {
	var id string
	if err := s.ms.WithTransaction(ctx, true, func(ctx context.Context) (err error) {
		id, _, err = storage.Remove(ctx, key)
		return err
	}); err != nil {
		return fmt.Errorf("remove snapshot %q: %w", key, err)
	}
	// The metadata is gone, so the snapshot is; a failure to delete its files
	// only leaves an orphan for Cleanup. A host-mounted layer is unmounted
	// first, or RemoveAll would descend into it.
	if err := unmountLayer(s.snapshotDir(id)); err != nil {
		log.G(ctx).WithError(err).WithField("id", id).Warn("failed to unmount the snapshot's layer; Cleanup will retry")
	} else if err := os.RemoveAll(s.snapshotDir(id)); err != nil {
		log.G(ctx).WithError(err).WithField("id", id).Warn("failed to remove snapshot directory; Cleanup will retry")
	}
	return nil
}

// Cleanup removes what no snapshot owns: snapshot directories without metadata
// (a crash during Prepare or Remove), writable images of committed snapshots and
// half-built layer images (a crash during Commit), and commit mounts a killed
// process left mounted. Anything an operation of this process is using is left alone.
func (s *Snapshotter) Cleanup(ctx context.Context) error {
	var (
		ids       map[string]string
		committed = map[string]bool{}
		dirs      []os.DirEntry
	)
	// A write transaction, so that no snapshot is being created or removed
	// while the directories are compared with the metadata.
	if err := s.ms.WithTransaction(ctx, true, func(ctx context.Context) (err error) {
		if ids, err = storage.IDMap(ctx); err != nil {
			return err
		}
		if err := storage.WalkInfo(ctx, func(ctx context.Context, info snapshots.Info) error {
			if info.Kind == snapshots.KindCommitted {
				committed[info.Name] = true
			}
			return nil
		}); err != nil {
			return err
		}
		dirs, err = os.ReadDir(filepath.Join(s.root, "snapshots"))
		return err
	}); err != nil {
		return err
	}

	var errs []error
	// Stale commit mounts first: their images are in snapshot directories.
	mnts, err := os.ReadDir(filepath.Join(s.root, "mnt"))
	if err != nil {
		return err
	}
	for _, e := range mnts {
		// ROOT/mnt/ID is a commit's: wait for a running one to finish.
		unlock := s.lockID(e.Name())
		p := filepath.Join(s.root, "mnt", e.Name())
		if err := mount.UnmountAll(p, 0); err != nil {
			errs = append(errs, err)
		} else if err := os.Remove(p); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, err)
		}
		unlock()
	}

	for _, e := range dirs {
		name := e.Name()
		dir := filepath.Join(s.root, "snapshots", name)
		key, known := ids[name]
		if !known {
			if s.held(name) { // a snapshot being created
				continue
			}
			log.G(ctx).WithField("path", dir).Info("removing orphaned snapshot directory")
			if err := unmountLayer(dir); err != nil {
				errs = append(errs, err)
			} else if err := os.RemoveAll(dir); err != nil {
				errs = append(errs, err)
			}
			continue
		}
		errs = append(errs, s.cleanupSnapshotDir(ctx, name, dir, committed[key])...)
	}
	return errors.Join(errs...)
}

// cleanupSnapshotDir removes a crashed commit's leftovers from the directory
// of snapshot id, after waiting for a running commit of it to finish.
func (s *Snapshotter) cleanupSnapshotDir(ctx context.Context, id, dir string, committed bool) []error {
	unlock := s.lockID(id)
	defer unlock()
	files, err := os.ReadDir(dir)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) { // removed meanwhile
			return nil
		}
		return []error{err}
	}
	var errs []error
	for _, f := range files {
		p := filepath.Join(dir, f.Name())
		orphan := strings.HasSuffix(f.Name(), layer.TempSuffix) ||
			(committed && (f.Name() == writableName || f.Name() == appliedName || f.Name() == upperName || f.Name() == workName))
		if !orphan {
			continue
		}
		log.G(ctx).WithField("path", p).Info("removing leftover of an interrupted commit")
		if err := os.RemoveAll(p); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, err)
		}
	}
	return errs
}
