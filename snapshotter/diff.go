package snapshotter

import (
	"archive/tar"
	"context"
	"fmt"
	"io"

	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/errdefs"
	"github.com/containerd/log"

	"github.com/caisson-containers/caisson/snapshotter/ext4read"
)

// WriteDiff writes to w the OCI layer diff (an uncompressed tar) of the active
// snapshot whose mounts are mounts (shape A or B): the /upper directory of its
// writable image, read in userspace by package ext4read, so a guest-written
// image is never mounted on the host (docs/mounts.md, "Diff"). opts.Format is
// always ext4read.FormatOCI. A snapshot never activated has an empty diff.
//
// Mounts that are not an active snapshot of this snapshotter in template mode
// are errdefs.ErrNotImplemented, before anything is written: host mounts' upper
// directories are the host's and any differ may read them. No other error is
// ErrNotImplemented: an image this reader cannot read must not go to a differ
// that would mount it.
func (s *Snapshotter) WriteDiff(ctx context.Context, mounts []mount.Mount, w io.Writer, opts ext4read.TarOptions) error {
	if s.cfg.HostMounts {
		return fmt.Errorf("host mounts: the upper directory is a host directory: %w", errdefs.ErrNotImplemented)
	}
	id, ok := s.activeID(mounts)
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
	opts.Format = ext4read.FormatOCI

	img, err := s.openWritable(ctx, id)
	if err != nil {
		return taken(fmt.Errorf("snapshot %q: %w", key, err))
	}
	defer img.Close()
	if img.upper == nil {
		// Nothing was written: an empty diff.
		return tar.NewWriter(w).Close()
	}
	if err := ext4read.WriteTar(ctx, img.fs, img.upper, w, opts); err != nil {
		return taken(fmt.Errorf("snapshot %q: writable image: %w", key, err))
	}
	return nil
}

// taken makes err, an error about a snapshot WriteDiff has taken, anything but
// errdefs.ErrNotImplemented, which would send the differ on to a comparer that
// mounts the image: a feature the reader does not read (one a guest can set)
// is errdefs.ErrFailedPrecondition here, with the same message.
func taken(err error) error {
	if errdefs.IsNotImplemented(err) {
		return fmt.Errorf("%s: %w", err.Error(), errdefs.ErrFailedPrecondition)
	}
	return err
}
