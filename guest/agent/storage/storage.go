// Package storage mounts the disks the shim attached to the VM (image layers as EROFS on
// virtio-blk or virtio-pmem, writable layers as ext4 on virtio-blk) under storage ids,
// and assembles containers' root filesystems from them.
package storage

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"golang.org/x/sys/unix"
)

// Filesystem types a storage may have.
const (
	EROFS = "erofs"
	Ext4  = "ext4"
	// VirtioFS is a host directory shared through virtio-fs; its Device names the tag.
	VirtioFS = "virtiofs"
)

// Request is one storage to mount.
type Request struct {
	// ID names the storage; containers' rootfs refer to it.
	ID     string
	Device Device
	// Fstype is EROFS or Ext4.
	Fstype string
	// Options are mount(8) options: flags such as "ro" or "noatime", and filesystem
	// options passed on as they are.
	Options []string
	// DAX mounts the filesystem with dax=always (EROFS on virtio-pmem), so that reads go
	// straight to the host's page cache.
	DAX bool
}

type storage struct {
	req    Request
	device string // the block device node
	target string
	users  int // rootfs that use it
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

var mountFlags = map[string]struct {
	clear bool
	flag  uintptr
}{
	"ro": {false, unix.MS_RDONLY}, "rw": {true, unix.MS_RDONLY},
	"nosuid": {false, unix.MS_NOSUID}, "suid": {true, unix.MS_NOSUID},
	"nodev": {false, unix.MS_NODEV}, "dev": {true, unix.MS_NODEV},
	"noexec": {false, unix.MS_NOEXEC}, "exec": {true, unix.MS_NOEXEC},
	"noatime": {false, unix.MS_NOATIME}, "atime": {true, unix.MS_NOATIME},
	"relatime": {false, unix.MS_RELATIME}, "sync": {false, unix.MS_SYNCHRONOUS},
	"nodiratime": {false, unix.MS_NODIRATIME},
	"loop":       {}, "defaults": {}, // "loop" is the host's business: here the device is a disk
}

// parseOptions splits mount(8) options into flags and filesystem data.
func parseOptions(opts []string) (uintptr, []string) {
	flags := uintptr(unix.MS_NODEV | unix.MS_NOSUID)
	var data []string
	for _, o := range opts {
		if f, ok := mountFlags[o]; ok {
			if f.clear {
				flags &^= f.flag
			} else {
				flags |= f.flag
			}
			continue
		}
		data = append(data, o)
	}
	return flags, data
}

// Mount waits for req's device to appear and mounts it. It returns the mount point and
// the device node.
func (m *Manager) Mount(ctx context.Context, req Request) (string, string, error) {
	if req.ID == "" || filepath.Base(req.ID) != req.ID || req.ID == "." || req.ID == ".." {
		return "", "", fmt.Errorf("storage id %q: %w", req.ID, errdefs.ErrInvalidArgument)
	}
	flags, data := parseOptions(req.Options)
	switch req.Fstype {
	case EROFS:
		flags |= unix.MS_RDONLY
	case Ext4:
		if req.DAX {
			return "", "", fmt.Errorf("storage %s: dax is for erofs on pmem: %w", req.ID, errdefs.ErrInvalidArgument)
		}
	case VirtioFS:
		if req.DAX || req.Device.Tag == "" {
			return "", "", fmt.Errorf("storage %s: virtiofs needs a tag and no dax: %w", req.ID, errdefs.ErrInvalidArgument)
		}
	default:
		return "", "", fmt.Errorf("storage %s: filesystem %q, want %q, %q or %q: %w", req.ID, req.Fstype, EROFS, Ext4, VirtioFS, errdefs.ErrInvalidArgument)
	}
	if req.DAX {
		data = append(data, "dax=always")
	}

	m.mu.Lock()
	if _, ok := m.storages[req.ID]; ok {
		m.mu.Unlock()
		return "", "", fmt.Errorf("storage %s: %w", req.ID, errdefs.ErrAlreadyExists)
	}
	m.storages[req.ID] = nil // reserved while the device is awaited
	m.mu.Unlock()
	s, err := m.mount(ctx, req, flags, strings.Join(data, ","))
	m.mu.Lock()
	defer m.mu.Unlock()
	if err != nil {
		delete(m.storages, req.ID)
		return "", "", err
	}
	m.storages[req.ID] = s
	return s.target, s.device, nil
}

func (m *Manager) mount(ctx context.Context, req Request, flags uintptr, data string) (*storage, error) {
	if req.Fstype == VirtioFS {
		return m.mountVirtioFS(ctx, req, flags, data)
	}
	start := time.Now()
	dev, err := m.finder.Find(ctx, req.Device)
	if err != nil {
		return nil, fmt.Errorf("storage %s: %w", req.ID, err)
	}
	found := time.Now()
	target := filepath.Join(m.root, req.ID)
	if err := os.MkdirAll(target, 0o755); err != nil {
		return nil, err
	}
	if err := unix.Mount(dev, target, req.Fstype, flags, data); err != nil {
		os.Remove(target)
		return nil, fmt.Errorf("storage %s: mount %s (%s) as %s -o %q: %v (not a valid %s filesystem?): %w",
			req.ID, dev, req.Device, req.Fstype, data, err, req.Fstype, errdefs.ErrInvalidArgument)
	}
	log.G(ctx).WithFields(log.Fields{"storage": req.ID, "device": dev, "fstype": req.Fstype, "dax": req.DAX,
		"device_wait": found.Sub(start), "mount": time.Since(found)}).Debug("storage mounted")
	return &storage{req: req, device: dev, target: target}, nil
}

// mountVirtioFS mounts the virtio-fs device tagged req.Device.Tag. The tag is
// known to the kernel once the virtio device is probed, which may be a moment
// after its module loaded: until ctx ends, ENOENT (no such tag) is retried.
func (m *Manager) mountVirtioFS(ctx context.Context, req Request, flags uintptr, data string) (*storage, error) {
	target := filepath.Join(m.root, req.ID)
	if err := os.MkdirAll(target, 0o755); err != nil {
		return nil, err
	}
	for {
		err := unix.Mount(req.Device.Tag, target, VirtioFS, flags, data)
		if err == nil {
			return &storage{req: req, device: req.Device.Tag, target: target}, nil
		}
		if err != unix.ENOENT && err != unix.ENODEV {
			os.Remove(target)
			return nil, fmt.Errorf("storage %s: mount virtiofs tag %q -o %q: %v: %w", req.ID, req.Device.Tag, data, err, errdefs.ErrInvalidArgument)
		}
		select {
		case <-ctx.Done():
			os.Remove(target)
			return nil, fmt.Errorf("storage %s: virtiofs tag %q did not appear (%v): %w", req.ID, req.Device.Tag, err, errdefs.ErrNotFound)
		case <-time.After(m.finder.Poll):
		}
	}
}

// Unmount unmounts storage id. It fails while a rootfs uses it.
func (m *Manager) Unmount(ctx context.Context, id string) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	s, ok := m.storages[id]
	if !ok || s == nil {
		return fmt.Errorf("storage %s: %w", id, errdefs.ErrNotFound)
	}
	if s.users > 0 {
		return fmt.Errorf("storage %s is used by %d container rootfs: %w", id, s.users, errdefs.ErrFailedPrecondition)
	}
	if err := unix.Unmount(s.target, 0); err != nil {
		return fmt.Errorf("storage %s: unmount %s: %w", id, s.target, err)
	}
	_ = os.Remove(s.target)
	delete(m.storages, id)
	log.G(ctx).WithField("storage", id).Debug("storage unmounted")
	return nil
}

// UnmountAll unmounts every storage no rootfs uses, for shutdown.
func (m *Manager) UnmountAll(ctx context.Context) {
	m.mu.Lock()
	var ids []string
	for id, s := range m.storages {
		if s != nil {
			ids = append(ids, id)
		}
	}
	m.mu.Unlock()
	for _, id := range ids {
		if err := m.Unmount(ctx, id); err != nil {
			log.G(ctx).WithError(err).Warn("unmount storage")
		}
	}
}

// acquire marks the storages ids as used by a rootfs, and returns where they are mounted.
func (m *Manager) acquire(ids []string) (map[string]string, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	paths := map[string]string{}
	for _, id := range ids {
		s, ok := m.storages[id]
		if !ok || s == nil {
			return nil, fmt.Errorf("storage %s is not mounted: %w", id, errdefs.ErrNotFound)
		}
		paths[id] = s.target
	}
	for _, id := range ids {
		m.storages[id].users++
	}
	return paths, nil
}

// release undoes acquire.
func (m *Manager) release(ids []string) {
	m.mu.Lock()
	defer m.mu.Unlock()
	for _, id := range ids {
		if s, ok := m.storages[id]; ok && s != nil && s.users > 0 {
			s.users--
		}
	}
}

// Path returns where storage id is mounted.
func (m *Manager) Path(id string) (string, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	s, ok := m.storages[id]
	if !ok || s == nil {
		return "", fmt.Errorf("storage %s: %w", id, errdefs.ErrNotFound)
	}
	return s.target, nil
}

// Device returns the block device node storage id is mounted from.
func (m *Manager) Device(id string) (string, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	s, ok := m.storages[id]
	if !ok || s == nil {
		return "", fmt.Errorf("storage %s: %w", id, errdefs.ErrNotFound)
	}
	return s.device, nil
}
