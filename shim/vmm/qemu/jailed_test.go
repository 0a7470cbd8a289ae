package qemu

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/caisson-containers/caisson/internal/testutil"
	"github.com/caisson-containers/caisson/shim/vmm"
)

// testJail is the user a jailed test QEMU runs as: no account has it.
var testJail = &Jail{UID: 61234, GID: 61234}

// A jailed QEMU runs as the jail's user with no capabilities and no_new_privs, in a
// mount namespace of its own where a host file outside its own is out of reach (asked
// over QMP to open it, it fails), and still boots, serves its sockets and reads and
// writes its disks, cold- and hot-plugged, Block and PMEM, from 0600 root files.
func TestJailed(t *testing.T) {
	g := newTestGuest(t)
	cold := erofsImage(t, map[string]string{"id": "cold layer\n"}, vmm.PMEMAlignment)
	hot := erofsImage(t, map[string]string{"dir/id": "hot layer\n"}, 0)
	hotPMEM := erofsImage(t, map[string]string{"id": "hot pmem layer\n"}, vmm.PMEMAlignment)
	rw := filepath.Join(t.TempDir(), "rw.img")
	sparseFile(t, rw, 16<<20)
	for _, f := range []string{cold, hot, hotPMEM, rw} {
		if err := os.Chmod(f, 0o600); err != nil { // as the snapshotter makes them
			t.Fatal(err)
		}
	}
	planted := filepath.Join(t.TempDir(), "planted")
	if err := os.WriteFile(planted, []byte("host secret"), 0o644); err != nil {
		t.Fatal(err)
	}

	stateDir := testutil.ShortTempDir(t)
	// Registered first, so it runs after the VM's Stop.
	t.Cleanup(func() {
		if files := stateFiles(t, stateDir); len(files) != 1 || files[0] != "console.log" {
			t.Errorf("state dir after Stop holds %v, want only console.log", files)
		}
	})
	vm := startVMWith(t, g, vmm.Config{
		StateDir: stateDir,
		Disks: []vmm.Disk{
			{ID: "cold", Path: cold, ReadOnly: true, Kind: vmm.Block},
			{ID: "cold-pmem", Path: cold, ReadOnly: true, Kind: vmm.PMEM},
			{ID: "rw", Path: rw, Kind: vmm.Block},
		},
		HotplugSlots: 2,
	}, Config{Jail: testJail})
	ctx, cancel := context.WithTimeout(context.Background(), bootTimeout)
	defer cancel()
	pid := vm.Pid()
	sh := dialGuest(t, vm.Endpoint(), bootTimeout)

	t.Run("confinement", func(t *testing.T) {
		status, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
		if err != nil {
			t.Fatal(err)
		}
		for _, want := range []string{
			"\nUid:\t61234\t61234\t61234\t61234\n", "\nGid:\t61234\t61234\t61234\t61234\n",
			"\nCapPrm:\t0000000000000000\n", "\nCapEff:\t0000000000000000\n", "\nCapBnd:\t0000000000000000\n",
			"\nNoNewPrivs:\t1\n", "\nSeccomp:\t2\n",
		} {
			if !strings.Contains(string(status), want) {
				t.Errorf("qemu's status lacks %q:\n%s", strings.TrimSpace(want), status)
			}
		}
		if !strings.HasPrefix(string(status), "Name:\tqemu-system-x86") {
			t.Errorf("pid %d is not qemu:\n%s", pid, status)
		}
		for _, kind := range []string{"mnt", "pid", "net"} {
			host, _ := os.Readlink("/proc/self/ns/" + kind)
			if ns, err := os.Readlink(fmt.Sprintf("/proc/%d/ns/%s", pid, kind)); err != nil || ns == host {
				t.Errorf("qemu's %s namespace %s (%v), the host's %s", kind, ns, err, host)
			}
		}
		// What QEMU sees from its root: what it was given.
		if _, err := os.Stat(fmt.Sprintf("/proc/%d/root%s", pid, planted)); !os.IsNotExist(err) {
			t.Errorf("the planted file is in qemu's mount namespace: %v", err)
		}
		// QEMU itself, asked to open the planted file, cannot.
		c, err := vm.running()
		if err != nil {
			t.Fatal(err)
		}
		err = c.Execute(ctx, "blockdev-add", map[string]any{
			"driver": "raw", "node-name": "planted", "read-only": true,
			"file": map[string]any{"driver": "file", "filename": planted, "read-only": true},
		}, nil)
		if err == nil || !strings.Contains(err.Error(), "No such file") {
			t.Errorf("qemu opening a host file outside its jail: %v, want No such file", err)
		}
	})

	t.Run("cold disks", func(t *testing.T) {
		addr, err := vm.Address("cold")
		if err != nil {
			t.Fatal(err)
		}
		checkBlock(t, sh, addr, "cold layer\n", "id")
		sh.must(t, "umount /mnt")
		if addr, err = vm.Address("cold-pmem"); err != nil {
			t.Fatal(err)
		}
		checkPMEM(t, sh, addr, "cold layer\n")
		if addr, err = vm.Address("rw"); err != nil {
			t.Fatal(err)
		}
		dev := strings.TrimSpace(sh.must(t, "devat "+string(addr.PCIPath)))
		sh.must(t, "echo written-by-the-guest | dd of="+dev+" conv=fsync 2>/dev/null")
		b := make([]byte, 21)
		f, err := os.Open(rw)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		if _, err := f.ReadAt(b, 0); err != nil || string(b) != "written-by-the-guest\n" {
			t.Fatalf("the host reads %q (%v) from the writable disk", b, err)
		}
	})

	t.Run("hot disks", func(t *testing.T) {
		addr, err := vm.AttachDisk(ctx, vmm.Disk{ID: "hot", Path: hot, ReadOnly: true, Kind: vmm.Block})
		if err != nil {
			t.Fatal(err)
		}
		checkBlock(t, sh, addr, "hot layer\n", "dir/id")
		sh.must(t, "umount /mnt")
		if err := vm.DetachDisk(ctx, "hot"); err != nil {
			t.Fatal(err)
		}
		sh.must(t, "gone "+string(addr.PCIPath))
		if addr, err = vm.AttachDisk(ctx, vmm.Disk{ID: "hot-pmem", Path: hotPMEM, ReadOnly: true, Kind: vmm.PMEM}); err != nil {
			t.Fatal(err)
		}
		checkPMEM(t, sh, addr, "hot pmem layer\n")
		// QEMU holds no descriptor of the detached disk's file any more.
		fds, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
		if err != nil {
			t.Fatal(err)
		}
		for _, fd := range fds {
			if target, _ := os.Readlink(fmt.Sprintf("/proc/%d/fd/%s", pid, fd.Name())); target == hot {
				t.Errorf("qemu still holds %s as fd %s after detach", hot, fd.Name())
			}
		}
	})
}
