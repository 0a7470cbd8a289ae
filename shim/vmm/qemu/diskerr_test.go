package qemu

import (
	"context"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/caisson-containers/caisson/shim/vmm"
)

// smallFS mounts a tmpfs of size bytes for the test and unmounts it at the end.
func smallFS(t *testing.T, size int) string {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "small")
	if err := os.Mkdir(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := syscall.Mount("tmpfs", dir, "tmpfs", 0, "size="+strconv.Itoa(size)); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := syscall.Unmount(dir, syscall.MNT_DETACH); err != nil {
			t.Errorf("unmount %s: %v", dir, err)
		}
	})
	return dir
}

// sparseFile creates a sparse file of size bytes.
func sparseFile(t *testing.T, path string, size int64) {
	t.Helper()
	if err := os.WriteFile(path, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(path, size); err != nil {
		t.Fatal(err)
	}
}

// queryStatus is QEMU's run state (running, paused, io-error, ...).
func queryStatus(t *testing.T, vm *VM) string {
	t.Helper()
	c, err := vm.running()
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), qmpTimeout)
	defer cancel()
	var st struct {
		Status string `json:"status"`
	}
	if err := c.Execute(ctx, "query-status", nil, &st); err != nil {
		t.Fatal(err)
	}
	return st.Status
}

// A writable disk whose file sits on a full host filesystem: the guest's writes fail
// with an I/O error, QEMU's BLOCK_IO_ERROR events are counted, and the VM keeps running
// and answering. Under QEMU's default (werror=enospc) the VM paused at the first write.
// A device that pauses the VM on errors all the same (werror=stop, plugged here by hand)
// is resumed by the shim, and its write completes once the host has space again.
func TestFullHostDisk(t *testing.T) {
	g := newTestGuest(t)
	fs := smallFS(t, 4<<20)
	img := filepath.Join(fs, "rw.img")
	sparseFile(t, img, 64<<20)
	// Room the second part frees.
	filler := filepath.Join(fs, "filler")
	if err := os.WriteFile(filler, make([]byte, 2<<20), 0o600); err != nil {
		t.Fatal(err)
	}
	vm := startVM(t, g, vmm.Config{Disks: []vmm.Disk{{ID: "rw", Path: img, Kind: vmm.Block}}, HotplugSlots: 1})
	sh := dialGuest(t, vm.Endpoint(), bootTimeout)
	addr, err := vm.Address("rw")
	if err != nil {
		t.Fatal(err)
	}
	dev := strings.TrimSpace(sh.must(t, "devat "+string(addr.PCIPath)))

	out, err := sh.run("dd if=/dev/zero of="+dev+" bs=1M count=16 conv=fsync", bootTimeout)
	if err == nil {
		t.Fatalf("writing 16 MiB to a disk on a 4 MiB host filesystem succeeded: %s", out)
	}
	t.Logf("guest write failed as it should: %v", err)
	if out := sh.must(t, "echo alive"); out != "alive\n" {
		t.Fatalf("guest answered %q after the disk error", out)
	}
	if st := queryStatus(t, vm); st != "running" {
		t.Fatalf("VM status %q after a disk error, want running", st)
	}
	for deadline := time.Now().Add(30 * time.Second); vm.DiskErrors() == 0; {
		if time.Now().After(deadline) {
			t.Fatal("no BLOCK_IO_ERROR counted")
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Logf("%d disk errors reported", vm.DiskErrors())

	t.Run("paused VM resumed", func(t *testing.T) {
		stopImg := filepath.Join(fs, "stop.img")
		sparseFile(t, stopImg, 16<<20)
		c, err := vm.running()
		if err != nil {
			t.Fatal(err)
		}
		st, err := os.Stat(stopImg)
		if err != nil {
			t.Fatal(err)
		}
		be, devArgs, addr := diskDevices(vmm.Disk{ID: "stop", Path: stopImg, Kind: vmm.Block}, 9, hotSlot(0), st.Size())
		devArgs["werror"] = "stop"
		ctx, cancel := context.WithTimeout(context.Background(), qmpTimeout)
		defer cancel()
		if err := c.Execute(ctx, be.command, be.args, nil); err != nil {
			t.Fatal(err)
		}
		if err := c.Execute(ctx, "device_add", devArgs, nil); err != nil {
			t.Fatal(err)
		}
		dev := strings.TrimSpace(sh.must(t, "devat "+string(addr.PCIPath)))
		// The write pauses the VM until there is room; the shell answers after.
		type result struct {
			out string
			err error
		}
		done := make(chan result, 1)
		go func() {
			out, err := sh.run("dd if=/dev/zero of="+dev+" bs=1M count=1 conv=fsync", 5*time.Minute)
			done <- result{out, err}
		}()
		for deadline := time.Now().Add(time.Minute); ; {
			vm.diskErrs.mu.Lock()
			paused := vm.diskErrs.pauses
			vm.diskErrs.mu.Unlock()
			if paused >= 2 {
				break // paused, resumed, paused again: the disk is still full
			}
			if time.Now().After(deadline) {
				t.Fatal("the VM did not pause twice on a werror=stop device of a full filesystem")
			}
			time.Sleep(50 * time.Millisecond)
		}
		if err := os.Remove(filler); err != nil {
			t.Fatal(err)
		}
		r := <-done
		if r.err != nil {
			t.Fatalf("write after the host freed space: %v", r.err)
		}
		if st := queryStatus(t, vm); st != "running" {
			t.Fatalf("VM status %q after space came back, want running", st)
		}
	})
}

// Disk errors are all counted; the log gets the first at once, then one line per
// diskErrorLogEvery for the same device (counting those in between), and at once for
// another device.
func TestDiskErrorsRateLimited(t *testing.T) {
	var d diskErrors
	t0 := time.Unix(1700000000, 0)
	blk0 := blockIOError{NodeName: "blk0-node", Operation: "write", Action: "report"}
	steps := []struct {
		ev           blockIOError
		n            uint64
		at           time.Duration
		wantUnlogged uint64 // after the step: 0 if it was logged
	}{
		{blk0, 1, 0, 0},
		{blk0, 3, time.Second, 3},
		{blk0, 1, 2 * time.Second, 4},
		{blk0, 1, diskErrorLogEvery + time.Second, 0},
		{blk0, 1, diskErrorLogEvery + 2*time.Second, 1},
		{blockIOError{NodeName: "blk1-node"}, 1, diskErrorLogEvery + 3*time.Second, 0},
	}
	var total uint64
	for i, s := range steps {
		d.record(s.ev, s.n, t0.Add(s.at))
		total += s.n
		if d.unlogged != s.wantUnlogged || d.total != total {
			t.Fatalf("step %d: %d unlogged, %d total; want %d, %d", i, d.unlogged, d.total, s.wantUnlogged, total)
		}
	}
}
