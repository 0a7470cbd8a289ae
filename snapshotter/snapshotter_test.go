package snapshotter

import (
	"context"
	"testing"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/core/snapshots/testsuite"

	"github.com/caisson-containers/caisson/internal/testutil"
	"github.com/caisson-containers/caisson/snapshotter/config"
)

// requireHost skips unless the test can mount images: root, mkfs.erofs, mkfs.ext4
// and the erofs and overlay filesystems.
func requireHost(t testing.TB) {
	t.Helper()
	testutil.RequireRoot(t)
	testutil.RequireBinary(t, "mkfs.erofs")
	testutil.RequireBinary(t, "mkfs.ext4")
}

// suiteConfig is the configuration the conformance suite runs with. This host's
// kernel lacks CONFIG_OVERLAY_FS_REDIRECT_DIR, so the suite's Rename case (which
// renames a directory of a lower layer) needs redirect_dir=on, exactly as a
// production config on such a kernel does.
func suiteConfig(root string) config.Resolved {
	c := config.Default()
	c.Root = root
	c.DefaultWritableSize = "64MiB"
	c.OverlayOptions = []string{"redirect_dir=on"}
	r, err := c.Resolve()
	if err != nil {
		panic(err)
	}
	return r
}

func newForSuite(ctx context.Context, root string) (snapshots.Snapshotter, func() error, error) {
	s, err := New(ctx, suiteConfig(root))
	if err != nil {
		return nil, nil, err
	}
	return s, s.Close, nil
}

func TestSnapshotterSuite(t *testing.T) {
	requireHost(t)
	testsuite.SnapshotterSuite(t, "caisson", newForSuite)
}

// TestSnapshotterSuiteHostMounts runs the suite with mount_mode "host": plain
// overlay and bind mounts over loop-mounted layers, which containerd 1.7's
// mount code (the suite's, here) mounts as they are.
func TestSnapshotterSuiteHostMounts(t *testing.T) {
	requireHost(t)
	testsuite.SnapshotterSuite(t, "caisson-host", func(ctx context.Context, root string) (snapshots.Snapshotter, func() error, error) {
		cfg := suiteConfig(root)
		cfg.HostMounts = true
		s, err := New(ctx, cfg)
		if err != nil {
			return nil, nil, err
		}
		return s, s.Close, nil
	})
}

func testutilBinary(t testing.TB, name string) string {
	return testutil.RequireBinary(t, name)
}
