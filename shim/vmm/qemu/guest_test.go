package qemu

// Test scaffolding: a tiny guest (busybox, a shell /init, the virtio and pmem modules)
// whose init serves a line-oriented shell on the agent's virtio-serial port, and the host
// side of that shell. The real guest image is built under guest/; this one only lets the
// VMM's tests look at the guest from the inside.

import (
	"bufio"
	"bytes"
	"context"
	"debug/elf"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/caisson-containers/caisson/guest/initramfs"
	"github.com/caisson-containers/caisson/internal/testutil"
	"github.com/caisson-containers/caisson/shim/vmm"
)

// initReady is printed on the console once the test init has loaded its modules.
const initReady = "CAISSON-TEST-INIT-READY"

// testInit is the guest's /init. Each line read from the agent port is evaluated and
// its output followed by "\n__END__ <status>\n". Its helpers resolve a vmm.PCIPath in sysfs.
const testInit = `#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in $(cat /lib/modules/order); do insmod /lib/modules/$m.ko || echo "insmod $m failed"; done

# pcidev PATH: the sysfs directory of the device at a vmm.PCIPath like 08.1/00.0.
pcidev() {
	local d=/sys/devices/pci0000:00 h n
	for h in $(echo "$1" | tr / ' '); do
		n=$(ls -d $d/0000:??:$h 2>/dev/null | head -n1)
		[ -n "$n" ] || return 1
		d=$n
	done
	echo $d
}
# devat PATH: waits up to 10 s for the block device (virtio-blk or pmem) at PATH.
devat() {
	local i d b
	for i in $(seq 1 100); do
		if d=$(pcidev "$1"); then
			b=$(ls -d $d/virtio*/block/* $d/virtio*/ndbus*/region*/namespace*/block/* 2>/dev/null | head -n1)
			b=${b##*/}
			if [ -n "$b" ] && [ -e /dev/$b ]; then echo /dev/$b; return 0; fi
		fi
		sleep 0.1
	done
	return 1
}
# gone PATH: waits up to 10 s for the device at PATH to disappear.
gone() {
	local i
	for i in $(seq 1 100); do pcidev "$1" >/dev/null || return 0; sleep 0.1; done
	return 1
}

for d in /sys/class/virtio-ports/*; do
	[ "$(cat $d/name)" = org.caisson.agent.0 ] && port=/dev/${d##*/}
done
echo ` + initReady + ` port=$port
exec 3<>$port
# read returns at once while no host end is connected: poll.
while :; do
	while read -r cmd <&3; do eval "$cmd" >&3 2>&1 </dev/null; printf '\n__END__ %d\n' $? >&3; done
	sleep 0.1
done
`

// guestModules are the modules the test guest loads, with their dependencies.
var guestModules = []string{"virtio_pci", "virtio_console", "virtio_blk", "virtio_pmem", "nd_pmem", "erofs", "virtio_balloon", "virtio_net", "virtiofs"}

// testGuest is a kernel and the test initramfs.
type testGuest struct {
	// kernel is the vmlinux pods boot (QEMU starts it through its PVH entry); bzImage is
	// the same kernel as the package ships it, which QEMU boots through its setup code.
	kernel, bzImage, initramfs string
}

// newTestGuest skips t unless it runs as root with QEMU and the guest kernel, and returns
// the test initramfs, built once per test binary (TestMain removes it).
func newTestGuest(t testing.TB) testGuest {
	t.Helper()
	testutil.RequireRoot(t)
	testutil.RequireBinary(t, defaultBinary)
	out := filepath.Join(testutil.RepoRoot(t), "_output", "guest")
	root := filepath.Join(out, "kernel")
	kernel, bzImage := filepath.Join(out, "vmlinux"), filepath.Join(root, "vmlinuz")
	mods, _ := filepath.Glob(filepath.Join(root, "root", "lib", "modules", "*"))
	for _, k := range []string{kernel, bzImage} {
		if _, err := os.Stat(k); err != nil || len(mods) != 1 {
			t.Skipf("needs the guest kernel (%s) and its modules in %s (run `make guest`)", k, root)
		}
	}
	busybox := "/bin/busybox"
	if _, err := os.Stat(busybox); err != nil {
		t.Skip("needs busybox-static at /bin/busybox")
	}
	testInitramfs.once.Do(func() {
		dir, err := os.MkdirTemp("", "vmm-initramfs")
		if err != nil {
			testInitramfs.err = err
			return
		}
		testInitramfs.dir = dir
		testInitramfs.path = filepath.Join(dir, "initramfs.cpio.lz4")
		testInitramfs.err = buildInitramfs(testInitramfs.path, busybox, mods[0])
	})
	if testInitramfs.err != nil {
		t.Fatal(testInitramfs.err)
	}
	return testGuest{kernel: kernel, bzImage: bzImage, initramfs: testInitramfs.path}
}

// testInitramfs is the test guest's initramfs, shared by the tests of one binary.
var testInitramfs struct {
	once      sync.Once
	dir, path string
	err       error
}

func TestMain(m *testing.M) {
	code := m.Run()
	if testInitramfs.dir != "" {
		os.RemoveAll(testInitramfs.dir)
	}
	os.Exit(code)
}

// buildInitramfs writes the test initramfs with the guest's own archive writer.
func buildInitramfs(out, busybox, modDir string) error {
	order, files, err := moduleClosure(modDir, guestModules)
	if err != nil {
		return err
	}
	a := initramfs.NewArchive()
	for _, d := range []string{"bin", "dev", "lib/modules", "proc", "sys", "mnt", "tmp"} {
		if err := a.Dir(d, 0o755); err != nil {
			return err
		}
	}
	if err := errors.Join(
		a.File("init", 0o755, []byte(testInit)),
		a.CopyFile("bin/busybox", 0o755, busybox),
		a.File("lib/modules/order", 0o644, []byte(strings.Join(order, "\n")+"\n")),
	); err != nil {
		return err
	}
	for _, m := range order {
		if err := a.CopyFile("lib/modules/"+m+".ko", 0o644, files[m]); err != nil {
			return err
		}
	}
	f, err := os.Create(out)
	if err != nil {
		return err
	}
	if _, err := a.WriteTo(f); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

// moduleClosure returns want and the modules they depend on, dependencies first, read from
// each module's .modinfo "depends=", and their files. (The guest image uses modules.dep,
// which `make guest` computes; the unpacked kernel is all these tests need.)
func moduleClosure(modDir string, want []string) ([]string, map[string]string, error) {
	files := map[string]string{}
	err := filepath.WalkDir(filepath.Join(modDir, "kernel"), func(p string, _ os.DirEntry, err error) error {
		if err == nil && strings.HasSuffix(p, ".ko") {
			files[strings.ReplaceAll(strings.TrimSuffix(filepath.Base(p), ".ko"), "-", "_")] = p
		}
		return err
	})
	if err != nil {
		return nil, nil, err
	}
	var order []string
	state := map[string]int{} // 1 visiting, 2 done
	var visit func(m string) error
	visit = func(m string) error {
		switch state[m] {
		case 1:
			return fmt.Errorf("module dependency cycle at %s", m)
		case 2:
			return nil
		}
		state[m] = 1
		p, ok := files[m]
		if !ok {
			return fmt.Errorf("module %s not found in %s", m, modDir)
		}
		deps, err := moduleDepends(p)
		if err != nil {
			return err
		}
		for _, d := range deps {
			if err := visit(d); err != nil {
				return err
			}
		}
		state[m] = 2
		order = append(order, m)
		return nil
	}
	for _, m := range want {
		if err := visit(m); err != nil {
			return nil, nil, err
		}
	}
	return order, files, nil
}

func moduleDepends(path string) ([]string, error) {
	f, err := elf.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	s := f.Section(".modinfo")
	if s == nil {
		return nil, fmt.Errorf("%s: no .modinfo", path)
	}
	b, err := s.Data()
	if err != nil {
		return nil, err
	}
	for _, kv := range bytes.Split(b, []byte{0}) {
		if v, ok := bytes.CutPrefix(kv, []byte("depends=")); ok {
			if len(v) == 0 {
				return nil, nil
			}
			return strings.Split(strings.ReplaceAll(string(v), "-", "_"), ","), nil
		}
	}
	return nil, nil
}

// guestShell is the host end of the test init's shell on the agent port.
type guestShell struct {
	conn net.Conn
	r    *bufio.Reader
}

// dialGuest connects to the agent socket and waits until the guest shell answers.
func dialGuest(t testing.TB, ep vmm.Endpoint, timeout time.Duration) *guestShell {
	t.Helper()
	conn, err := net.Dial("unix", ep.Path)
	if err != nil {
		t.Fatalf("agent socket: %v", err)
	}
	t.Cleanup(func() { conn.Close() })
	g := &guestShell{conn: conn, r: bufio.NewReader(conn)}
	if out, err := g.run("echo up", timeout); err != nil || out != "up\n" {
		t.Fatalf("guest shell did not answer: %q %v", out, err)
	}
	return g
}

// run executes cmd (one line) in the guest and returns its output; a non-zero status is
// an error that quotes the output.
func (g *guestShell) run(cmd string, timeout time.Duration) (string, error) {
	g.conn.SetDeadline(time.Now().Add(timeout))
	defer g.conn.SetDeadline(time.Time{})
	if _, err := io.WriteString(g.conn, cmd+"\n"); err != nil {
		return "", err
	}
	var out strings.Builder
	for {
		line, err := g.r.ReadString('\n')
		if err != nil {
			return out.String(), fmt.Errorf("guest %q: %w (output %q)", cmd, err, out.String())
		}
		if status, ok := strings.CutPrefix(line, "__END__ "); ok {
			res := strings.TrimSuffix(out.String(), "\n") // the separator
			if n, _ := strconv.Atoi(strings.TrimSpace(status)); n != 0 {
				return res, fmt.Errorf("guest %q: status %d: %s", cmd, n, res)
			}
			return res, nil
		}
		out.WriteString(line)
	}
}

// must runs cmd in the guest, failing t on error.
func (g *guestShell) must(t testing.TB, cmd string) string {
	t.Helper()
	out, err := g.run(cmd, 60*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// erofsImage makes an EROFS image of files (name -> content), padded to pad bytes.
func erofsImage(t testing.TB, files map[string]string, pad int64) string {
	t.Helper()
	mkfs := testutil.RequireBinary(t, "mkfs.erofs")
	dir := t.TempDir()
	src := filepath.Join(dir, "src")
	for name, content := range files {
		p := filepath.Join(src, name)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	img := filepath.Join(dir, "layer.erofs")
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if out, err := exec.CommandContext(ctx, mkfs, "--quiet", "-Enoinline_data", img, src).CombinedOutput(); err != nil {
		t.Fatalf("mkfs.erofs: %v: %s", err, out)
	}
	if pad > 0 {
		st, err := os.Stat(img)
		if err != nil {
			t.Fatal(err)
		}
		if err := os.Truncate(img, (st.Size()+pad-1)/pad*pad); err != nil {
			t.Fatal(err)
		}
	}
	return img
}
