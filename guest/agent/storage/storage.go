// Package storage mounts the disks the shim attached to the VM (image layers as EROFS on
// virtio-blk or virtio-pmem, writable layers as ext4 on virtio-blk) under storage ids,
// reference-counted, and assembles containers' root filesystems from them.
package storage

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"

	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"golang.org/x/sys/unix"
)

// Filesystem types a storage may have.
const (
	EROFS = "erofs"
	Ext4  = "ext4"
)

// Request is one storage to mount.
type Request struct {
	// ID names the storage; containers' rootfs refer to it.
	ID     string
	Device Device
	// Fstype is EROFS or Ext4.
	Fstype   string
	ReadOnly bool
	// DAX mounts the filesystem with dax=always (EROFS on virtio-pmem), so that reads go
	// straight to the host's page cache.
	DAX bool
	// Options are further mount options (data, as mount(8) -o takes them).
	Options []string
}

type storage struct {
	req    Request
	device string // the block device node
	target string
	refs   int
}

// Manager keeps the mounted storages.
type Manager struct {
	root   string
	finder Finder

	mu       sync.Mutex
	storages map[string]*storage
}

// NewManager mounts storages under root/ID, finding devices with f.
func NewManager(root string, f Finder) (*Manager, error) {
	if err := os.MkdirAll(root, 0o700); err != nil {
		return nil, err
	}
	return &Manager{root: root, finder: f, storages: map[string]*storage{}}, nil
}

// Mount waits for req's device and mounts it, or, if req.ID is mounted already with the
// same request, takes another reference to it. It returns the mount point.
func (m *Manager) Mount(ctx context.Context, req Request) (string, error) {
	if req.ID == "" || filepath.Base(req.ID) != req.ID || req.ID == "." || req.ID == ".." {
		return "", fmt.Errorf("storage id %q: %w", req.ID, errdefs.ErrInvalidArgument)
	}
	flags := uintptr(unix.MS_NODEV | unix.MS_NOSUID)
	opts := slices.Clone(req.Options)
	switch req.Fstype {
	case EROFS:
		if !req.ReadOnly {
			return "", fmt.Errorf("storage %s: erofs is read-only: %w", req.ID, errdefs.ErrInvalidArgument)
		}
	case Ext4:
		if req.DAX {
			return "", fmt.Errorf("storage %s: dax is for erofs on pmem: %w", req.ID, errdefs.ErrInvalidArgument)
		}
	default:
		return "", fmt.Errorf("storage %s: filesystem %q: %w", req.ID, req.Fstype, errdefs.ErrInvalidArgument)
	}
	if req.ReadOnly {
		flags |= unix.MS_RDONLY
	}
	if req.DAX {
		opts = append(opts, "dax=always")
	}

	m.mu.Lock()
	defer m.mu.Unlock()
	if s, ok := m.storages[req.ID]; ok {
		if !sameRequest(s.req, req) {
			return "", fmt.Errorf("storage %s is mounted from %s as %s: %w", req.ID, s.req.Device, s.req.Fstype, errdefs.ErrAlreadyExists)
		}
		s.refs++
		return s.target, nil
	}
	// Devices appear within a second of a hot-plug; the caller's context bounds the wait.
	dev, err := m.finder.Find(ctx, req.Device)
	if err != nil {
		return "", fmt.Errorf("storage %s: %w", req.ID, err)
	}
	target := filepath.Join(m.root, req.ID)
	if err := os.MkdirAll(target, 0o755); err != nil {
		return "", err
	}
	if err := unix.Mount(dev, target, req.Fstype, flags, strings.Join(opts, ",")); err != nil {
		os.Remove(target)
		return "", fmt.Errorf("storage %s: mount %s (%s) as %s -o %s: %v (is it a valid %s image?): %w",
			req.ID, dev, req.Device, req.Fstype, strings.Join(opts, ","), err, req.Fstype, errdefs.ErrFailedPrecondition)
	}
	log.G(ctx).WithFields(log.Fields{"storage": req.ID, "device": dev, "fstype": req.Fstype, "dax": req.DAX}).Debug("storage mounted")
	m.storages[req.ID] = &storage{req: req, device: dev, target: target, refs: 1}
	return target, nil
}

func sameRequest(a, b Request) bool {
	return a.Device == b.Device && a.Fstype == b.Fstype && a.ReadOnly == b.ReadOnly && a.DAX == b.DAX &&
		slices.Equal(a.Options, b.Options)
}

// Unmount drops a reference to storage id and unmounts it with the last one.
func (m *Manager) Unmount(ctx context.Context, id string) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	s, ok := m.storages[id]
	if !ok {
		return fmt.Errorf("storage %s: %w", id, errdefs.ErrNotFound)
	}
	if s.refs > 1 {
		s.refs--
		return nil
	}
	if err := unix.Unmount(s.target, 0); err != nil {
		return fmt.Errorf("storage %s: unmount %s: %w", id, s.target, err)
	}
	_ = os.Remove(s.target)
	delete(m.storages, id)
	log.G(ctx).WithField("storage", id).Debug("storage unmounted")
	return nil
}

// Path returns where storage id is mounted.
func (m *Manager) Path(id string) (string, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	s, ok := m.storages[id]
	if !ok {
		return "", fmt.Errorf("storage %s: %w", id, errdefs.ErrNotFound)
	}
	return s.target, nil
}

// Device returns the block device node storage id is mounted from.
func (m *Manager) Device(id string) (string, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	s, ok := m.storages[id]
	if !ok {
		return "", fmt.Errorf("storage %s: %w", id, errdefs.ErrNotFound)
	}
	return s.device, nil
}
