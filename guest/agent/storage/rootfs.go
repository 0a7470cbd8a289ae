package storage

import (
	"context"
	"fmt"
	"os"
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

// Rootfs says how to assemble a container's root filesystem from storages:
//   - Lower only: read-only (an overlay of the layers, or a bind of the single one);
//   - Lower with Upper and Work: a writable overlay (Upper and Work are created, 0755);
//   - Upper alone: a read-write bind of Upper (a snapshot with no parent);
//   - Lower with TmpfsUpper: a writable overlay whose upper and work directories are on
//     a tmpfs of the rootfs's own (beside Target), unmounted with it.
type Rootfs struct {
	Lower       []Dir // top-most first, in overlayfs lowerdir order
	Upper, Work *Dir
	TmpfsUpper  bool
	Options     []string // further overlay options (index=off, ...)
}

func (r Rootfs) storages() []string {
	seen := map[string]bool{}
	var out []string
	dirs := append([]Dir{}, r.Lower...)
	for _, d := range []*Dir{r.Upper, r.Work} {
		if d != nil {
			dirs = append(dirs, *d)
		}
	}
	for _, d := range dirs {
		if !seen[d.Storage] {
			seen[d.Storage] = true
			out = append(out, d.Storage)
		}
	}
	return out
}

// MountedRootfs is an assembled rootfs; its storages cannot be unmounted until it is.
type MountedRootfs struct {
	Target   string
	storages []string
	tmpfs    string // the TmpfsUpper's mount point; "" if none
}

// MountRootfs assembles r at target, which it creates.
func (m *Manager) MountRootfs(ctx context.Context, target string, r Rootfs) (_ *MountedRootfs, retErr error) {
	if len(r.Lower) == 0 && r.Upper == nil {
		return nil, fmt.Errorf("rootfs has no layers: %w", errdefs.ErrInvalidArgument)
	}
	if (r.Upper == nil) != (r.Work == nil) && len(r.Lower) > 0 {
		return nil, fmt.Errorf("rootfs needs both upper and work, or neither: %w", errdefs.ErrInvalidArgument)
	}
	if r.TmpfsUpper && (r.Upper != nil || r.Work != nil || len(r.Lower) == 0) {
		return nil, fmt.Errorf("a rootfs with a tmpfs upper layer needs lower layers, and no upper or work of its own: %w", errdefs.ErrInvalidArgument)
	}
	ids := r.storages()
	roots, err := m.acquire(ids)
	if err != nil {
		return nil, err
	}
	defer func() {
		if retErr != nil {
			m.release(ids)
		}
	}()
	resolve := func(d Dir) (string, error) {
		if d.Path == "" {
			return roots[d.Storage], nil
		}
		return securejoin.SecureJoin(roots[d.Storage], d.Path)
	}
	if err := os.MkdirAll(target, 0o755); err != nil {
		return nil, err
	}
	defer func() {
		if retErr != nil {
			os.Remove(target)
		}
	}()
	mounted := &MountedRootfs{Target: target, storages: ids}
	var upper, work string
	if r.TmpfsUpper {
		dir, err := mountTmpfsUpper(target + ".upper")
		if err != nil {
			return nil, err
		}
		defer func() {
			if retErr != nil {
				unmountTmpfs(dir)
			}
		}()
		mounted.tmpfs = dir
		upper, work = dir+"/upper", dir+"/work"
	}

	for _, d := range []struct {
		dir *Dir
		p   *string
	}{{r.Upper, &upper}, {r.Work, &work}} {
		if d.dir == nil {
			continue
		}
		if *d.p, err = resolve(*d.dir); err != nil {
			return nil, err
		}
		if err := os.MkdirAll(*d.p, 0o755); err != nil {
			return nil, err
		}
	}

	bind := func(src string, ro bool) error {
		if err := unix.Mount(src, target, "", unix.MS_BIND, ""); err != nil {
			return fmt.Errorf("bind %s as rootfs: %w", src, err)
		}
		if ro {
			if err := unix.Mount("", target, "", unix.MS_BIND|unix.MS_REMOUNT|unix.MS_RDONLY, ""); err != nil {
				_ = unix.Unmount(target, unix.MNT_DETACH)
				return err
			}
		}
		return nil
	}
	switch {
	case len(r.Lower) == 0:
		return mounted, bind(upper, false)
	case len(r.Lower) == 1 && r.Upper == nil && !r.TmpfsUpper:
		src, err := resolve(r.Lower[0])
		if err != nil {
			return nil, err
		}
		return mounted, bind(src, true)
	}
	var lowers []string
	for _, d := range r.Lower {
		p, err := resolve(d)
		if err != nil {
			return nil, err
		}
		lowers = append(lowers, p)
	}
	opts := []string{"lowerdir=" + strings.Join(lowers, ":")}
	var flags uintptr
	if upper != "" {
		opts = append(opts, "upperdir="+upper, "workdir="+work)
	} else {
		flags |= unix.MS_RDONLY
	}
	opts = append(opts, r.Options...)
	data := strings.Join(opts, ",")
	if len(data) >= unix.Getpagesize() {
		return nil, fmt.Errorf("overlay options are %d bytes, more than a page (%d layers): %w", len(data), len(lowers), errdefs.ErrNotImplemented)
	}
	if err := unix.Mount("overlay", target, "overlay", flags, data); err != nil {
		return nil, fmt.Errorf("mount overlay at %s (%s): %v: %w", target, data, err, errdefs.ErrInvalidArgument)
	}
	return mounted, nil
}

// UnmountRootfs unmounts a rootfs (and anything mounted under it) and releases its storages.
func (m *Manager) UnmountRootfs(ctx context.Context, r *MountedRootfs) error {
	if err := unix.Unmount(r.Target, 0); err != nil && err != unix.EINVAL {
		if err := unix.Unmount(r.Target, unix.MNT_DETACH); err != nil {
			return fmt.Errorf("unmount rootfs %s: %w", r.Target, err)
		}
	}
	m.release(r.storages)
	r.storages = nil
	if err := os.Remove(r.Target); err != nil && !os.IsNotExist(err) {
		return err
	}
	if r.tmpfs != "" {
		if err := unmountTmpfs(r.tmpfs); err != nil {
			return err
		}
		r.tmpfs = ""
	}
	return nil
}

// mountTmpfsUpper mounts a tmpfs at dir, which it creates, with the upper and work
// directories of an overlay in it.
func mountTmpfsUpper(dir string) (_ string, retErr error) {
	if err := os.Mkdir(dir, 0o700); err != nil {
		return "", fmt.Errorf("tmpfs upper layer: %w", err)
	}
	if err := unix.Mount("tmpfs", dir, "tmpfs", unix.MS_NOSUID|unix.MS_NODEV, "mode=0700"); err != nil {
		os.Remove(dir)
		return "", fmt.Errorf("tmpfs upper layer: mount %s: %w", dir, err)
	}
	defer func() {
		if retErr != nil {
			unmountTmpfs(dir)
		}
	}()
	for _, d := range []string{"upper", "work"} {
		if err := os.Mkdir(dir+"/"+d, 0o755); err != nil {
			return "", fmt.Errorf("tmpfs upper layer: %w", err)
		}
	}
	return dir, nil
}

// unmountTmpfs unmounts the tmpfs at dir, dropping what was written to it, and removes dir.
func unmountTmpfs(dir string) error {
	if err := unix.Unmount(dir, unix.MNT_DETACH); err != nil && err != unix.EINVAL {
		return fmt.Errorf("unmount tmpfs upper layer %s: %w", dir, err)
	}
	if err := os.Remove(dir); err != nil && !os.IsNotExist(err) {
		return err
	}
	return nil
}
