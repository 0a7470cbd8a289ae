package virtiofs

import (
	"context"
	"net"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"syscall"
	"testing"

	"github.com/containerd/errdefs"

	"github.com/caisson-containers/caisson/internal/testutil"
)

func startDaemon(t *testing.T) (*Daemon, string) {
	t.Helper()
	testutil.RequireRoot(t)
	if _, err := os.Stat(DefaultBinary); err != nil {
		t.Skipf("needs %s (make deps)", DefaultBinary)
	}
	dir := t.TempDir()
	d, err := Start(context.Background(), Config{Dir: filepath.Join(dir, "shared"), Socket: filepath.Join(dir, "fs.sock"), Log: filepath.Join(dir, "virtiofsd.log")})
	if err != nil {
		t.Fatal(err)
	}
	// virtiofsd sets up its sandbox once QEMU connects; a connection stands in for it.
	conn, err := net.Dial("unix", filepath.Join(dir, "fs.sock"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return d, dir
}

// TestShareAndClose: shares of a directory and a file show the host's content in the
// shared directory; a read-only share cannot be written even by root on the host side;
// Close stops virtiofsd and removes the shared directory, and every shared host path
// keeps its content.
func TestShareAndClose(t *testing.T) {
	d, dir := startDaemon(t)
	vol := filepath.Join(dir, "volume")
	os.MkdirAll(filepath.Join(vol, "sub"), 0o755)
	os.WriteFile(filepath.Join(vol, "sub", "data"), []byte("keep me"), 0o644)
	file := filepath.Join(dir, "config")
	os.WriteFile(file, []byte("a file"), 0o644)

	if _, err := d.Share("c1", "c1-0", vol, ReadWrite); err != nil {
		t.Fatal(err)
	}
	if _, err := d.Share("c1", "c1-1", file, ReadOnly); err != nil {
		t.Fatal(err)
	}
	shared := filepath.Join(dir, "shared")
	// The host sees empty placeholders, no mount; virtiofsd's namespace the shares.
	if mounted(t, dir) {
		t.Error("a share is mounted in the host's namespace")
	}
	if ents, _ := os.ReadDir(filepath.Join(shared, "c1-0")); len(ents) != 0 {
		t.Errorf("the host's placeholder holds %v", ents)
	}
	c10, c11 := sharePath(t, d, "c1-0"), sharePath(t, d, "c1-1")
	if b, err := os.ReadFile(filepath.Join(c10, "sub", "data")); err != nil || string(b) != "keep me" {
		t.Fatalf("shared directory content: %q, %v", b, err)
	}
	if err := os.WriteFile(filepath.Join(c10, "new"), []byte("written through"), 0o644); err != nil {
		t.Fatal(err)
	}
	if b, _ := os.ReadFile(filepath.Join(vol, "new")); string(b) != "written through" {
		t.Errorf("a write to the share did not reach the host path: %q", b)
	}
	if err := os.WriteFile(c11, []byte("no"), 0o644); !errorsIs(err, syscall.EROFS) {
		t.Errorf("write to a read-only share: %v, want EROFS", err)
	}

	select {
	case <-d.Done():
		t.Fatalf("virtiofsd exited: %v", d.Err())
	default:
	}
	if err := d.Close(context.Background()); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(shared); !os.IsNotExist(err) {
		t.Errorf("shared directory after Close: %v", err)
	}
	if _, err := os.Stat(filepath.Join(dir, "fs.sock")); !os.IsNotExist(err) {
		t.Errorf("socket after Close: %v", err)
	}
	for p, want := range map[string]string{filepath.Join(vol, "sub", "data"): "keep me", file: "a file", filepath.Join(vol, "new"): "written through"} {
		if b, err := os.ReadFile(p); err != nil || string(b) != want {
			t.Errorf("%s after Close: %q, %v; want %q", p, b, err, want)
		}
	}
	if mounted(t, dir) {
		t.Error("mounts left under the test directory")
	}
}

// TestUnmountProtectsSharedPaths: the cleanup of a pod whose shim died (Unmount, then
// the pod's state directory removed) never deletes a shared host path.
func TestUnmountProtectsSharedPaths(t *testing.T) {
	d, dir := startDaemon(t)
	vol := filepath.Join(dir, "volume")
	os.MkdirAll(vol, 0o755)
	os.WriteFile(filepath.Join(vol, "data"), []byte("precious"), 0o644)
	if _, err := d.Share("c1", "c1-0", vol, ReadWrite); err != nil {
		t.Fatal(err)
	}
	d.cmd.Process.Kill() // the shim "died": nobody calls Close
	<-d.Done()
	if err := Unmount(filepath.Join(dir, "shared")); err != nil {
		t.Fatal(err)
	}
	if err := os.RemoveAll(filepath.Join(dir, "shared")); err != nil {
		t.Fatal(err)
	}
	if b, err := os.ReadFile(filepath.Join(vol, "data")); err != nil || string(b) != "precious" {
		t.Fatalf("shared host path after the cleanup: %q, %v", b, err)
	}
	os.Remove(filepath.Join(dir, "fs.sock"))
}

func TestShareRejects(t *testing.T) {
	d, dir := startDaemon(t)
	defer d.Close(context.Background())
	sock := filepath.Join(dir, "a.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	fifo := filepath.Join(dir, "fifo")
	if err := syscall.Mkfifo(fifo, 0o600); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name, src, want string
		kind            func(error) bool
	}{
		{"missing", filepath.Join(dir, "nope"), "does not exist", errdefs.IsNotFound},
		{"socket", sock, "is a socket, which a VM cannot share", errdefs.IsInvalidArgument},
		{"fifo", fifo, "is a FIFO, which a VM cannot share", errdefs.IsInvalidArgument},
		{"char device", "/dev/null", "is a character device", errdefs.IsInvalidArgument},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := d.Share("c", "c-"+tc.name, tc.src, ReadWrite)
			if err == nil || !strings.Contains(err.Error(), tc.want) || !tc.kind(err) {
				t.Fatalf("Share(%s) = %v, want %q", tc.src, err, tc.want)
			}
			if _, err := os.Lstat(filepath.Join(dir, "shared", "c-"+tc.name)); !os.IsNotExist(err) {
				t.Errorf("a refused share left its target: %v", err)
			}
		})
	}
	if _, err := d.Share("c", "../escape", dir, ReadWrite); !errdefs.IsInvalidArgument(err) {
		t.Errorf("a name outside the shared directory: %v", err)
	}
}

// TestSharedPathStaysFree: a host path whose submount is shared can be unmounted and
// removed by the host while the share exists (the kubelet tearing down a volume, as
// critest does with runc's containers still running), since the host's namespace holds
// no mount of the share.
func TestSharedPathStaysFree(t *testing.T) {
	d, dir := startDaemon(t)
	defer d.Close(context.Background())
	vol, sub := volumeWithTmpfs(t, dir)
	os.WriteFile(filepath.Join(sub, "f"), []byte("on the tmpfs"), 0o644)
	if _, err := d.Share("c", "c-0", vol, ReadOnly); err != nil {
		t.Fatal(err)
	}
	if err := syscall.Unmount(sub, syscall.MNT_DETACH); err != nil {
		t.Fatal(err)
	}
	if err := os.RemoveAll(vol); err != nil {
		t.Fatalf("remove the shared host path while shared: %v", err)
	}
	// As with runc's container mounts, the kernel detached the share's copy of the
	// tmpfs with the directory it was on.
	if _, err := os.Stat(filepath.Join(sharePath(t, d, "c-0"), "tmpfs", "f")); !os.IsNotExist(err) {
		t.Errorf("the share after the host removed its path: %v", err)
	}
	if err := d.Unshare("c"); err != nil {
		t.Fatal(err)
	}
}

// volumeWithTmpfs makes dir/volume with a tmpfs mounted at its "tmpfs", unmounted
// when the test ends.
func volumeWithTmpfs(t *testing.T, dir string) (vol, sub string) {
	t.Helper()
	vol = filepath.Join(dir, "volume")
	sub = filepath.Join(vol, "tmpfs")
	if err := os.MkdirAll(sub, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := syscall.Mount("tmpfs", sub, "tmpfs", 0, "size=1m"); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { syscall.Unmount(sub, syscall.MNT_DETACH) })
	return vol, sub
}

// sharePath is where the test reaches a share: in virtiofsd's namespace.
func sharePath(t *testing.T, d *Daemon, name string) string {
	t.Helper()
	p, err := d.Path(name)
	if err != nil {
		t.Fatal(err)
	}
	return p
}

func mounted(t *testing.T, dir string) bool {
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	return strings.Contains(string(b), " "+dir)
}

func errorsIs(err error, target syscall.Errno) bool {
	var pe *os.PathError
	if e, ok := err.(*os.PathError); ok {
		pe = e
	}
	return pe != nil && pe.Err == target
}

// TestShareAccess: a host path with a tmpfs mounted below it, shared with each access:
// read-write leaves both writable; read-only makes the top read-only and leaves the
// tmpfs writable (a non-recursive "ro", as runc's); recursive read-only makes both
// read-only. The host path itself stays writable in every case.
func TestShareAccess(t *testing.T) {
	d, dir := startDaemon(t)
	defer d.Close(context.Background())
	vol, sub := volumeWithTmpfs(t, dir)

	for _, tc := range []struct {
		name         string
		access       Access
		topRO, subRO bool
	}{
		{"rw", ReadWrite, false, false},
		{"ro", ReadOnly, true, false},
		{"rro", RecursiveReadOnly, true, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			name := "c-" + tc.name
			subs, err := d.Share("c", name, vol, tc.access)
			if err != nil {
				t.Fatal(err)
			}
			// Only a non-recursive read-only share names its submounts: the
			// container mounts them again, writable as on the host.
			var want []Submount
			if tc.access == ReadOnly {
				want = []Submount{{Path: "tmpfs"}}
			}
			if !reflect.DeepEqual(subs, want) {
				t.Errorf("submounts %+v, want %+v", subs, want)
			}
			shared := sharePath(t, d, name)
			for _, w := range []struct {
				path string
				ro   bool
			}{{filepath.Join(shared, "top-"+tc.name), tc.topRO}, {filepath.Join(shared, "tmpfs", "sub-"+tc.name), tc.subRO}} {
				err := os.WriteFile(w.path, []byte("x"), 0o644)
				if w.ro && !errorsIs(err, syscall.EROFS) {
					t.Errorf("write %s: %v, want EROFS", w.path, err)
				}
				if !w.ro && err != nil {
					t.Errorf("write %s: %v, want it writable", w.path, err)
				}
			}
		})
	}
	if err := d.Unshare("c"); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(sub, "host"), []byte("x"), 0o644); err != nil {
		t.Errorf("the host's tmpfs after the shares: %v", err)
	}
}
