package harness

import (
	"archive/tar"
	"bytes"
	"io"
	"os"
	"testing"
	"time"

	containerd "github.com/containerd/containerd/v2/client"
	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"

	"github.com/caisson-containers/caisson/internal/testutil"
)

// BusyboxRef is the name the test busybox image is imported under.
const BusyboxRef = "caisson.test/busybox:latest"

// busyboxApplets are linked to /bin/busybox in the test image.
var busyboxApplets = []string{"sh", "echo", "cat", "ls", "uname", "sleep", "true", "false", "id", "ps",
	"mount", "grep", "head", "wc", "env", "kill", "nc", "hostname", "df", "stat", "tail", "yes", "dd", "sync", "touch", "rm", "mkdir", "printf", "tty", "stty"}

// BusyboxLayers builds the test image's layers from Debian's busybox-static:
// the base (busybox and its applets) and a second layer with a file, so the
// rootfs has more than one lower layer.
func BusyboxLayers(t testing.TB) []v1.Layer {
	t.Helper()
	bb, err := os.ReadFile(testutil.RequireBinary(t, "busybox"))
	if err != nil {
		t.Fatal(err)
	}
	mtime := time.Unix(1700000000, 0)
	base := layer(t, func(tw *tar.Writer) {
		dir(tw, "bin/", mtime)
		file(tw, "bin/busybox", 0o755, bb, mtime)
		for _, a := range busyboxApplets {
			tw.WriteHeader(&tar.Header{Typeflag: tar.TypeSymlink, Name: "bin/" + a, Linkname: "busybox", ModTime: mtime, Mode: 0o777})
		}
		for _, d := range []string{"etc/", "tmp/", "proc/", "sys/", "dev/", "root/", "run/", "var/"} {
			dir(tw, d, mtime)
		}
		file(tw, "etc/passwd", 0o644, []byte("root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n"), mtime)
		file(tw, "etc/group", 0o644, []byte("root:x:0:\nnogroup:x:65534:\n"), mtime)
	})
	top := layer(t, func(tw *tar.Writer) {
		dir(tw, "etc/", mtime)
		file(tw, "etc/caisson-layer", 0o644, []byte("second layer\n"), mtime)
	})
	return []v1.Layer{base, top}
}

// ImportBusybox imports the busybox image (command sh) into containerd, unpacked into the caisson snapshotter.
func (e *Env) ImportBusybox(t testing.TB) containerd.Image {
	t.Helper()
	return e.Import(t, BusyboxRef, BusyboxImage(t, "sh"))
}

// Image is a linux/amd64 image of layers, with cmd as its command and /bin on PATH.
func Image(t testing.TB, layers []v1.Layer, cmd ...string) v1.Image {
	t.Helper()
	img, err := mutate.AppendLayers(empty.Image, layers...)
	if err != nil {
		t.Fatal(err)
	}
	cf, err := img.ConfigFile()
	if err != nil {
		t.Fatal(err)
	}
	cf = cf.DeepCopy()
	cf.OS, cf.Architecture = "linux", "amd64"
	cf.Config.Cmd = cmd
	cf.Config.Env = []string{"PATH=/bin"}
	if img, err = mutate.ConfigFile(img, cf); err != nil {
		t.Fatal(err)
	}
	return img
}

// Import imports img into containerd as ref, unpacked into the caisson snapshotter.
func (e *Env) Import(t testing.TB, ref string, img v1.Image) containerd.Image {
	t.Helper()
	tag, err := name.NewTag(ref)
	if err != nil {
		t.Fatal(err)
	}
	var buf bytes.Buffer
	if err := tarball.Write(tag, img, &buf); err != nil {
		t.Fatal(err)
	}
	ctx := e.Context(t)
	imgs, err := e.Client.Import(ctx, &buf)
	if err != nil {
		t.Fatalf("import: %v", err)
	}
	if len(imgs) != 1 {
		t.Fatalf("import gave %d images, want 1", len(imgs))
	}
	image, err := e.Client.GetImage(ctx, imgs[0].Name)
	if err != nil {
		t.Fatal(err)
	}
	if err := image.Unpack(ctx, "caisson"); err != nil {
		t.Fatalf("unpack into the caisson snapshotter: %v", err)
	}
	return image
}

// Layer is a layer holding the tar b.
func Layer(t testing.TB, b []byte) v1.Layer {
	t.Helper()
	l, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(b)), nil })
	if err != nil {
		t.Fatal(err)
	}
	return l
}

func layer(t testing.TB, fill func(*tar.Writer)) v1.Layer {
	t.Helper()
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	fill(tw)
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	return Layer(t, buf.Bytes())
}

func dir(tw *tar.Writer, name string, mtime time.Time) {
	tw.WriteHeader(&tar.Header{Typeflag: tar.TypeDir, Name: name, Mode: 0o755, ModTime: mtime})
}

func file(tw *tar.Writer, name string, mode int64, b []byte, mtime time.Time) {
	tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: name, Mode: mode, Size: int64(len(b)), ModTime: mtime})
	tw.Write(b)
}
