package test

// Everything that launches a VM for these tests is in this file: the real guest image
// (`make guest`) on the shim's QEMU VMM, and a ttrpc client to its agent.

import (
	"context"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/containerd/errdefs/pkg/errgrpc"
	"github.com/containerd/ttrpc"

	agent "github.com/caisson-containers/caisson/api/agent/v1"
	"github.com/caisson-containers/caisson/internal/testutil"
	"github.com/caisson-containers/caisson/internal/transport"
	"github.com/caisson-containers/caisson/shim/vmm"
	"github.com/caisson-containers/caisson/shim/vmm/qemu"
)

// bootTimeout bounds a boot under TCG on a busy 2-core machine.
const bootTimeout = 90 * time.Second

type guestVM struct {
	vm         *qemu.VM
	session    transport.Session
	client     *ttrpc.Client
	sandbox    agent.SandboxService
	storage    agent.StorageService
	containers agent.ContainersClient
	exec       agent.ExecService
	io         agent.IOService
	console    string
}

// testKernelParams are the guest's kernel parameters in tests: debug logs on the
// console, which the tests print when they fail.
var testKernelParams = []string{"quiet", "caisson.debug"}

// bootGuest starts the guest image with disks attached and connects to its agent.
func bootGuest(t testing.TB, disks []vmm.Disk, hotplug int) *guestVM {
	t.Helper()
	return bootGuestWith(t, bootOptions{disks: disks, hotplug: hotplug, params: testKernelParams})
}

// bootOptions are what a test may choose of the VM it boots.
type bootOptions struct {
	disks      []vmm.Disk
	hotplug    int
	params     []string
	initramfs  string // instead of the built image's (the benchmark's comparisons)
	tcgPlugins []string
}

func bootGuestWith(t testing.TB, o bootOptions) *guestVM {
	t.Helper()
	if testing.Short() {
		t.Skip("boots a VM; skipped with -short")
	}
	testutil.RequireRoot(t)
	testutil.RequireBinary(t, "qemu-system-x86_64")
	g := testutil.RequireGuest(t)
	if o.initramfs != "" {
		g.Initramfs = o.initramfs
	}
	state := testutil.ShortTempDir(t)
	cfg := vmm.Config{
		Kernel: g.Kernel, Initramfs: g.Initramfs, Accelerator: "tcg", StateDir: state,
		Disks: o.disks, HotplugSlots: o.hotplug, MemoryMiB: 512, TCGPlugins: o.tcgPlugins,
		KernelParams: o.params,
	}
	vm, err := qemu.New(cfg, qemu.Config{})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), bootTimeout)
	defer cancel()
	if err := vm.Start(ctx); err != nil {
		t.Fatal(err)
	}
	gv := &guestVM{vm: vm, console: filepath.Join(state, "console.log")}
	t.Cleanup(func() {
		if t.Failed() {
			b, _ := os.ReadFile(gv.console)
			t.Logf("guest console:\n%s", tail(string(b), 6000))
		}
		gv.stop(t)
	})
	if err := gv.connect(ctx); err != nil {
		t.Fatal(err)
	}
	return gv
}

// closeConn closes the connection to the agent.
func (g *guestVM) closeConn() {
	if g.client != nil {
		g.client.Close()
		g.client = nil
	}
	if g.session != nil {
		g.session.Close()
		g.session = nil
	}
}

// stop closes the connection and stops the VM; it may be called again.
func (g *guestVM) stop(t testing.TB) {
	g.closeConn()
	if err := g.vm.Stop(context.Background()); err != nil {
		t.Errorf("stop vm: %v", err)
	}
}

// native turns an error from the agent back into an errdefs one.
func native(err error) error { return errgrpc.ToNative(err) }

func tail(s string, n int) string {
	if len(s) > n {
		return s[len(s)-n:]
	}
	return s
}

func (g *guestVM) connect(ctx context.Context) error {
	ep := g.vm.Endpoint()
	s, err := transport.DialSerial(ctx, ep.Path)
	if err != nil {
		return err
	}
	g.session = s
	c, err := transport.OpenTTRPC(ctx, s)
	if err != nil {
		return err
	}
	g.client = c
	g.sandbox = agent.NewSandboxClient(c)
	g.storage = agent.NewStorageClient(c)
	g.containers = agent.NewContainersClient(c)
	g.exec = agent.NewExecClient(c)
	g.io = agent.NewIOClient(c)
	// The first call completes once the agent serves: that is its readiness.
	_, err = g.sandbox.Check(ctx, &agent.CheckRequest{})
	return err
}

// stdio opens a standard-stream connection of a process.
func (g *guestVM) stdio(t testing.TB, container, execID string, kind agent.StreamKind) net.Conn {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	c, err := transport.OpenStdio(ctx, g.session, &agent.StdioStream{ContainerId: container, ExecId: execID, Stream: kind})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// readAll reads c to EOF in the background.
func readAll(c io.Reader) <-chan string {
	ch := make(chan string, 1)
	go func() {
		b, _ := io.ReadAll(c)
		ch <- string(b)
	}()
	return ch
}

// busyboxLayers writes the test image: a base layer with Debian's static busybox and a
// top layer with one file, as EROFS images padded to 2 MiB (so they can back pmem), and
// an empty ext4 image for the writable layer.
func busyboxLayers(t testing.TB, dir string) (base, top, rw string) {
	t.Helper()
	bb := testutil.RequireBinary(t, "busybox")
	testutil.RequireBinary(t, "mkfs.erofs")
	testutil.RequireBinary(t, "mkfs.ext4")
	root := filepath.Join(dir, "base")
	for _, d := range []string{"bin", "proc", "sys", "dev", "etc", "tmp", "run"} {
		must(t, os.MkdirAll(filepath.Join(root, d), 0o755))
	}
	data, err := os.ReadFile(bb)
	must(t, err)
	must(t, os.WriteFile(filepath.Join(root, "bin/busybox"), data, 0o755))
	out, err := exec.Command(bb, "--list").Output()
	must(t, err)
	for _, applet := range strings.Fields(string(out)) {
		if applet != "busybox" {
			must(t, os.Symlink("busybox", filepath.Join(root, "bin", applet)))
		}
	}
	must(t, os.WriteFile(filepath.Join(root, "etc/layer"), []byte("base\n"), 0o644))
	topDir := filepath.Join(dir, "top")
	must(t, os.MkdirAll(filepath.Join(topDir, "etc"), 0o755))
	must(t, os.WriteFile(filepath.Join(topDir, "etc/layer"), []byte("top\n"), 0o644))

	base, top = filepath.Join(dir, "base.erofs"), filepath.Join(dir, "top.erofs")
	for src, img := range map[string]string{root: base, topDir: top} {
		if out, err := exec.Command("mkfs.erofs", img, src).CombinedOutput(); err != nil {
			t.Fatalf("mkfs.erofs: %v: %s", err, out)
		}
		padTo(t, img, vmm.PMEMAlignment)
	}
	return base, top, emptyExt4(t, dir)
}

// emptyExt4 makes dir/rw.ext4, an empty 128 MiB ext4 image: a container's writable layer.
func emptyExt4(t testing.TB, dir string) string {
	t.Helper()
	rw := filepath.Join(dir, "rw.ext4")
	must(t, os.WriteFile(rw, nil, 0o600))
	must(t, os.Truncate(rw, 128<<20))
	if out, err := exec.Command("mkfs.ext4", "-q", rw).CombinedOutput(); err != nil {
		t.Fatalf("mkfs.ext4: %v: %s", err, out)
	}
	return rw
}

func padTo(t testing.TB, path string, align int64) {
	st, err := os.Stat(path)
	must(t, err)
	if r := st.Size() % align; r != 0 {
		must(t, os.Truncate(path, st.Size()+align-r))
	}
}

func must(t testing.TB, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

func (g *guestVM) address(t testing.TB, id string) string {
	t.Helper()
	a, err := g.vm.Address(id)
	if err != nil {
		t.Fatal(err)
	}
	return string(a.PCIPath)
}

var _ = fmt.Sprintf

func execCommand(name string, args ...string) ([]byte, error) {
	return exec.Command(name, args...).CombinedOutput()
}
