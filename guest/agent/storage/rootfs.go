package storage

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/containerd/errdefs"
	securejoin "github.com/cyphar/filepath-securejoin"
	"golang.org/x/sys/unix"
)

// Dir is a directory inside a storage.
type Dir struct {
	Storage string
	Path    string // relative to the storage's root; "" for the root
}

// Rootfs says how to assemble a container's root filesystem from storages: an overlay of
// Lower (top-most first, as overlayfs's lowerdir) with Upper and Work when it is
// writable, or, with no Lower, a bind mount of Upper (a rootfs with no image layers).
type Rootfs struct {
	Lower []Dir
	Upper *Dir
	Work  *Dir
	// Mkdir are directories to create (with 0755) before mounting, such as the upper and
	// work directories of a fresh writable layer.
	Mkdir []Dir
	// Options are further overlay options (index=off, ...).
	Options  []string
	ReadOnly bool
}

// Storages lists the storage ids r uses.
func (r Rootfs) Storages() []string {
	seen := map[string]bool{}
	var out []string
	for _, d := range append(append(append([]Dir{}, r.Lower...), ptrDirs(r.Upper, r.Work)...), r.Mkdir...) {
		if !seen[d.Storage] {
			seen[d.Storage] = true
			out = append(out, d.Storage)
		}
	}
	return out
}

func ptrDirs(ds ...*Dir) []Dir {
	var out []Dir
	for _, d := range ds {
		if d != nil {
			out = append(out, *d)
		}
	}
	return out
}

func (m *Manager) resolve(d Dir) (string, error) {
	root, err := m.Path(d.Storage)
	if err != nil {
		return "", err
	}
	if d.Path == "" {
		return root, nil
	}
	return securejoin.SecureJoin(root, d.Path)
}

// MountRootfs assembles r at target (which it creates).
func (m *Manager) MountRootfs(ctx context.Context, target string, r Rootfs) error {
	for _, d := range r.Mkdir {
		p, err := m.resolve(d)
		if err != nil {
			return err
		}
		if err := os.MkdirAll(p, 0o755); err != nil {
			return err
		}
	}
	if err := os.MkdirAll(target, 0o755); err != nil {
		return err
	}
	if len(r.Lower) == 0 {
		if r.Upper == nil {
			return fmt.Errorf("rootfs has neither lower nor upper directories: %w", errdefs.ErrInvalidArgument)
		}
		src, err := m.resolve(*r.Upper)
		if err != nil {
			return err
		}
		if err := unix.Mount(src, target, "", unix.MS_BIND|unix.MS_REC, ""); err != nil {
			return fmt.Errorf("bind %s as rootfs: %w", src, err)
		}
		if r.ReadOnly {
			if err := unix.Mount("", target, "", unix.MS_BIND|unix.MS_REMOUNT|unix.MS_RDONLY, ""); err != nil {
				_ = unix.Unmount(target, unix.MNT_DETACH)
				return err
			}
		}
		return nil
	}
	var lowers []string
	for _, d := range r.Lower {
		p, err := m.resolve(d)
		if err != nil {
			return err
		}
		lowers = append(lowers, p)
	}
	opts := []string{"lowerdir=" + strings.Join(lowers, ":")}
	if (r.Upper == nil) != (r.Work == nil) {
		return fmt.Errorf("rootfs needs both upper and work directories, or neither: %w", errdefs.ErrInvalidArgument)
	}
	if r.Upper != nil && !r.ReadOnly {
		upper, err := m.resolve(*r.Upper)
		if err != nil {
			return err
		}
		work, err := m.resolve(*r.Work)
		if err != nil {
			return err
		}
		opts = append(opts, "upperdir="+upper, "workdir="+work)
	}
	opts = append(opts, r.Options...)
	var flags uintptr
	if r.ReadOnly {
		flags |= unix.MS_RDONLY
	}
	data := strings.Join(opts, ",")
	if len(data) >= unix.Getpagesize() {
		return fmt.Errorf("overlay options are %d bytes, more than a page (%d layers): %w", len(data), len(lowers), errdefs.ErrNotImplemented)
	}
	if err := unix.Mount("overlay", target, "overlay", flags, data); err != nil {
		return fmt.Errorf("mount overlay at %s (%s): %w", target, data, err)
	}
	return nil
}

// UnmountRootfs unmounts a rootfs MountRootfs assembled, and everything under it.
func UnmountRootfs(target string) error {
	if err := unix.Unmount(target, 0); err != nil {
		if err == unix.EINVAL { // not mounted
			return nil
		}
		if err := unix.Unmount(target, unix.MNT_DETACH); err != nil {
			return fmt.Errorf("unmount rootfs %s: %w", target, err)
		}
	}
	return os.Remove(filepath.Clean(target))
}
