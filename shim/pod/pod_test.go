package pod

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/core/mount"

	"github.com/caisson-containers/caisson/internal/rootfs"
	"github.com/caisson-containers/caisson/internal/testutil"
	"github.com/caisson-containers/caisson/shim/config"
	"github.com/caisson-containers/caisson/shim/podid"
	"github.com/caisson-containers/caisson/shim/vmm"
	"github.com/caisson-containers/caisson/shim/vmm/hypervisor"
)

// qemuOf is the hypervisor the shim would give a pod of cfg.
func qemuOf(t testing.TB, cfg config.Config) vmm.Hypervisor {
	t.Helper()
	hv, err := hypervisor.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	return hv
}

// erofsLayer builds an EROFS layer holding one file, padded for virtio-pmem as the
// snapshotter pads layers.
func erofsLayer(t testing.TB, dir string) string {
	t.Helper()
	mkfs := testutil.RequireBinary(t, "mkfs.erofs")
	src := filepath.Join(dir, "src")
	if err := os.MkdirAll(src, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(src, "hello"), []byte("hello\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	img := filepath.Join(dir, "layer.erofs")
	if out, err := exec.Command(mkfs, img, src).CombinedOutput(); err != nil {
		t.Fatalf("mkfs.erofs: %v: %s", err, out)
	}
	if err := os.Truncate(img, vmm.PMEMAlignment); err != nil {
		t.Fatal(err)
	}
	return img
}

// rootfsPlan is a snapshotter's mounts for a container of one layer (docs/mounts.md, shape A).
func rootfsPlan(t testing.TB, layer, rw string) *rootfs.Plan {
	t.Helper()
	p, err := rootfs.Parse([]mount.Mount{
		{Type: "mkfs/ext4", Source: rw, Options: []string{"X-containerd.mkfs.fs=ext4", "X-containerd.mkfs.size=" + strconv.Itoa(64<<20), "rw", "loop"}},
		{Type: "erofs", Source: layer, Options: []string{"ro", "loop"}},
		{Type: "format/mkdir/overlay", Source: "overlay", Options: []string{
			"X-containerd.mkdir.path={{ mount 0 }}/upper:0755", "X-containerd.mkdir.path={{ mount 0 }}/work:0755",
			"upperdir={{ mount 0 }}/upper", "workdir={{ mount 0 }}/work", "lowerdir={{ mount 1 }}"}},
	})
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// holdsOpen reports whether process pid has the file path open.
func holdsOpen(t *testing.T, pid int, path string) bool {
	t.Helper()
	fds, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	if err != nil {
		t.Fatal(err)
	}
	for _, fd := range fds {
		if l, err := os.Readlink(fmt.Sprintf("/proc/%d/fd/%s", pid, fd.Name())); err == nil && l == path {
			return true
		}
	}
	return false
}

func qemuCmdline(t *testing.T, pid int) []byte {
	t.Helper()
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/cmdline")
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// TestBootDisks drives a pod whose first container's rootfs is known at start: the VM
// boots with those disks (on QEMU's command line, formatted first), the agent has
// mounted them when Start returns them as the first container's rootfs, a second
// container's writable disk is hot-plugged by AttachRootfs, and releasing both rootfs
// detaches what only they used. A boot disk the guest cannot mount fails Start
// and leaves nothing behind.
func TestBootDisks(t *testing.T) {
	testutil.RequireRoot(t)
	testutil.RequireBinary(t, "qemu-system-x86_64")
	testutil.RequireBinary(t, "mkfs.ext4")
	guest := testutil.RequireGuest(t)
	dir := t.TempDir()
	layer := erofsLayer(t, dir)
	cfg := config.Default(filepath.Dir(guest.Kernel))
	cfg.StateDir = testutil.ShortTempDir(t)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()

	t.Run("cold-plugged", func(t *testing.T) {
		plan := rootfsPlan(t, layer, filepath.Join(dir, "rw1.ext4"))
		stateDir := podid.StateDir(cfg.StateDir, "test", "cold")
		p, first, err := Start(ctx, cfg, Options{ID: "cold", StateDir: stateDir, Hostname: "cold", Rootfs: plan, Hypervisor: qemuOf(t, cfg)})
		if err != nil {
			t.Fatal(err)
		}
		defer p.Stop(context.Background())
		// Nothing is hot-plugged: what QEMU holds open now, it
		// was started with (a jailed QEMU gets its disks as descriptors, so its
		// command line names none).
		for _, f := range []string{layer, filepath.Join(dir, "rw1.ext4")} {
			if !holdsOpen(t, p.Pid(), f) {
				t.Errorf("QEMU did not start with boot disk %s", f)
			}
		}
		p.mu.Lock()
		n := len(p.storages)
		p.mu.Unlock()
		if n != 2 {
			t.Fatalf("%d storages mounted after Start, want the first container's 2", n)
		}

		rfs := first.Agent
		if rfs == nil {
			t.Fatal("Start returned no rootfs for the first container")
		}
		if len(rfs.Lower) != 1 || rfs.Upper == nil || rfs.Upper.StorageId == rfs.Lower[0].StorageId {
			t.Fatalf("rootfs %v: want one lower and an upper on another storage", rfs)
		}
		if p.storages[layer].refs != 1 {
			t.Errorf("layer has %d references, want 1", p.storages[layer].refs)
		}

		// A later container: the shared layer gets another reference, its own
		// writable image is hot-plugged.
		second := rootfsPlan(t, layer, filepath.Join(dir, "rw2.ext4"))
		attached, err := p.AttachRootfs(ctx, second)
		if err != nil {
			t.Fatal(err)
		}
		rfs2 := attached.Agent
		if rfs2.Lower[0].StorageId != rfs.Lower[0].StorageId {
			t.Errorf("the shared layer is storage %s for the second container, %s for the first", rfs2.Lower[0].StorageId, rfs.Lower[0].StorageId)
		}
		if _, err := p.vm.Address(storageID(filepath.Join(dir, "rw2.ext4"))); err != nil {
			t.Errorf("second writable disk: %v", err)
		}
		if err := attached.Release(ctx); err != nil {
			t.Fatal(err)
		}
		if err := first.Release(ctx); err != nil {
			t.Fatal(err)
		}
		// The writable disks were detached; the pmem layer stays parked (QEMU cannot unplug it).
		for _, f := range []string{"rw1.ext4", "rw2.ext4"} {
			if _, err := p.vm.Address(storageID(filepath.Join(dir, f))); err == nil {
				t.Errorf("%s still attached after its last release", f)
			}
		}
		if len(p.storages) != 0 {
			t.Errorf("storages left after every release: %v", p.storages)
		}
		if err := p.Stop(ctx); err != nil {
			t.Fatal(err)
		}
		if _, err := os.Stat(stateDir); !os.IsNotExist(err) {
			t.Errorf("state dir after Stop: %v", err)
		}
	})

	t.Run("unmountable", func(t *testing.T) {
		// Not EROFS: the guest cannot mount it, so Start fails and stops the VM.
		bad := filepath.Join(dir, "bad.erofs")
		if err := os.WriteFile(bad, bytes.Repeat([]byte{0xff}, 4096), 0o644); err != nil {
			t.Fatal(err)
		}
		if err := os.Truncate(bad, vmm.PMEMAlignment); err != nil {
			t.Fatal(err)
		}
		stateDir := podid.StateDir(cfg.StateDir, "test", "bad")
		p, _, err := Start(ctx, cfg, Options{ID: "bad", StateDir: stateDir, Hostname: "bad", Rootfs: rootfsPlan(t, bad, filepath.Join(dir, "rw3.ext4")), Hypervisor: qemuOf(t, cfg)})
		if err == nil {
			p.Stop(context.Background())
			t.Fatal("Start with an unmountable boot disk succeeded")
		}
		t.Logf("Start: %v", err)
		if _, err := os.Stat(stateDir); !os.IsNotExist(err) {
			t.Errorf("state dir after a failed Start: %v", err)
		}
		if out, _ := exec.Command("pgrep", "-f", stateDir).Output(); len(out) > 0 {
			t.Errorf("QEMU still running after a failed Start: pids %s", out)
		}
	})
}
