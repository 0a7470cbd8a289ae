package snapshotter

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/containerd/errdefs"
	"github.com/containerd/log"

	"github.com/caisson-containers/caisson/snapshotter/ext4read"
)

// writable is an active snapshot's writable image opened for reading in
// userspace (package ext4read), never mounted: the guest wrote it.
type writable struct {
	file  *os.File
	fs    *ext4read.FS
	upper *ext4read.Inode // nil: nothing was written (no image, or no /upper)
}

func (w *writable) Close() error {
	if w.file == nil {
		return nil
	}
	return w.file.Close()
}

// detachWait bounds how long openWritable waits for the kernel to release a
// loop device that still has the image attached.
const detachWait = 10 * time.Second

// openWritable opens id's writable image and finds its /upper directory. The
// caller holds lockID(id).
//
// An image the host's kernel still has attached to a loop device (a mount of it
// in some mount namespace, or one being torn down) may have changes on their way
// to the file: reading it then would read an older state. openWritable waits up
// to detachWait for the device to be released, then fails with
// errdefs.ErrFailedPrecondition. (A guest's image is never attached on the host:
// QEMU reads the file itself.)
func (s *Snapshotter) openWritable(ctx context.Context, id string) (_ *writable, retErr error) {
	path := s.writablePath(id)
	if _, err := os.Lstat(path); errors.Is(err, os.ErrNotExist) {
		return &writable{}, nil
	} else if err != nil {
		return nil, err
	}
	for deadline := time.Now().Add(detachWait); ; {
		dev, err := attachedLoop(path)
		if err != nil {
			return nil, err
		}
		if dev == "" {
			break
		}
		if time.Now().After(deadline) {
			return nil, fmt.Errorf("writable image %s is still attached to %s (mounted, in some mount namespace): unmount it first: %w", path, dev, errdefs.ErrFailedPrecondition)
		}
		log.G(ctx).WithField("device", dev).Debug("writable image still attached to a loop device; waiting for its release")
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
	}
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	w := &writable{file: f}
	defer func() {
		if retErr != nil {
			w.Close()
		}
	}()
	fi, err := f.Stat()
	if err != nil {
		return nil, err
	}
	if w.fs, err = ext4read.Open(f, fi.Size(), ext4read.Limits{}); err != nil {
		return nil, fmt.Errorf("writable image: %w", err)
	}
	upper, err := w.fs.Lookup(upperName)
	switch {
	case errdefs.IsNotFound(err):
		// Formatted but no upper directory was ever made: nothing written.
		return w, nil
	case err != nil:
		return nil, fmt.Errorf("writable image: %w", err)
	case upper.Type() != ext4read.TypeDir:
		return nil, fmt.Errorf("writable image's upper is not a directory: %w", errdefs.ErrFailedPrecondition)
	}
	w.upper = upper
	return w, nil
}

// attachedLoop returns the loop device whose backing file is path, or "".
// It reads sysfs only; the image is not touched.
func attachedLoop(path string) (string, error) {
	files, err := filepath.Glob("/sys/block/loop*/loop/backing_file")
	if err != nil {
		return "", err
	}
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			continue // detached meanwhile
		}
		if filepath.Clean(strings.TrimSpace(string(b))) == filepath.Clean(path) {
			return "/dev/" + filepath.Base(filepath.Dir(filepath.Dir(f))), nil
		}
	}
	return "", nil
}
