package snapshotter

import (
	"errors"

	"github.com/containerd/containerd/v2/core/diff/apply"
	"github.com/containerd/containerd/v2/core/metadata"
	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/plugins"
	"github.com/containerd/containerd/v2/plugins/diff/walking"
	"github.com/containerd/log"
	"github.com/containerd/platforms"
	"github.com/containerd/plugin"
	"github.com/containerd/plugin/registry"

	"github.com/caisson-containers/caisson/snapshotter"
	"github.com/caisson-containers/caisson/snapshotter/differ"
)

// DifferID is the id of Caisson's differ, the diff plugin registered beside the
// snapshotter. Name it in the transfer service's unpack_config entry for the
// caisson snapshotter (differ = "caisson-diff") and first in the diff service's
// default list. Layers it does not write itself go to containerd's mount-manager
// applier, as the "walking" differ's do.
const DifferID = differ.Name

func init() {
	registry.Register(&plugin.Registration{
		Type: plugins.DiffPlugin,
		ID:   DifferID,
		Requires: []plugin.Type{
			plugins.MetadataPlugin,
			plugins.MountManagerPlugin,
			plugins.SnapshotPlugin,
		},
		InitFn: func(ic *plugin.InitContext) (any, error) {
			md, err := ic.GetSingle(plugins.MetadataPlugin)
			if err != nil {
				return nil, err
			}
			var mm mount.Manager
			if m, err := ic.GetSingle(plugins.MountManagerPlugin); err == nil {
				mm = m.(mount.Manager)
			} else if !errors.Is(err, plugin.ErrPluginNotFound) {
				return nil, err
			}
			// The caisson snapshot plugin's instance, whose layers it writes. If
			// it failed to load, every layer goes to the fallback.
			var layers []differ.LayerWriter
			if sn, err := ic.GetByID(plugins.SnapshotPlugin, ID); err != nil {
				log.G(ic.Context).WithError(err).Warn("caisson-diff: no caisson snapshotter; applying every layer with containerd's differ")
			} else if s, ok := sn.(*snapshotter.Snapshotter); ok {
				layers = append(layers, s)
			}
			ic.Meta.Platforms = append(ic.Meta.Platforms, platforms.DefaultSpec())
			cs := md.(*metadata.DB).ContentStore()
			return differ.New(cs, layers, apply.NewFileSystemApplierWithMountManager(cs, mm), walking.NewWalkingDiff(cs)), nil
		},
	})
}
