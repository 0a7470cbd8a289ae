package qemu

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/containerd/errdefs"

	"github.com/caisson-containers/caisson/internal/testutil"
	"github.com/caisson-containers/caisson/shim/virtiofs"
	"github.com/caisson-containers/caisson/shim/vmm"
)

// TestAttachSharedFS: a virtio-fs device hot-plugged into a VM that started with shared
// memory and none (a QEMU, and a jailed one, which cannot reach the daemon's socket)
// serves the daemon's directory to the guest, which mounts it by its tag; a second one
// is AlreadyExists and a bad tag InvalidArgument. A VM whose memory is private is
// refused with FailedPrecondition.
func TestAttachSharedFS(t *testing.T) {
	g := newTestGuest(t)
	if _, err := os.Stat(virtiofs.DefaultBinary); err != nil {
		t.Skipf("needs %s (make deps)", virtiofs.DefaultBinary)
	}
	ctx := context.Background()
	private, err := New(vmm.Config{Kernel: g.kernel, Initramfs: g.initramfs, StateDir: testutil.ShortTempDir(t)}, Config{})
	if err != nil {
		t.Fatal(err)
	}
	if err := private.AttachSharedFS(ctx, vmm.SharedFS{Socket: "/nonexistent", Tag: "t"}); !errdefs.IsFailedPrecondition(err) {
		t.Fatalf("a VM of private memory: %v, want FailedPrecondition", err)
	}
	for _, tc := range []struct {
		name string
		qcfg Config
	}{{"plain", Config{}}, {"jailed", Config{Jail: testJail}}} {
		t.Run(tc.name, func(t *testing.T) {
			dir := testutil.ShortTempDir(t)
			d, err := virtiofs.Start(ctx, virtiofs.Config{Dir: filepath.Join(dir, "shared"), Socket: filepath.Join(dir, "fs.sock"), Log: filepath.Join(dir, "virtiofsd.log")})
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { d.Close(context.Background()) })
			if err := os.WriteFile(filepath.Join(dir, "shared", "f"), []byte("from the host"), 0o644); err != nil {
				t.Fatal(err)
			}
			vm := startVMWith(t, g, vmm.Config{SharedMemory: true, HotplugSlots: 1}, tc.qcfg)
			sh := dialGuest(t, vm.Endpoint(), bootTimeout)
			fs := vmm.SharedFS{Socket: filepath.Join(dir, "fs.sock"), Tag: "hostshare"}
			if err := vm.AttachSharedFS(ctx, vmm.SharedFS{Socket: fs.Socket, Tag: "a,b"}); !errdefs.IsInvalidArgument(err) {
				t.Fatalf("a bad tag: %v, want InvalidArgument", err)
			}
			if err := vm.AttachSharedFS(ctx, fs); err != nil {
				t.Fatal(err)
			}
			// The guest sees the device once its hot-plug interrupt is handled.
			var out string
			for end := time.Now().Add(20 * time.Second); ; time.Sleep(200 * time.Millisecond) {
				out, err = sh.run("mkdir -p /mnt/fs && mount -t virtiofs hostshare /mnt/fs && cat /mnt/fs/f", 10*time.Second)
				if err == nil || time.Now().After(end) {
					break
				}
			}
			if err != nil || strings.TrimSpace(out) != "from the host" {
				t.Fatalf("the hot-plugged shared file system in the guest: %q, %v", out, err)
			}
			if err := vm.AttachSharedFS(ctx, fs); !errors.Is(err, errdefs.ErrAlreadyExists) {
				t.Fatalf("a second shared file system: %v, want AlreadyExists", err)
			}
		})
	}
}
