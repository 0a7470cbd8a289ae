// Package snapshotter registers Caisson's block snapshotter as a built-in
// containerd snapshot plugin, "caisson", and Caisson's differ, which writes layers
// straight into it, as the diff plugin "caisson-diff". Import it for its side effect:
//
//	import _ "github.com/caisson-containers/caisson/plugins/snapshotter"
//
// Its config is snapshotter/config.Config, under
// [plugins.'io.containerd.snapshotter.v1.caisson']; root defaults to the plugin's
// directory under containerd's root.
package snapshotter

import (
	"fmt"

	"github.com/containerd/containerd/v2/plugins"
	"github.com/containerd/plugin"
	"github.com/containerd/plugin/registry"

	"github.com/caisson-containers/caisson/snapshotter"
	"github.com/caisson-containers/caisson/snapshotter/config"
)

// Config is the plugin's configuration (see snapshotter/config for every key).
type Config = config.Config

// ID is the plugin's id, and the snapshotter's name in containerd.
const ID = "caisson"

func init() {
	defaults := config.Default()
	defaults.Root = "" // the plugin's own directory, known at init
	registry.Register(&plugin.Registration{
		Type:   plugins.SnapshotPlugin,
		ID:     ID,
		Config: &defaults,
		InitFn: func(ic *plugin.InitContext) (any, error) {
			cfg, ok := ic.Config.(*Config)
			if !ok {
				return nil, fmt.Errorf("caisson snapshotter: config is %T, not *config.Config", ic.Config)
			}
			c := *cfg
			if c.Root == "" {
				c.Root = ic.Properties[plugins.PropertyRootDir]
			}
			resolved, err := c.Resolve()
			if err != nil {
				return nil, fmt.Errorf("caisson snapshotter config: %w", err)
			}
			ic.Meta.Exports[plugins.SnapshotterRootDir] = resolved.Root
			return snapshotter.New(ic.Context, resolved)
		},
	})
}
