package snapshotter

import (
	"fmt"
	"path/filepath"

	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/core/snapshots/storage"
	"github.com/containerd/errdefs"
)

// layerRef is one committed layer under a snapshot.
type layerRef struct {
	id   string
	path string
}

// layers lists snap's parent layers, top-most first.
func (s *Snapshotter) layers(snap storage.Snapshot) []layerRef {
	refs := make([]layerRef, len(snap.ParentIDs))
	for i, id := range snap.ParentIDs {
		refs[i] = layerRef{id: id, path: s.layerPath(id)}
	}
	return refs
}

func (s *Snapshotter) layerMount(l layerRef) mount.Mount {
	return mount.Mount{Type: s.builder.MountType(), Source: l.path, Options: []string{"ro", "loop"}}
}

// mounts builds the mount list of docs/mounts.md for snap.
func (s *Snapshotter) mounts(snap storage.Snapshot, info snapshots.Info, lowers []layerRef) ([]mount.Mount, error) {
	if snap.Kind == snapshots.KindView {
		if s.cfg.HostMounts {
			return s.hostMounts(snap.ID, lowers, false), nil
		}
		return s.viewMounts(lowers), nil
	}
	if snap.Kind != snapshots.KindActive {
		return nil, fmt.Errorf("snapshot %q is %v and has no mounts: %w", info.Name, snap.Kind, errdefs.ErrFailedPrecondition)
	}
	// A layer written by Caisson's differ is the snapshot's whole content
	// until Commit: show it read-only over the parents (shape C), as
	// containerd's EROFS snapshotter shows an applied layer, rather than an
	// empty writable image whose writes Commit would refuse.
	applied, err := s.appliedLayer(snap.ID)
	if err != nil {
		return nil, err
	}
	if applied {
		withApplied := append([]layerRef{{id: snap.ID, path: s.layerPath(snap.ID)}}, lowers...)
		if s.cfg.HostMounts {
			return s.hostMounts(snap.ID, withApplied, false), nil
		}
		return s.viewMounts(withApplied), nil
	}
	if s.cfg.HostMounts {
		return s.hostMounts(snap.ID, lowers, true), nil
	}
	size, err := s.writableSize(info)
	if err != nil {
		return nil, err
	}
	rw := mount.Mount{
		Type:   "mkfs/ext4",
		Source: s.writablePath(snap.ID),
		Options: []string{
			"X-containerd.mkfs.fs=ext4",
			fmt.Sprintf("X-containerd.mkfs.size=%d", size),
			"rw",
			"loop",
		},
	}
	if len(lowers) == 0 {
		// Shape B.
		return []mount.Mount{rw, {
			Type:    "format/mkdir/bind",
			Source:  "{{ mount 0 }}/upper",
			Options: []string{"X-containerd.mkdir.path={{ mount 0 }}/upper:0755", "rw", "rbind"},
		}}, nil
	}
	// Shape A.
	ms := make([]mount.Mount, 0, len(lowers)+2)
	ms = append(ms, rw)
	for _, l := range lowers {
		ms = append(ms, s.layerMount(l))
	}
	lowerdir := "lowerdir={{ mount 1 }}"
	if len(lowers) > 1 {
		lowerdir = fmt.Sprintf("lowerdir={{ overlay 1 %d }}", len(lowers))
	}
	opts := []string{
		"X-containerd.mkdir.path={{ mount 0 }}/upper:0755",
		"X-containerd.mkdir.path={{ mount 0 }}/work:0755",
		"upperdir={{ mount 0 }}/upper",
		"workdir={{ mount 0 }}/work",
		lowerdir,
	}
	opts = append(opts, s.cfg.OverlayOptions...)
	return append(ms, mount.Mount{Type: "format/mkdir/overlay", Source: "overlay", Options: opts}), nil
}

// viewMounts is shape C.
func (s *Snapshotter) viewMounts(lowers []layerRef) []mount.Mount {
	switch len(lowers) {
	case 0:
		return []mount.Mount{{Type: "bind", Source: filepath.Join(s.root, "empty"), Options: []string{"ro", "rbind"}}}
	case 1:
		return []mount.Mount{s.layerMount(lowers[0])}
	}
	ms := make([]mount.Mount, 0, len(lowers)+1)
	for _, l := range lowers {
		ms = append(ms, s.layerMount(l))
	}
	opts := []string{"ro", fmt.Sprintf("lowerdir={{ overlay 0 %d }}", len(lowers)-1)}
	for _, o := range s.cfg.OverlayOptions {
		// volatile needs an upper directory; a view has none.
		if o != "volatile" {
			opts = append(opts, o)
		}
	}
	return append(ms, mount.Mount{Type: "format/overlay", Source: "overlay", Options: opts})
}
