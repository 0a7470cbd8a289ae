// Package config holds the block snapshotter's configuration: the TOML file read by
// caisson-snapshotter and the plugin config of the built-in registration. Decoding is
// strict: an unknown key is an error that names it.
package config

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/containerd/errdefs"
	"github.com/docker/go-units"

	"github.com/caisson-containers/caisson/internal/rootfs"
	"github.com/caisson-containers/caisson/internal/tomlconfig"
)

// Layer filesystems a committed layer can be built as.
const (
	// LayerEROFS builds each layer with mkfs.erofs: 4 KiB blocks, no inline data,
	// uncompressed, so that the guest can mount it with dax=always.
	LayerEROFS = "erofs"
	// LayerExt4 is the fallback for hosts without EROFS: mkfs.ext4 -d, read-only
	// mounted. It cannot represent overlay whiteouts as compactly and wastes
	// space on ext4's metadata; use it only where the erofs module is missing.
	LayerExt4 = "ext4"
)

// Mount modes: what the snapshotter's mounts ask of whoever activates them on the host
// (docs/mounts.md).
const (
	// MountsTemplate returns containerd 2.2's mount lists (mkfs/ext4, erofs images,
	// format/mkdir/overlay templates): nothing is mounted on the host but by
	// containerd's mount manager, and only for containerd's own use. Needs
	// containerd ≥ 2.2.
	MountsTemplate = "template"
	// MountsHost keeps every committed layer loop-mounted on the host and returns
	// plain overlay and bind mounts over those directories and a host upper
	// directory: what containerd 1.7–2.1, which mount a container's rootfs on the
	// host themselves (to read its /etc/passwd and /etc/group), can mount.
	MountsHost = "host"
)

// Defaults, as documented on the fields of Config.
const (
	DefaultRoot          = "/var/lib/containerd/io.containerd.snapshotter.v1.caisson"
	DefaultWritableSize  = "10GiB"
	DefaultDAXAlignment  = "2MiB"
	DefaultLayerFS       = LayerEROFS
	DefaultMountMode     = MountsTemplate
	minimumWritableBytes = 16 << 20
)

// Config is the snapshotter's configuration. The zero value of every field means
// its documented default (see Resolve).
type Config struct {
	// Root is the directory holding metadata.db and the snapshots. Default
	// /var/lib/containerd/io.containerd.snapshotter.v1.caisson. It must lie under
	// containerd's root directory: containerd's mount manager (2.2 to 2.4) lets its
	// mkfs transform create files only there, and has no setting for more places.
	// The daemon's --root flag overrides it.
	Root string `toml:"root"`
	// DefaultWritableSize is the apparent size of an active snapshot's sparse ext4
	// image when the snapshot has no "containerd.io/snapshot/caisson.writable-size"
	// label. Units as in "10GiB", "512MiB" or plain bytes. Default "10GiB"; at least 16MiB.
	DefaultWritableSize string `toml:"default_writable_size"`
	// LayerFilesystem is "erofs" (default) or "ext4" (fallback, see LayerExt4).
	LayerFilesystem string `toml:"layer_filesystem"`
	// DAXAlignment pads every committed layer with zeros to a multiple of this size
	// so it can back a virtio-pmem device. Default "2MiB"; "0" disables padding
	// (the shim then attaches layers as virtio-blk only). Must be a multiple of 4KiB.
	DAXAlignment string `toml:"dax_alignment"`
	// MkfsOptions are extra arguments appended to the layer mkfs command
	// (mkfs.erofs or mkfs.ext4), e.g. ["-T0"]. Default none.
	MkfsOptions []string `toml:"mkfs_options"`
	// OverlayOptions are appended to every overlay mount the snapshotter returns,
	// e.g. ["redirect_dir=on"] on kernels built without CONFIG_OVERLAY_FS_REDIRECT_DIR
	// (needed to rename a directory of a lower layer), or ["index=off"]. Each must be
	// one the shim allows: index=, redirect_dir=, metacopy=, volatile, userxattr.
	// Default none.
	OverlayOptions []string `toml:"overlay_options"`
	// MountMode is "template" (default; containerd 2.2 and later) or "host"
	// (containerd 1.7 to 2.1): see MountsTemplate and MountsHost.
	MountMode string `toml:"mount_mode"`
}

// Resolved is a validated Config with sizes in bytes.
type Resolved struct {
	Root                string
	DefaultWritableSize int64
	LayerFilesystem     string
	DAXAlignment        int64
	MkfsOptions         []string
	OverlayOptions      []string
	// HostMounts is mount_mode "host".
	HostMounts bool
}

// Default returns the configuration with every default filled in.
func Default() Config {
	return Config{
		Root:                DefaultRoot,
		DefaultWritableSize: DefaultWritableSize,
		LayerFilesystem:     DefaultLayerFS,
		DAXAlignment:        DefaultDAXAlignment,
		MountMode:           DefaultMountMode,
	}
}

// Load reads the TOML file at path strictly over the defaults.
func Load(path string) (Config, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return Config{}, fmt.Errorf("read snapshotter config: %w", err)
	}
	c, err := Decode(data)
	if err != nil {
		return Config{}, fmt.Errorf("%s: %w", path, err)
	}
	return c, nil
}

// Decode parses TOML over the defaults. Unknown keys are an error naming them.
func Decode(data []byte) (Config, error) {
	c := Default()
	if err := tomlconfig.DecodeStrict(data, &c); err != nil {
		return Config{}, fmt.Errorf("snapshotter config: %w", err)
	}
	return c, nil
}

// Resolve validates c, fills in defaults for empty fields and converts sizes.
func (c Config) Resolve() (Resolved, error) {
	d := Default()
	if c.Root == "" {
		c.Root = d.Root
	}
	if c.DefaultWritableSize == "" {
		c.DefaultWritableSize = d.DefaultWritableSize
	}
	if c.LayerFilesystem == "" {
		c.LayerFilesystem = d.LayerFilesystem
	}
	if c.DAXAlignment == "" {
		c.DAXAlignment = d.DAXAlignment
	}
	if c.MountMode == "" {
		c.MountMode = d.MountMode
	}
	r := Resolved{
		LayerFilesystem: c.LayerFilesystem,
		MkfsOptions:     c.MkfsOptions,
		OverlayOptions:  c.OverlayOptions,
	}
	if !filepath.IsAbs(c.Root) {
		return Resolved{}, fmt.Errorf("root %q must be an absolute path: %w", c.Root, errdefs.ErrInvalidArgument)
	}
	r.Root = filepath.Clean(c.Root)

	size, err := units.RAMInBytes(c.DefaultWritableSize)
	if err != nil {
		return Resolved{}, fmt.Errorf("default_writable_size %q: %v: %w", c.DefaultWritableSize, err, errdefs.ErrInvalidArgument)
	}
	if size < minimumWritableBytes {
		return Resolved{}, fmt.Errorf("default_writable_size %q is below the 16MiB minimum: %w", c.DefaultWritableSize, errdefs.ErrInvalidArgument)
	}
	r.DefaultWritableSize = size

	switch c.LayerFilesystem {
	case LayerEROFS, LayerExt4:
	default:
		return Resolved{}, fmt.Errorf("layer_filesystem %q: must be %q or %q: %w", c.LayerFilesystem, LayerEROFS, LayerExt4, errdefs.ErrInvalidArgument)
	}

	switch c.MountMode {
	case MountsTemplate:
	case MountsHost:
		r.HostMounts = true
	default:
		return Resolved{}, fmt.Errorf("mount_mode %q: must be %q (containerd 2.2 and later) or %q (containerd 1.7 to 2.1): %w",
			c.MountMode, MountsTemplate, MountsHost, errdefs.ErrInvalidArgument)
	}

	align, err := units.RAMInBytes(c.DAXAlignment)
	if err != nil {
		return Resolved{}, fmt.Errorf("dax_alignment %q: %v: %w", c.DAXAlignment, err, errdefs.ErrInvalidArgument)
	}
	if align < 0 || align%4096 != 0 {
		return Resolved{}, fmt.Errorf("dax_alignment %q must be 0 or a multiple of 4KiB: %w", c.DAXAlignment, errdefs.ErrInvalidArgument)
	}
	r.DAXAlignment = align

	for _, o := range c.OverlayOptions {
		// The shim refuses an option outside its allow-list (docs/mounts.md): refuse it
		// here, at start, rather than at the first pod. "ro" is the snapshotter's own.
		if !rootfs.OverlayOptionAllowed(o) || o == "ro" {
			return Resolved{}, fmt.Errorf("overlay_options: %q is not one of %s: %w", o, strings.Join(rootfs.OverlayOptions, ", "), errdefs.ErrInvalidArgument)
		}
	}
	return r, nil
}
