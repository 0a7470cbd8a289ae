package snapshotter

import (
	"context"
	"path/filepath"
	"strings"
	"testing"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/containerd/v2/plugins"
	"github.com/containerd/plugin"
	"github.com/containerd/plugin/registry"

	"github.com/caisson-containers/caisson/internal/testutil"
)

func registration(t *testing.T) plugin.Registration {
	t.Helper()
	for _, r := range registry.Graph(func(*plugin.Registration) bool { return false }) {
		if r.Type == plugins.SnapshotPlugin && r.ID == ID {
			return r
		}
	}
	t.Fatal("caisson snapshot plugin is not registered")
	return plugin.Registration{}
}

// TestRegistration initializes the plugin as containerd does (its default config,
// the plugin root property) and drives one layer through it.
func TestRegistration(t *testing.T) {
	testutil.RequireRoot(t)
	testutil.RequireBinary(t, "mkfs.erofs")
	r := registration(t)
	ctx := namespaces.WithNamespace(context.Background(), "test")
	root := filepath.Join(t.TempDir(), "io.containerd.snapshotter.v1.caisson")
	ic := plugin.NewContext(ctx, plugin.NewPluginSet(), map[string]string{plugins.PropertyRootDir: root})
	ic.Config = r.Config
	p := r.Init(ic)
	inst, err := p.Instance()
	if err != nil {
		t.Fatal(err)
	}
	sn := inst.(snapshots.Snapshotter)
	t.Cleanup(func() { sn.Close() })
	if got := p.Meta.Exports[plugins.SnapshotterRootDir]; got != root {
		t.Errorf("exported root %q, want %q", got, root)
	}
	mounts, err := sn.Prepare(ctx, "a", "")
	if err != nil {
		t.Fatal(err)
	}
	if len(mounts) != 2 || mounts[0].Type != "mkfs/ext4" || filepath.Dir(filepath.Dir(mounts[0].Source)) != filepath.Join(root, "snapshots") {
		t.Fatalf("mounts %+v are not docs/mounts.md shape B under the plugin root", mounts)
	}
	if err := sn.Commit(ctx, "b", "a"); err != nil {
		t.Fatal(err)
	}
	if info, err := sn.Stat(ctx, "b"); err != nil || info.Kind != snapshots.KindCommitted {
		t.Fatalf("stat b: %v %v", info.Kind, err)
	}
}

// TestRegistrationBadConfig: a bad value fails the plugin's init with an error
// naming it, rather than falling back to a default.
func TestRegistrationBadConfig(t *testing.T) {
	r := registration(t)
	ic := plugin.NewContext(context.Background(), plugin.NewPluginSet(), map[string]string{plugins.PropertyRootDir: t.TempDir()})
	bad := *(r.Config.(*Config))
	bad.LayerFilesystem = "btrfs"
	ic.Config = &bad
	if _, err := r.Init(ic).Instance(); err == nil {
		t.Fatal("init with layer_filesystem = btrfs succeeded")
	} else if want := `layer_filesystem "btrfs"`; !strings.Contains(err.Error(), want) {
		t.Fatalf("error %q does not name %s", err, want)
	}
}
