package integration

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	containerd "github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/pkg/oci"
	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/caisson-containers/caisson/integration-tests/harness"
	"github.com/caisson-containers/caisson/shim/config"
	"github.com/caisson-containers/caisson/snapshotter/snapshottest"
)

// The snapshotter's test layers (whiteouts, opaque directories, hardlinks across
// directories, xattrs, setuid, device nodes, long names and paths), unpacked by
// containerd's differ into the caisson snapshotter and attached to a VM, show
// exactly the expected tree inside the guest, on pmem (DAX) and on virtio-blk.
func TestLayersInsideTheGuest(t *testing.T) {
	for _, dax := range []bool{true, false} {
		t.Run(map[bool]string{true: "pmem", false: "virtio-blk"}[dax], func(t *testing.T) {
			e := harness.Start(t, harness.Options{Runtime: func(c *config.Config) { c.Storage.DAX = dax }})
			image := importTreeImage(t, e)
			ctx := e.Context(t)
			c := newContainer(t, e, image, "tree", oci.WithProcessArgs("/treecheck"), oci.WithPrivileged)
			var o outputs
			_, exit := startTask(t, ctx, c, &o)
			select {
			case st := <-exit:
				if st.ExitCode() != 0 {
					t.Fatalf("treecheck exited %d:\n%s%s", st.ExitCode(), o.stdout.String(), o.stderr.String())
				}
			case <-time.After(2 * time.Minute):
				t.Fatal("treecheck did not finish")
			}
			t.Log(strings.TrimSpace(o.stdout.String()))
		})
	}
}

// importTreeImage builds an image of snapshottest's base and upper layers plus
// a layer holding the static treecheck binary, and imports and unpacks it.
func importTreeImage(t *testing.T, e *harness.Env) containerd.Image {
	t.Helper()
	bin := filepath.Join(t.TempDir(), "treecheck")
	build := exec.Command("go", "build", "-o", bin, "./treecheck")
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("build treecheck: %v\n%s", err, out)
	}
	checker, err := os.ReadFile(bin)
	if err != nil {
		t.Fatal(err)
	}
	var layers []v1.Layer
	for _, entries := range [][]snapshottest.TarEntry{
		snapshottest.BaseLayer(),
		snapshottest.UpperLayer(),
		{snapshottest.File("treecheck", string(checker), 0o755, 0, 0)},
	} {
		b, err := snapshottest.Tar(entries)
		if err != nil {
			t.Fatal(err)
		}
		layers = append(layers, harness.Layer(t, b))
	}
	return e.Import(t, "caisson.test/tree:latest", harness.Image(t, layers))
}
