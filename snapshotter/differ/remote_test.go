package differ

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/core/mount/manager"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	bolt "go.etcd.io/bbolt"

	"github.com/caisson-containers/caisson/internal/testutil"
)

// TestRemoteDeactivatesLeftovers: an activation a killed caisson-snapshotter left
// in its mount manager (a writable image formatted, loop-mounted, in the middle
// of a fallback apply) is undone when the next one starts: nothing stays mounted
// and no loop device holds the image.
func TestRemoteDeactivatesLeftovers(t *testing.T) {
	testutil.RequireRoot(t)
	testutil.RequireBinary(t, "mkfs.ext4")
	root := t.TempDir()
	state := filepath.Join(root, "mm")
	rw := filepath.Join(root, "rw.ext4")
	ctx := namespaces.WithNamespace(context.Background(), "caisson-test")

	// The killed process: an activation, never deactivated.
	if err := os.MkdirAll(filepath.Join(state, "t"), 0o700); err != nil {
		t.Fatal(err)
	}
	db, err := bolt.Open(filepath.Join(state, "mounts.db"), 0o600, nil)
	if err != nil {
		t.Fatal(err)
	}
	mm, err := manager.NewManager(db, filepath.Join(state, "t"), manager.WithAllowedRoot(root))
	if err != nil {
		t.Fatal(err)
	}
	mounts := []mount.Mount{
		{Type: "mkfs/ext4", Source: rw, Options: []string{"X-containerd.mkfs.fs=ext4", "X-containerd.mkfs.size=67108864", "rw", "loop"}},
		{Type: "format/mkdir/bind", Source: "{{ mount 0 }}/upper", Options: []string{"X-containerd.mkdir.path={{ mount 0 }}/upper:0755", "rw", "rbind"}},
	}
	if _, err := mm.Activate(ctx, "apply-1", mounts); err != nil {
		t.Fatal(err)
	}
	if !mountedUnder(t, state) || !loopBacked(t, rw) {
		t.Fatal("the activation mounted nothing: the test proves nothing")
	}
	mm.(interface{ Close() error }).Close()
	t.Cleanup(func() { unmountUnder(t, state) }) // should the test fail

	r, err := NewRemote(ctx, filepath.Join(root, "no-containerd.sock"), state, root, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	if mountedUnder(t, state) {
		t.Error("the left activation is still mounted")
	}
	if loopBacked(t, rw) {
		t.Error("a loop device still holds the writable image")
	}
}

// mountedUnder reports whether anything is mounted below dir.
func mountedUnder(t *testing.T, dir string) bool {
	return len(mountsUnder(t, dir)) > 0
}

func mountsUnder(t *testing.T, dir string) []string {
	t.Helper()
	mi, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	var points []string
	for _, line := range strings.Split(string(mi), "\n") {
		if f := strings.Fields(line); len(f) > 4 && strings.HasPrefix(f[4], dir+"/") {
			points = append(points, f[4])
		}
	}
	return points
}

// unmountUnder unmounts everything below dir, deepest first (a loop device
// goes with its mount).
func unmountUnder(t *testing.T, dir string) {
	points := mountsUnder(t, dir)
	for i := len(points) - 1; i >= 0; i-- {
		if err := mount.UnmountAll(points[i], 0); err != nil {
			t.Errorf("unmount %s: %v", points[i], err)
		}
	}
}

// loopBacked reports whether a loop device's backing file is path.
func loopBacked(t *testing.T, path string) bool {
	t.Helper()
	files, _ := filepath.Glob("/sys/block/loop*/loop/backing_file")
	for _, f := range files {
		if b, err := os.ReadFile(f); err == nil && strings.TrimSpace(string(b)) == path {
			return true
		}
	}
	return false
}
