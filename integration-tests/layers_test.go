package integration

import (
	"bytes"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	containerd "github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/pkg/oci"
	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"

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
		l, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(b)), nil })
		if err != nil {
			t.Fatal(err)
		}
		layers = append(layers, l)
	}
	img, err := mutate.AppendLayers(empty.Image, layers...)
	if err != nil {
		t.Fatal(err)
	}
	cf, _ := img.ConfigFile()
	cf = cf.DeepCopy()
	cf.OS, cf.Architecture = "linux", "amd64"
	if img, err = mutate.ConfigFile(img, cf); err != nil {
		t.Fatal(err)
	}
	const ref = "caisson.test/tree:latest"
	tag, _ := name.NewTag(ref)
	var buf bytes.Buffer
	if err := tarball.Write(tag, img, &buf); err != nil {
		t.Fatal(err)
	}
	ctx := e.Context(t)
	if _, err := e.Client.Import(ctx, &buf); err != nil {
		t.Fatal(err)
	}
	image, err := e.Client.GetImage(ctx, ref)
	if err != nil {
		t.Fatal(err)
	}
	if err := image.Unpack(ctx, "caisson"); err != nil {
		t.Fatalf("unpack into the caisson snapshotter: %v", err)
	}
	return image
}
