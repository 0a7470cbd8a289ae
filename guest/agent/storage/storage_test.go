package storage

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/containerd/errdefs"
	"golang.org/x/sys/unix"

	"github.com/caisson-containers/caisson/internal/testutil"
)

// loopDevice attaches file to a loop device for the test's lifetime.
func loopDevice(t *testing.T, file string, readOnly bool) string {
	t.Helper()
	args := []string{"--find", "--show"}
	if readOnly {
		args = append(args, "--read-only")
	}
	out, err := exec.Command("losetup", append(args, file)...).CombinedOutput()
	if err != nil {
		t.Fatalf("losetup: %v: %s", err, out)
	}
	dev := strings.TrimSpace(string(out))
	t.Cleanup(func() {
		if out, err := exec.Command("losetup", "-d", dev).CombinedOutput(); err != nil {
			t.Errorf("losetup -d %s: %v: %s", dev, err, out)
		}
	})
	return dev
}

func mkfs(t *testing.T, dir string) (erofs, ext4 string) {
	t.Helper()
	testutil.RequireBinary(t, "mkfs.erofs")
	testutil.RequireBinary(t, "mkfs.ext4")
	src := filepath.Join(dir, "src")
	if err := os.MkdirAll(filepath.Join(src, "etc"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(src, "etc", "layer"), []byte("lower\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	erofs = filepath.Join(dir, "layer.erofs")
	if out, err := exec.Command("mkfs.erofs", erofs, src).CombinedOutput(); err != nil {
		t.Fatalf("mkfs.erofs: %v: %s", err, out)
	}
	ext4 = filepath.Join(dir, "rw.ext4")
	if err := os.WriteFile(ext4, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(ext4, 64<<20); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("mkfs.ext4", "-q", ext4).CombinedOutput(); err != nil {
		t.Fatalf("mkfs.ext4: %v: %s", err, out)
	}
	return erofs, ext4
}

// fakeSys lays out a sysfs tree as the guest kernel does for a virtio-blk disk behind
// a PCIe root port, naming the host's loop device, and a disk with a serial.
func fakeSys(t *testing.T, pciDev, serialDev, serial string) string {
	t.Helper()
	sys := t.TempDir()
	must := func(err error) {
		if err != nil {
			t.Fatal(err)
		}
	}
	port := filepath.Join(sys, "devices/pci0000:00/0000:00:02.0")
	must(os.MkdirAll(filepath.Join(port, "0000:01:00.0/virtio3/block", filepath.Base(pciDev)), 0o755))
	must(os.MkdirAll(filepath.Join(sys, "bus/pci/devices"), 0o755))
	must(os.Symlink("../../../devices/pci0000:00/0000:00:02.0", filepath.Join(sys, "bus/pci/devices/0000:00:02.0")))
	must(os.MkdirAll(filepath.Join(sys, "block", filepath.Base(serialDev)), 0o755))
	must(os.WriteFile(filepath.Join(sys, "block", filepath.Base(serialDev), "serial"), []byte(serial+"\n"), 0o444))
	// Every block device has /sys/block/NAME/size (512-byte sectors); 0 until the disk is live.
	for _, dev := range []string{pciDev, serialDev} {
		must(os.MkdirAll(filepath.Join(sys, "block", filepath.Base(dev)), 0o755))
		must(os.WriteFile(filepath.Join(sys, "block", filepath.Base(dev), "size"), []byte("2048\n"), 0o444))
	}
	return sys
}

// loopDisk is a 1 MiB loop device, read-only, and a fake sysfs naming it with serial.
func loopDisk(t *testing.T, serial string) (dev, sys string) {
	t.Helper()
	testutil.RequireRoot(t)
	img := filepath.Join(t.TempDir(), "disk.img")
	if err := os.WriteFile(img, make([]byte, 1<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	dev = loopDevice(t, img, true)
	return dev, fakeSys(t, dev, dev, serial)
}

// A disk whose node exists but which is not live yet (size 0) is waited for, not mounted.
func TestFindWaitsForALiveDisk(t *testing.T) {
	dev, sys := loopDisk(t, "late")
	size := filepath.Join(sys, "block", filepath.Base(dev), "size")
	os.WriteFile(size, []byte("0\n"), 0o444)
	f := Finder{Sys: sys, Dev: "/dev", Poll: 10 * time.Millisecond}
	found := make(chan error, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_, err := f.Find(ctx, Device{Serial: "late"})
		found <- err
	}()
	select {
	case err := <-found:
		t.Fatalf("Find returned for a disk that is not live yet: %v", err)
	case <-time.After(200 * time.Millisecond):
	}
	os.WriteFile(size, []byte("2048\n"), 0o444)
	if err := <-found; err != nil {
		t.Fatal(err)
	}
}

// With Uevents, a disk that is not there yet is looked for again when the kernel
// announces a block device: the fallback is an hour here, so only the event (the
// "change" the test makes the kernel send for the loop device) can wake Find in time.
func TestFindWakesOnBlockEvent(t *testing.T) {
	dev, sys := loopDisk(t, "other")
	serial := filepath.Join(sys, "block", filepath.Base(dev), "serial")
	f := Finder{Sys: sys, Dev: "/dev", Poll: time.Hour, Uevents: true, UeventFallback: time.Hour}
	found := make(chan error, 1)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	go func() {
		node, err := f.Find(ctx, Device{Serial: "late"})
		if err == nil && node != dev {
			err = fmt.Errorf("found %s, want %s", node, dev)
		}
		found <- err
	}()
	select {
	case err := <-found:
		t.Fatalf("Find returned for a disk that is not there: %v", err)
	case <-time.After(200 * time.Millisecond): // Find has looked once, and waits
	}
	// The disk "appears" (its serial), and the kernel announces a block device until
	// Find returns.
	if err := os.WriteFile(serial, []byte("late\n"), 0o444); err != nil {
		t.Fatal(err)
	}
	event := filepath.Join("/sys/class/block", filepath.Base(dev), "uevent")
	for {
		if err := os.WriteFile(event, []byte("change"), 0); err != nil {
			t.Fatal(err)
		}
		select {
		case err := <-found:
			if err != nil {
				t.Fatal(err)
			}
			return
		case <-time.After(100 * time.Millisecond):
		}
	}
}

func TestMountAndRootfs(t *testing.T) {
	testutil.RequireRoot(t)
	testutil.RequireBinary(t, "losetup")
	dir := t.TempDir()
	erofsImg, ext4Img := mkfs(t, dir)
	lowerDev := loopDevice(t, erofsImg, true)
	rwDev := loopDevice(t, ext4Img, false)
	finder := Finder{Sys: fakeSys(t, lowerDev, rwDev, "caisson-rw"), Dev: "/dev", Poll: 10 * time.Millisecond}
	m, err := NewManager(filepath.Join(dir, "storage"), finder)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()

	lowerReq := Request{ID: "layer1", Device: Device{PCIPath: "02.0/00.0"}, Fstype: EROFS, Options: []string{"ro"}}
	lower, dev, err := m.Mount(ctx, lowerReq)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = unix.Unmount(lower, unix.MNT_DETACH) })
	if dev != lowerDev {
		t.Errorf("device %s, want %s", dev, lowerDev)
	}
	if _, _, err := m.Mount(ctx, lowerReq); !errdefs.IsAlreadyExists(err) {
		t.Fatalf("second mount of the same storage: %v, want AlreadyExists", err)
	}
	rw, _, err := m.Mount(ctx, Request{ID: "rw", Device: Device{Serial: "caisson-rw"}, Fstype: Ext4, Options: []string{"rw", "loop"}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = unix.Unmount(rw, unix.MNT_DETACH) })

	target := filepath.Join(dir, "rootfs")
	r := Rootfs{
		Lower: []Dir{{Storage: "layer1"}},
		Upper: &Dir{Storage: "rw", Path: "upper"},
		Work:  &Dir{Storage: "rw", Path: "work"},
	}
	mr, err := m.MountRootfs(ctx, target, r)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = unix.Unmount(target, unix.MNT_DETACH) })
	if b, err := os.ReadFile(filepath.Join(target, "etc/layer")); err != nil || string(b) != "lower\n" {
		t.Fatalf("lower file through the overlay: %q, %v", b, err)
	}
	if err := os.WriteFile(filepath.Join(target, "etc/new"), []byte("upper\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if b, err := os.ReadFile(filepath.Join(rw, "upper/etc/new")); err != nil || string(b) != "upper\n" {
		t.Fatalf("write did not land in the writable layer: %q, %v", b, err)
	}
	if err := m.Unmount(ctx, "layer1"); !errdefs.IsFailedPrecondition(err) {
		t.Fatalf("unmount of a storage a rootfs uses: %v, want FailedPrecondition", err)
	}
	if err := m.UnmountRootfs(ctx, mr); err != nil {
		t.Fatal(err)
	}

	// A tmpfs upper layer: writes land in it, not in any storage, and go with the rootfs.
	tmpfsTarget := filepath.Join(dir, "pause")
	for _, bad := range []Rootfs{
		{TmpfsUpper: true},
		{Lower: []Dir{{Storage: "layer1"}}, Upper: &Dir{Storage: "rw", Path: "u"}, Work: &Dir{Storage: "rw", Path: "w"}, TmpfsUpper: true},
	} {
		if _, err := m.MountRootfs(ctx, tmpfsTarget, bad); !errdefs.IsInvalidArgument(err) {
			t.Errorf("MountRootfs(%+v): %v, want InvalidArgument", bad, err)
		}
	}
	mr, err = m.MountRootfs(ctx, tmpfsTarget, Rootfs{Lower: []Dir{{Storage: "layer1"}}, TmpfsUpper: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = unix.Unmount(tmpfsTarget, unix.MNT_DETACH)
		_ = unix.Unmount(tmpfsTarget+".upper", unix.MNT_DETACH)
	})
	if b, err := os.ReadFile(filepath.Join(tmpfsTarget, "etc/layer")); err != nil || string(b) != "lower\n" {
		t.Fatalf("lower file through the tmpfs-upper overlay: %q, %v", b, err)
	}
	if err := os.WriteFile(filepath.Join(tmpfsTarget, "etc/pause"), []byte("tmpfs\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if b, err := os.ReadFile(filepath.Join(tmpfsTarget+".upper", "upper/etc/pause")); err != nil || string(b) != "tmpfs\n" {
		t.Fatalf("write did not land in the tmpfs upper layer: %q, %v", b, err)
	}
	if _, err := os.Stat(filepath.Join(rw, "upper/etc/pause")); !os.IsNotExist(err) {
		t.Errorf("the tmpfs-upper rootfs wrote to the writable storage: %v", err)
	}
	if err := m.UnmountRootfs(ctx, mr); err != nil {
		t.Fatal(err)
	}
	for _, p := range []string{tmpfsTarget, tmpfsTarget + ".upper"} {
		if _, err := os.Stat(p); !os.IsNotExist(err) {
			t.Errorf("%s left after UnmountRootfs: %v", p, err)
		}
	}

	for _, id := range []string{"layer1", "rw"} {
		if err := m.Unmount(ctx, id); err != nil {
			t.Fatal(err)
		}
	}
	if err := m.Unmount(ctx, "rw"); !errdefs.IsNotFound(err) {
		t.Errorf("unmount of an unmounted storage: %v, want NotFound", err)
	}
	mounts, _ := os.ReadFile("/proc/self/mounts")
	if strings.Contains(string(mounts), dir) {
		t.Errorf("mounts left under %s", dir)
	}
}

func TestMountErrors(t *testing.T) {
	testutil.RequireRoot(t)
	testutil.RequireBinary(t, "losetup")
	dir := t.TempDir()
	corrupt := filepath.Join(dir, "corrupt.erofs")
	if err := os.WriteFile(corrupt, make([]byte, 1<<20), 0o600); err != nil {
		t.Fatal(err)
	}
	dev := loopDevice(t, corrupt, true)
	finder := Finder{Sys: fakeSys(t, dev, dev, "corrupt"), Dev: "/dev", Poll: 10 * time.Millisecond}
	m, err := NewManager(filepath.Join(dir, "storage"), finder)
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name string
		req  Request
		want func(error) bool
	}{
		{"missing device", Request{ID: "a", Device: Device{PCIPath: "09.0/00.0"}, Fstype: EROFS, Options: []string{"ro"}}, errdefs.IsNotFound},
		{"missing serial", Request{ID: "a", Device: Device{Serial: "nope"}, Fstype: EROFS, Options: []string{"ro"}}, errdefs.IsNotFound},
		{"corrupt image", Request{ID: "a", Device: Device{Serial: "corrupt"}, Fstype: EROFS}, errdefs.IsInvalidArgument},
		{"bad pci path", Request{ID: "a", Device: Device{PCIPath: "0000:00:02.0"}, Fstype: EROFS, Options: []string{"ro"}}, errdefs.IsInvalidArgument},
		{"unknown fstype", Request{ID: "a", Device: Device{Serial: "corrupt"}, Fstype: "xfs"}, errdefs.IsInvalidArgument},
		{"bad id", Request{ID: "../a", Device: Device{Serial: "corrupt"}, Fstype: EROFS, Options: []string{"ro"}}, errdefs.IsInvalidArgument},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
			defer cancel()
			_, _, err := m.Mount(ctx, tc.req)
			if !tc.want(err) {
				t.Fatalf("err = %v", err)
			}
			t.Log(err)
		})
	}
	if _, err := m.Path("a"); !errdefs.IsNotFound(err) {
		t.Errorf("a failed mount left storage a: %v", err)
	}
}
