package snapshotter

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path"
	"path/filepath"
	"strings"
	"syscall"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/core/snapshots/storage"
	"github.com/containerd/containerd/v2/pkg/archive"
	continuityfs "github.com/containerd/continuity/fs"
	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"golang.org/x/sys/unix"

	"github.com/caisson-containers/caisson/snapshotter/ext4read"
	"github.com/caisson-containers/caisson/snapshotter/layer"
	"github.com/caisson-containers/caisson/snapshotter/tarerofs"
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
//
// The writable image is a Caisson guest's file system: it is read in userspace
// (package ext4read), never mounted, so the host kernel's ext4 driver never
// parses it. Its /upper becomes a tar stream that the same writer as the
// differ's (tarerofs, with a layer's limits) turns into the EROFS image.
func (s *Snapshotter) buildLayer(ctx context.Context, id, dst string) (retErr error) {
	if s.cfg.HostMounts {
		// The writes are in the host upper directory, which the host's overlay
		// wrote. (A Caisson container's are not: the shim gives the VM an image
		// of its own, docs/mounts.md.)
		return s.builder.Build(ctx, s.upperPath(id), dst)
	}
	w, err := s.openWritable(ctx, id)
	if err != nil {
		return err
	}
	defer w.Close()
	if w.upper == nil {
		// Never activated, or no upper directory: nothing was written; the
		// layer is empty.
		return s.builder.Build(ctx, filepath.Join(s.root, "empty"), dst)
	}
	fsys, upper := w.fs, w.upper
	if s.builder.FS == layer.Ext4 {
		return s.buildStaged(ctx, id, fsys, upper, dst)
	}

	tmp := dst + layer.TempSuffix
	if err := os.Remove(tmp); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	out, err := os.OpenFile(tmp, os.O_CREATE|os.O_EXCL|os.O_RDWR, 0o600)
	if err != nil {
		return err
	}
	defer func() {
		out.Close()
		if retErr != nil {
			os.Remove(tmp)
			if errors.Is(retErr, syscall.ENOSPC) {
				retErr = fmt.Errorf("%w (%w)", retErr, errdefs.ErrResourceExhausted)
			}
		}
	}()
	err = pipeTar(ctx, fsys, upper, ext4read.TarOptions{Format: ext4read.FormatOverlay}, func(r io.Reader) error {
		return tarerofs.Write(ctx, r, out, tarerofs.Options{TempDir: s.snapshotDir(id)})
	})
	var rerr *readError
	if errdefs.IsNotImplemented(err) && !errors.As(err, &rerr) {
		// What go-erofs cannot write (POSIX ACLs): mkfs.erofs can, from a
		// staged tree. (What the reader cannot read fails below.)
		log.G(ctx).WithError(err).Info("commit: building the layer from a staged tree")
		out.Close()
		os.Remove(tmp)
		return s.buildStaged(ctx, id, fsys, upper, dst)
	}
	if err != nil {
		return fmt.Errorf("writable image: %w", err)
	}
	if err := layer.Pad(out, s.cfg.DAXAlignment); err != nil {
		return err
	}
	if err := out.Sync(); err != nil {
		return fmt.Errorf("sync layer image: %w", err)
	}
	if err := out.Close(); err != nil {
		return err
	}
	if err := os.Rename(tmp, dst); err != nil {
		return fmt.Errorf("rename layer image: %w", err)
	}
	return layer.SyncDir(filepath.Dir(dst))
}

// buildStaged builds the layer with the builder (mkfs.ext4 for layer_filesystem
// "ext4", or mkfs.erofs for what go-erofs cannot write) from a tree staged in the
// snapshot's directory and removed afterwards. The tree is unpacked from the
// image's tar by containerd's archive code, as any image layer is unpacked (names
// confined to the staging directory); the trusted.* xattrs it leaves out (the
// overlay's own: opaque markers, redirects) are set afterwards from the image.
func (s *Snapshotter) buildStaged(ctx context.Context, id string, fsys *ext4read.FS, upper *ext4read.Inode, dst string) (retErr error) {
	// A crashed commit's staging directory is removed by the retry, or by
	// Cleanup (the suffix).
	stage := filepath.Join(s.snapshotDir(id), "stage"+layer.TempSuffix)
	if err := os.RemoveAll(stage); err != nil {
		return err
	}
	if err := os.Mkdir(stage, 0o755); err != nil {
		return err
	}
	defer func() {
		if err := os.RemoveAll(stage); err != nil && retErr == nil {
			retErr = err
		}
	}()
	err := pipeTar(ctx, fsys, upper, ext4read.TarOptions{Format: ext4read.FormatOverlay}, func(r io.Reader) error {
		_, err := archive.Apply(ctx, stage, r)
		return err
	})
	if err != nil {
		return fmt.Errorf("writable image: %w", err)
	}
	if err := fsys.Walk(ctx, upper, func(p string, in *ext4read.Inode) error {
		xattrs, err := fsys.Xattrs(in)
		if err != nil {
			return fmt.Errorf("%s: %w", p, err)
		}
		for name, v := range xattrs {
			if !strings.HasPrefix(name, "trusted.") || in.Type() == ext4read.TypeSocket {
				continue
			}
			// The entry itself, not what it links to: only its parents are
			// resolved (inside the staging directory).
			parent, err := continuityfs.RootPath(stage, path.Dir(p))
			if err != nil {
				return err
			}
			if err := unix.Lsetxattr(filepath.Join(parent, path.Base(p)), name, v, 0); err != nil {
				return fmt.Errorf("%s: set %s: %w", p, name, err)
			}
		}
		return nil
	}); err != nil {
		return fmt.Errorf("writable image: %w", err)
	}
	return s.builder.Build(ctx, stage, dst)
}

// pipeTar runs ext4read.WriteTar of dir into consume's reader. consume must
// read the tar to its end-of-archive marker; the error returned names the
// entry when reading the image failed.
func pipeTar(ctx context.Context, fsys *ext4read.FS, dir *ext4read.Inode, opts ext4read.TarOptions, consume func(io.Reader) error) error {
	pr, pw := io.Pipe()
	done := make(chan error, 1)
	go func() {
		err := ext4read.WriteTar(ctx, fsys, dir, pw, opts)
		pw.CloseWithError(err)
		done <- err
	}()
	err := consume(pr)
	if err == nil {
		// What follows the end-of-archive marker (tar padding), so the
		// writer finishes.
		_, err = io.Copy(io.Discard, pr)
	}
	pr.CloseWithError(errConsumerDone)
	werr := <-done
	if werr != nil && !errors.Is(werr, errConsumerDone) {
		// The image's error names the entry; the consumer's is its echo.
		return &readError{werr}
	}
	return err
}

var errConsumerDone = errors.New("tar consumer stopped")

// readError is an error of reading the writable image (not of writing the layer).
type readError struct{ err error }

func (e *readError) Error() string { return e.err.Error() }
func (e *readError) Unwrap() error { return e.err }
