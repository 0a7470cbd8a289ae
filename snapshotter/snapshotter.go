// Package snapshotter is Caisson's block snapshotter: a containerd
// snapshots.Snapshotter whose committed layers are immutable EROFS image files and
// whose active snapshots are sparse writable ext4 images. Its mounts follow
// docs/mounts.md: containerd's mount manager can activate them on the host (so
// containerd's differ and runc work with it), and Caisson's shim attaches the same
// files to a VM without mounting anything on the host.
package snapshotter

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"sync"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/core/snapshots/storage"
	"github.com/containerd/continuity/fs"
	"github.com/containerd/errdefs"
	"github.com/containerd/log"

	"github.com/caisson-containers/caisson/snapshotter/config"
	"github.com/caisson-containers/caisson/snapshotter/layer"
)

// LabelWritableSize overrides the configured default size, in bytes, of an active
// snapshot's writable image.
const LabelWritableSize = "containerd.io/snapshot/caisson.writable-size"

const (
	writableName  = "rw.ext4"
	tempDirPrefix = "new-"
)

// Snapshotter implements snapshots.Snapshotter over image files.
type Snapshotter struct {
	root    string
	cfg     config.Resolved
	ms      *storage.MetaStore
	builder layer.Builder

	mu sync.Mutex
	// busy holds the temporary directories of snapshots being created, so
	// that Cleanup leaves them alone and removes only what a crash left.
	busy map[string]int
	// locks serializes the commits of one snapshot id, and Cleanup with them.
	locks map[string]*idLock
}

type idLock struct {
	sync.Mutex
	users int
}

// lockID locks id against other lockID callers until the returned func runs.
func (s *Snapshotter) lockID(id string) func() {
	s.mu.Lock()
	l := s.locks[id]
	if l == nil {
		l = &idLock{}
		s.locks[id] = l
	}
	l.users++
	s.mu.Unlock()
	l.Lock()
	return func() {
		l.Unlock()
		s.mu.Lock()
		if l.users--; l.users == 0 {
			delete(s.locks, id)
		}
		s.mu.Unlock()
	}
}

var _ snapshots.Cleaner = (*Snapshotter)(nil)

// New opens (creating if needed) the snapshotter rooted at cfg.Root.
func New(ctx context.Context, cfg config.Resolved) (*Snapshotter, error) {
	if cfg.Root == "" || !filepath.IsAbs(cfg.Root) {
		return nil, fmt.Errorf("snapshotter root %q must be an absolute path: %w", cfg.Root, errdefs.ErrInvalidArgument)
	}
	for _, d := range []string{cfg.Root, filepath.Join(cfg.Root, "snapshots"), filepath.Join(cfg.Root, "mnt")} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			return nil, err
		}
	}
	// ROOT/empty is what a View of nothing binds: an empty, read-only directory.
	if err := os.MkdirAll(filepath.Join(cfg.Root, "empty"), 0o755); err != nil {
		return nil, err
	}
	ms, err := storage.NewMetaStore(filepath.Join(cfg.Root, "metadata.db"))
	if err != nil {
		return nil, fmt.Errorf("open snapshot metadata: %w", err)
	}
	s := &Snapshotter{
		root: cfg.Root,
		cfg:  cfg,
		ms:   ms,
		builder: layer.Builder{
			FS:           cfg.LayerFilesystem,
			Alignment:    cfg.DAXAlignment,
			ExtraOptions: cfg.MkfsOptions,
		},
		busy:  map[string]int{},
		locks: map[string]*idLock{},
	}
	if cfg.HostMounts {
		if err := s.mountCommitted(ctx); err != nil {
			ms.Close()
			return nil, fmt.Errorf("mount committed layers (mount_mode host): %w", err)
		}
	}
	log.G(ctx).WithField("root", cfg.Root).WithField("layer_fs", cfg.LayerFilesystem).WithField("host_mounts", cfg.HostMounts).Debug("caisson snapshotter opened")
	return s, nil
}

// Close releases the metadata store and, with host mounts, unmounts the
// layers no mount uses (New mounts them again).
func (s *Snapshotter) Close() error {
	var errs []error
	if s.cfg.HostMounts {
		errs = append(errs, s.unmountLayers())
	}
	return errors.Join(append(errs, s.ms.Close())...)
}

func (s *Snapshotter) snapshotDir(id string) string {
	return filepath.Join(s.root, "snapshots", id)
}

func (s *Snapshotter) writablePath(id string) string {
	return filepath.Join(s.snapshotDir(id), writableName)
}

func (s *Snapshotter) layerPath(id string) string {
	return filepath.Join(s.snapshotDir(id), s.builder.FileName())
}

// hold marks name as in use by this process until the returned func is called.
func (s *Snapshotter) hold(name string) func() {
	s.mu.Lock()
	s.busy[name]++
	s.mu.Unlock()
	return func() {
		s.mu.Lock()
		if s.busy[name]--; s.busy[name] == 0 {
			delete(s.busy, name)
		}
		s.mu.Unlock()
	}
}

func (s *Snapshotter) held(name string) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.busy[name] > 0
}

// writableSize is the size of id's writable image: its LabelWritableSize label,
// else the configured default.
func (s *Snapshotter) writableSize(info snapshots.Info) (int64, error) {
	v, ok := info.Labels[LabelWritableSize]
	if !ok {
		return s.cfg.DefaultWritableSize, nil
	}
	n, err := strconv.ParseInt(v, 10, 64)
	if err != nil || n < 16<<20 {
		return 0, fmt.Errorf("label %s=%q: want a byte count of at least 16MiB: %w", LabelWritableSize, v, errdefs.ErrInvalidArgument)
	}
	return n, nil
}

// Stat returns the info of the snapshot key.
func (s *Snapshotter) Stat(ctx context.Context, key string) (info snapshots.Info, err error) {
	err = s.ms.WithTransaction(ctx, false, func(ctx context.Context) error {
		_, info, _, err = storage.GetInfo(ctx, key)
		return err
	})
	return info, err
}

// Update updates the labels of the snapshot info.Name.
func (s *Snapshotter) Update(ctx context.Context, info snapshots.Info, fieldpaths ...string) (_ snapshots.Info, err error) {
	err = s.ms.WithTransaction(ctx, true, func(ctx context.Context) error {
		info, err = storage.UpdateInfo(ctx, info, fieldpaths...)
		return err
	})
	if err != nil {
		return snapshots.Info{}, err
	}
	return info, nil
}

// Walk calls fn for every snapshot matching the filters.
func (s *Snapshotter) Walk(ctx context.Context, fn snapshots.WalkFunc, filters ...string) error {
	return s.ms.WithTransaction(ctx, false, func(ctx context.Context) error {
		return storage.WalkInfo(ctx, fn, filters...)
	})
}

// Usage reports the disk space a snapshot takes. A committed snapshot's usage is
// its layer image (recorded at commit). An active snapshot's is the space its
// sparse writable image has allocated so far (0 before it is first activated).
func (s *Snapshotter) Usage(ctx context.Context, key string) (snapshots.Usage, error) {
	var (
		id    string
		info  snapshots.Info
		usage snapshots.Usage
	)
	if err := s.ms.WithTransaction(ctx, false, func(ctx context.Context) (err error) {
		id, info, usage, err = storage.GetInfo(ctx, key)
		return err
	}); err != nil {
		return snapshots.Usage{}, err
	}
	if info.Kind != snapshots.KindActive {
		return usage, nil
	}
	// The writable image (or the upper directory) and a layer written from a
	// tar (WriteLayer).
	var total snapshots.Usage
	if s.cfg.HostMounts {
		du, err := fs.DiskUsage(ctx, s.upperPath(id))
		if err != nil && !errors.Is(err, os.ErrNotExist) {
			return snapshots.Usage{}, err
		}
		total = snapshots.Usage(du)
	}
	for _, p := range []string{s.writablePath(id), s.layerPath(id)} {
		u, err := fileUsage(p)
		if errors.Is(err, os.ErrNotExist) {
			continue
		}
		if err != nil {
			return snapshots.Usage{}, err
		}
		total.Size += u.Size
		total.Inodes += u.Inodes
	}
	return total, nil
}
