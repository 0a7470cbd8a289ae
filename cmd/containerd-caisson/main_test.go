package main

import (
	"archive/tar"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/core/mount"
	"github.com/opencontainers/go-digest"
	specs "github.com/opencontainers/image-spec/specs-go"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/caisson-containers/caisson/internal/testutil"
)

// TestContainerdUnpackAndRunc is the host half of docs/mounts.md end to end:
// containerd imports an image and unpacks it into the caisson snapshotter with
// its own differ and mount manager, and io.containerd.runc.v2 runs a container
// on the caisson snapshot, whiteouts and all. Both deliveries: built in
// (containerd-caisson) and as a proxy plugin (containerd + caisson-snapshotter).
func TestContainerdUnpackAndRunc(t *testing.T) {
	t.Run("builtin", func(t *testing.T) { testUnpackAndRunc(t, false) })
	t.Run("proxy", func(t *testing.T) { testUnpackAndRunc(t, true) })
}

func testUnpackAndRunc(t *testing.T, proxy bool) {
	testutil.RequireRoot(t)
	testutil.RequireBinary(t, "mkfs.erofs")
	testutil.RequireBinary(t, "runc")
	busybox := testutil.RequireBinary(t, "busybox")
	ctr := testutil.RequireBinary(t, "ctr")
	shim := testutil.RequireBinary(t, "containerd-shim-runc-v2")

	dir := t.TempDir()
	root, state, sock := filepath.Join(dir, "root"), filepath.Join(dir, "state"), filepath.Join(dir, "containerd.sock")
	cfg := filepath.Join(dir, "config.toml")
	bin := filepath.Join(dir, "containerd-caisson")
	if out, err := exec.Command("go", "build", "-o", bin, ".").CombinedOutput(); err != nil {
		t.Fatalf("go build: %v: %s", err, out)
	}
	// Where Caisson's differ logs the layers it writes itself.
	differLog := filepath.Join(dir, "containerd.log")
	snapshotterConfig := `[plugins.'io.containerd.snapshotter.v1.caisson']
  default_writable_size = "256MiB"
  overlay_options = ["redirect_dir=on"]`
	if proxy {
		// Plain containerd; the snapshotter runs as its own daemon with its
		// root under containerd's (the mount manager creates writable images
		// only there), as contrib/snapshotter/containerd-proxy-plugin.toml says.
		bin = testutil.RequireBinary(t, "containerd")
		snapBin := filepath.Join(dir, "caisson-snapshotter")
		if out, err := exec.Command("go", "build", "-o", snapBin, "../caisson-snapshotter").CombinedOutput(); err != nil {
			t.Fatalf("go build: %v: %s", err, out)
		}
		snapCfg := filepath.Join(dir, "snapshotter.toml")
		writeFile(t, snapCfg, "default_writable_size = \"256MiB\"\noverlay_options = [\"redirect_dir=on\"]\n")
		snapSock := filepath.Join(dir, "snapshotter.sock")
		sc := exec.Command(snapBin, "--root", filepath.Join(root, "io.containerd.snapshotter.v1.caisson"), "--address", snapSock, "--config", snapCfg,
			"--containerd-address", sock, "--log-level", "debug")
		slog, err := os.Create(filepath.Join(dir, "snapshotter.log"))
		if err != nil {
			t.Fatal(err)
		}
		sc.Stdout, sc.Stderr = slog, slog
		if err := sc.Start(); err != nil {
			t.Fatal(err)
		}
		sexited := make(chan error, 1)
		go func() { sexited <- sc.Wait(); slog.Close() }()
		t.Cleanup(func() {
			sc.Process.Signal(syscall.SIGTERM)
			if err := <-sexited; err != nil {
				t.Errorf("caisson-snapshotter after SIGTERM: %v", err)
			}
		})
		waitSocket(t, snapSock, sexited)
		snapshotterConfig = fmt.Sprintf(`[proxy_plugins.caisson]
  type = "snapshot"
  address = %q
[proxy_plugins.caisson-diff]
  type = "diff"
  address = %q`, snapSock, snapSock)
		differLog = filepath.Join(dir, "snapshotter.log")
	}
	writeFile(t, cfg, fmt.Sprintf(`version = 3
root = %q
state = %q
disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.cri.v1.images", "io.containerd.cri.v1.runtime", "io.containerd.nri.v1.nri"]
[grpc]
  address = %q
[ttrpc]
  address = %q
%s
[[plugins.'io.containerd.transfer.v1.local'.unpack_config]]
  platform = "linux/amd64"
  snapshotter = "caisson"
  differ = "caisson-diff"
`, root, state, sock, sock+".ttrpc", snapshotterConfig))

	cmd := exec.Command(bin, "--config", cfg, "--log-level", "debug")
	cmd.Env = append(os.Environ(), "PATH="+filepath.Dir(shim)+":"+os.Getenv("PATH"))
	logf, err := os.Create(filepath.Join(dir, "containerd.log"))
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait(); logf.Close() }()
	t.Cleanup(func() {
		cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-exited:
		case <-time.After(30 * time.Second):
			cmd.Process.Kill()
			<-exited
		}
		unmountUnder(t, dir)
		if t.Failed() {
			log, _ := os.ReadFile(logf.Name())
			t.Logf("containerd log (tail):\n%s", tail(string(log), 60))
		}
	})
	waitSocket(t, sock, exited)

	run := func(args ...string) string {
		t.Helper()
		c := exec.Command(ctr, append([]string{"--address", sock, "--namespace", "caisson-test"}, args...)...)
		c.Env = cmd.Env
		var out, stderr bytes.Buffer
		c.Stdout, c.Stderr = &out, &stderr
		if err := c.Run(); err != nil {
			t.Fatalf("ctr %s: %v\n%s%s", strings.Join(args, " "), err, out.String(), stderr.String())
		}
		return out.String()
	}

	// Two images with the same base layer and different top layers.
	for i, hello := range []string{"hello from layer 2\n", "hello from another image\n"} {
		image := filepath.Join(dir, fmt.Sprintf("image%d.tar", i))
		writeOCIImage(t, image, busybox, fmt.Sprint(i+1), hello)
		run("images", "import", "--snapshotter", "caisson", "--base-name", "caisson.test/e2e", image)
		ref := fmt.Sprintf("caisson.test/e2e:%d", i+1)
		t.Cleanup(func() {
			exec.Command(ctr, "--address", sock, "--namespace", "caisson-test", "images", "rm", "--sync", ref).Run()
		})
	}

	// The shared base layer is stored once: three layer images for four layers.
	layers, _ := filepath.Glob(filepath.Join(root, "io.containerd.snapshotter.v1.caisson", "snapshots", "*", "layer.erofs"))
	if len(layers) != 3 {
		t.Fatalf("%d layer images after unpacking two images sharing a base, want 3: %v", len(layers), layers)
	}
	for _, l := range layers {
		fi, err := os.Stat(l)
		if err != nil {
			t.Fatal(err)
		}
		if fi.Size()%(2<<20) != 0 {
			t.Errorf("%s: %d bytes, not a multiple of 2 MiB", l, fi.Size())
		}
	}
	if staged, _ := filepath.Glob(filepath.Join(root, "io.containerd.snapshotter.v1.caisson", "snapshots", "*", "rw.ext4")); len(staged) != 0 {
		t.Errorf("staging images left after unpack: %v", staged)
	}
	// Caisson's differ wrote the three layers from their tars (no hardlinks in
	// them), with no fallback to containerd's.
	if lg, err := os.ReadFile(differLog); err != nil {
		t.Fatal(err)
	} else if n := strings.Count(string(lg), "diff applied as an EROFS layer"); n != 3 {
		t.Errorf("Caisson's differ wrote %d layers, want 3 (log %s)", n, differLog)
	}

	// A layer whose entry climbs out of the root: Caisson's differ refuses it
	// with an error naming the entry, writes nothing outside, and containerd's
	// unpacker removes the snapshot.
	outside := t.TempDir()
	bad := filepath.Join(dir, "bad.tar")
	evil := strings.Repeat("../", 20) + strings.TrimPrefix(outside, "/") + "/pwned"
	writeImage(t, bad, "bad", tarOf(t, func(w *tar.Writer) { file(t, w, evil, []byte("x"), 0o644) }))
	imp := exec.Command(ctr, "--address", sock, "--namespace", "caisson-test", "images", "import", "--snapshotter", "caisson", "--base-name", "caisson.test/bad", bad)
	imp.Env = cmd.Env
	if out, err := imp.CombinedOutput(); err == nil || !strings.Contains(string(out), "leaves the layer's root") || !strings.Contains(string(out), "pwned") {
		t.Errorf("import of a layer escaping its root: %v, output %q; want an error naming the entry", err, out)
	} else {
		t.Logf("import of a layer escaping its root: %s", strings.TrimSpace(string(out)))
	}
	t.Cleanup(func() {
		exec.Command(ctr, "--address", sock, "--namespace", "caisson-test", "images", "rm", "--sync", "caisson.test/bad:bad").Run()
	})
	if entries, _ := os.ReadDir(outside); len(entries) != 0 {
		t.Errorf("the bad layer wrote outside its root: %v", entries)
	}
	if tmp, _ := filepath.Glob(filepath.Join(root, "io.containerd.snapshotter.v1.caisson", "snapshots", "*", "*.tmp")); len(tmp) != 0 {
		t.Errorf("half-written images after the failed unpack: %v", tmp)
	}

	out := run("run", "--rm", "--snapshotter", "caisson", "caisson.test/e2e:1", "e2e",
		"/bin/sh", "-c", "cat /etc/hello; test -e /bin/gone || echo gone-is-gone; echo written > /tmp/w; cat /tmp/w")
	want := "hello from layer 2\ngone-is-gone\nwritten\n"
	if out != want {
		t.Fatalf("container output %q, want %q", out, want)
	}
	out = run("run", "--rm", "--snapshotter", "caisson", "caisson.test/e2e:2", "e2e2", "/bin/cat", "/etc/hello")
	if out != "hello from another image\n" {
		t.Fatalf("second image's container output %q", out)
	}
}

// writeOCIImage writes an OCI image layout tar tagged tag: a base layer with a
// static busybox and a few of its links (the same bytes every time), and a
// second layer that adds /etc/hello and whites out /bin/gone.
func writeOCIImage(t *testing.T, path, busybox, tag, hello string) {
	t.Helper()
	bb, err := os.ReadFile(busybox)
	if err != nil {
		t.Fatal(err)
	}
	base := tarOf(t, func(w *tar.Writer) {
		dir(t, w, "bin")
		file(t, w, "bin/busybox", bb, 0o755)
		for _, l := range []string{"sh", "cat", "test", "echo", "gone"} {
			hdr(t, w, &tar.Header{Typeflag: tar.TypeSymlink, Name: "bin/" + l, Linkname: "busybox", Mode: 0o777})
		}
		dir(t, w, "etc")
		dir(t, w, "tmp")
	})
	top := tarOf(t, func(w *tar.Writer) {
		dir(t, w, "etc")
		file(t, w, "etc/hello", []byte(hello), 0o644)
		dir(t, w, "bin")
		file(t, w, "bin/.wh.gone", nil, 0o644)
	})
	writeImage(t, path, tag, base, top)
}

// writeImage writes an OCI image layout tar tagged tag whose uncompressed layers
// are layers, bottom first.
func writeImage(t *testing.T, path, tag string, layers ...[]byte) {
	t.Helper()
	blobs := map[digest.Digest][]byte{}
	add := func(mt string, b []byte) ocispec.Descriptor {
		d := digest.FromBytes(b)
		blobs[d] = b
		return ocispec.Descriptor{MediaType: mt, Digest: d, Size: int64(len(b))}
	}
	config := ocispec.Image{
		Platform: ocispec.Platform{Architecture: "amd64", OS: "linux"},
		Config:   ocispec.ImageConfig{Cmd: []string{"/bin/sh"}},
		RootFS:   ocispec.RootFS{Type: "layers"},
	}
	manifest := ocispec.Manifest{
		Versioned: specs.Versioned{SchemaVersion: 2},
		MediaType: ocispec.MediaTypeImageManifest,
	}
	for _, l := range layers {
		config.RootFS.DiffIDs = append(config.RootFS.DiffIDs, digest.FromBytes(l))
		manifest.Layers = append(manifest.Layers, add(ocispec.MediaTypeImageLayer, l))
	}
	manifest.Config = add(ocispec.MediaTypeImageConfig, mustJSON(t, config))
	md := add(ocispec.MediaTypeImageManifest, mustJSON(t, manifest))
	md.Annotations = map[string]string{ocispec.AnnotationRefName: tag}
	md.Platform = &ocispec.Platform{Architecture: "amd64", OS: "linux"}
	index := ocispec.Index{Versioned: specs.Versioned{SchemaVersion: 2}, MediaType: ocispec.MediaTypeImageIndex, Manifests: []ocispec.Descriptor{md}}

	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	w := tar.NewWriter(f)
	file(t, w, "oci-layout", []byte(`{"imageLayoutVersion":"1.0.0"}`), 0o644)
	file(t, w, "index.json", mustJSON(t, index), 0o644)
	dir(t, w, "blobs")
	dir(t, w, "blobs/sha256")
	for d, b := range blobs {
		file(t, w, "blobs/sha256/"+d.Encoded(), b, 0o644)
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
}

func tarOf(t *testing.T, fn func(*tar.Writer)) []byte {
	var b bytes.Buffer
	w := tar.NewWriter(&b)
	fn(w)
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	return b.Bytes()
}

func hdr(t *testing.T, w *tar.Writer, h *tar.Header) {
	h.ModTime = time.Unix(1600000000, 0)
	if err := w.WriteHeader(h); err != nil {
		t.Fatal(err)
	}
}

func dir(t *testing.T, w *tar.Writer, name string) {
	hdr(t, w, &tar.Header{Typeflag: tar.TypeDir, Name: name + "/", Mode: 0o755})
}

func file(t *testing.T, w *tar.Writer, name string, data []byte, mode int64) {
	hdr(t, w, &tar.Header{Typeflag: tar.TypeReg, Name: name, Mode: mode, Size: int64(len(data))})
	if _, err := w.Write(data); err != nil {
		t.Fatal(err)
	}
}

func mustJSON(t *testing.T, v any) []byte {
	b, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func writeFile(t *testing.T, p, s string) {
	if err := os.WriteFile(p, []byte(s), 0o600); err != nil {
		t.Fatal(err)
	}
}

func waitSocket(t *testing.T, sock string, exited <-chan error) {
	t.Helper()
	deadline := time.Now().Add(60 * time.Second)
	for time.Now().Before(deadline) {
		if c, err := net.Dial("unix", sock); err == nil {
			c.Close()
			return
		}
		select {
		case err := <-exited:
			t.Fatalf("containerd exited at start: %v", err)
		case <-time.After(50 * time.Millisecond):
		}
	}
	t.Fatal("containerd did not start")
}

// unmountUnder unmounts every mount point below dir, deepest first.
func unmountUnder(t *testing.T, dir string) {
	mi, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return
	}
	var points []string
	for _, line := range strings.Split(string(mi), "\n") {
		if f := strings.Fields(line); len(f) > 4 && strings.HasPrefix(f[4], dir+"/") {
			points = append(points, f[4])
		}
	}
	for i := len(points) - 1; i >= 0; i-- {
		if err := mount.UnmountAll(points[i], 0); err != nil && !errors.Is(err, os.ErrNotExist) {
			t.Errorf("unmount %s: %v", points[i], err)
		}
	}
}

func tail(s string, n int) string {
	lines := strings.Split(s, "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}
