package qemu

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/containerd/errdefs"

	"github.com/caisson-containers/caisson/internal/testutil"
	"github.com/caisson-containers/caisson/shim/vmm"
)

// bootTimeout bounds a TCG boot on a busy 2-core machine; it is a hang guard, not a
// measurement.
const bootTimeout = 2 * time.Minute

// startVM starts a TCG VM on the test guest and registers its Stop.
func startVM(t testing.TB, g testGuest, cfg vmm.Config) *VM {
	t.Helper()
	return startVMWith(t, g, cfg, Config{})
}

// startVMWith is startVM with QEMU's own configuration (a jail).
func startVMWith(t testing.TB, g testGuest, cfg vmm.Config, qcfg Config) *VM {
	t.Helper()
	cfg.Kernel = g.kernel
	cfg.Initramfs = g.initramfs
	cfg.Accelerator = "tcg"
	if cfg.StateDir == "" {
		cfg.StateDir = testutil.ShortTempDir(t)
	}
	vm, err := New(cfg, qcfg)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), bootTimeout)
	defer cancel()
	if err := vm.Start(ctx); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := vm.Stop(context.Background()); err != nil {
			t.Errorf("stop: %v", err)
		}
	})
	return vm
}

// processGone reports whether pid no longer exists (or is a zombie nobody will reap).
func processGone(pid int) bool {
	return syscall.Kill(pid, 0) == syscall.ESRCH
}

// stateFiles lists the state dir.
func stateFiles(t testing.TB, dir string) []string {
	t.Helper()
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, e := range ents {
		names = append(names, e.Name())
	}
	return names
}

// TestVM boots one VM and drives, from inside the guest, its console, its agent channel,
// and a cold-plugged, a hot-plugged block and a hot-plugged pmem disk, then stops it.
func TestVM(t *testing.T) {
	g := newTestGuest(t)
	cold := erofsImage(t, map[string]string{"id": "cold layer\n"}, vmm.PMEMAlignment)
	hot := erofsImage(t, map[string]string{"dir/id": "hot layer\n"}, 0)
	pmem := erofsImage(t, map[string]string{"id": "pmem layer\n"}, vmm.PMEMAlignment)
	unaligned := filepath.Join(t.TempDir(), "unaligned")
	if err := os.WriteFile(unaligned, make([]byte, vmm.PMEMAlignment+4096), 0o644); err != nil {
		t.Fatal(err)
	}

	stateDir := testutil.ShortTempDir(t)
	vm := startVM(t, g, vmm.Config{
		StateDir: stateDir,
		Disks: []vmm.Disk{
			{ID: "cold", Path: cold, ReadOnly: true, Kind: vmm.Block},
			{ID: "cold-pmem", Path: cold, ReadOnly: true, Kind: vmm.PMEM},
		},
		HotplugSlots: bridgeSlots + 1, // two bridges: filling every slot crosses into the second
	})
	pid := vm.Pid()
	if pid == 0 {
		t.Fatal("no pid")
	}
	sh := dialGuest(t, vm.Endpoint(), bootTimeout)
	ctx := context.Background()

	t.Run("confinement", func(t *testing.T) {
		status, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
		if err != nil {
			t.Fatal(err)
		}
		if !strings.Contains(string(status), "\nSeccomp:\t2\n") {
			t.Errorf("qemu is not under a seccomp filter:\n%s", status)
		}
		env, err := os.ReadFile(fmt.Sprintf("/proc/%d/environ", pid))
		if err != nil {
			t.Fatal(err)
		}
		if len(env) != 0 {
			t.Errorf("qemu has an environment: %q", env)
		}
		if pgid, err := syscall.Getpgid(pid); err != nil || pgid != pid {
			t.Errorf("qemu's process group is %d (%v), want its own (%d)", pgid, err, pid)
		}
	})

	t.Run("console", func(t *testing.T) {
		b, err := os.ReadFile(filepath.Join(stateDir, "console.log"))
		if err != nil {
			t.Fatal(err)
		}
		if !strings.Contains(string(b), initReady) {
			t.Fatalf("console log lacks %q:\n%s", initReady, b)
		}
		if strings.Contains(string(b), "insmod") {
			t.Fatalf("a module failed to load:\n%s", b)
		}
	})

	t.Run("agent channel", func(t *testing.T) {
		// Host to guest: a long random line, hashed in the guest.
		buf := make([]byte, 2000)
		rand.Read(buf)
		token := hex.EncodeToString(buf)
		got := sh.must(t, "printf %s "+token+" | wc -c")
		if strings.TrimSpace(got) != fmt.Sprint(len(token)) {
			t.Fatalf("guest received %s bytes, want %d", got, len(token))
		}
		got = sh.must(t, "echo "+token)
		if got != token+"\n" {
			t.Fatalf("echo of %d bytes came back as %d bytes", len(token)+1, len(got))
		}
		// Guest to host: 1 MiB.
		got = sh.must(t, "yes caisson | head -c 1048576")
		if want := strings.Repeat("caisson\n", 1<<20/8); got != want {
			t.Fatalf("got %d bytes from the guest, want %d", len(got), len(want))
		}
	})

	t.Run("vCPU time", func(t *testing.T) {
		before, err := vm.VCPUTime()
		if err != nil || before <= 0 {
			t.Fatalf("VCPUTime = %v, %v after the boot", before, err)
		}
		sh.must(t, "i=0; while [ $i -lt 20000 ]; do i=$((i+1)); done")
		after, err := vm.VCPUTime()
		if err != nil || after <= before {
			t.Fatalf("VCPUTime = %v, %v after the guest worked, %v before", after, err, before)
		}
		// The vCPU threads, not QEMU's main loop and helpers.
		all, err := allThreadsTime(pid)
		if err != nil {
			t.Fatal(err)
		}
		if after >= all {
			t.Errorf("VCPUTime %v, QEMU's threads together %v: want the vCPUs' alone", after, all)
		}
	})

	t.Run("cold block", func(t *testing.T) {
		addr, err := vm.Address("cold")
		if err != nil {
			t.Fatal(err)
		}
		checkBlock(t, sh, addr, "cold layer\n", "id")
	})

	t.Run("hot block", func(t *testing.T) {
		addr, err := vm.AttachDisk(ctx, vmm.Disk{ID: "hot", Path: hot, ReadOnly: true, Kind: vmm.Block})
		if err != nil {
			t.Fatal(err)
		}
		if addr.PCIPath != hotSlot(0).pciPath {
			t.Fatalf("first hot-plugged disk at %s, want the first bridge slot %s", addr.PCIPath, hotSlot(0).pciPath)
		}
		checkBlock(t, sh, addr, "hot layer\n", "dir/id")
		// The bridge got the memory windows it asked the firmware for, and no I/O window:
		// its windows are lines 14-16 of sysfs's resource file (start, end, flags).
		br := strings.TrimSpace(sh.must(t, "pcidev "+addr.PCIPath.Hops()[0]))
		windows := strings.Split(strings.TrimSpace(sh.must(t, "head -n 16 "+br+"/resource | tail -n 3")), "\n")
		var sizes []uint64
		for _, w := range windows {
			var start, end, flags uint64
			if _, err := fmt.Sscan(w, &start, &end, &flags); err != nil {
				t.Fatalf("bridge window %q: %v", w, err)
			}
			if end > start {
				sizes = append(sizes, end-start+1)
			} else {
				sizes = append(sizes, 0)
			}
		}
		if len(sizes) != 3 || sizes[0] != 0 || sizes[1] < 2<<20 || sizes[2] < 2<<20 {
			t.Fatalf("bridge windows (I/O, memory, prefetchable) %q", windows)
		}
		dev := strings.TrimPrefix(strings.TrimSpace(sh.must(t, "devat "+string(addr.PCIPath))), "/dev/")
		if ro := sh.must(t, "cat /sys/block/"+dev+"/ro"); ro != "1\n" {
			t.Fatalf("read-only disk %s has ro=%q", dev, ro)
		}
		sh.must(t, "umount /mnt")
		if err := vm.DetachDisk(ctx, "hot"); err != nil {
			t.Fatal(err)
		}
		sh.must(t, "gone "+string(addr.PCIPath))
		if _, err := vm.Address("hot"); !errdefs.IsNotFound(err) {
			t.Fatalf("address of a detached disk: %v", err)
		}
		// The slot is free again.
		addr2, err := vm.AttachDisk(ctx, vmm.Disk{ID: "hot-again", Path: hot, ReadOnly: true, Kind: vmm.Block})
		if err != nil {
			t.Fatal(err)
		}
		dev2 := strings.TrimSpace(sh.must(t, "devat "+string(addr2.PCIPath)))
		if err := vm.DetachDisk(ctx, "hot-again"); err != nil {
			t.Fatal(err)
		}
		sh.must(t, "gone "+string(addr2.PCIPath)+" && ! test -e "+dev2)
	})

	t.Run("hot block read-write", func(t *testing.T) {
		mkfs := testutil.RequireBinary(t, "mkfs.ext4")
		debugfs := testutil.RequireBinary(t, "debugfs")
		img := filepath.Join(t.TempDir(), "rw.ext4")
		if err := os.WriteFile(img, nil, 0o644); err != nil {
			t.Fatal(err)
		}
		if err := os.Truncate(img, 64<<20); err != nil {
			t.Fatal(err)
		}
		if out, err := exec.Command(mkfs, "-q", "-F", img).CombinedOutput(); err != nil {
			t.Fatalf("mkfs.ext4: %v: %s", err, out)
		}
		addr, err := vm.AttachDisk(ctx, vmm.Disk{ID: "rw", Path: img, Kind: vmm.Block})
		if err != nil {
			t.Fatal(err)
		}
		dev := strings.TrimSpace(sh.must(t, "devat "+string(addr.PCIPath)))
		sh.must(t, "mount -t ext4 "+dev+" /mnt && echo written-in-guest > /mnt/f && umount /mnt")
		if err := vm.DetachDisk(ctx, "rw"); err != nil {
			t.Fatal(err)
		}
		out, err := exec.Command(debugfs, "-R", "cat /f", img).Output()
		if err != nil || string(out) != "written-in-guest\n" {
			t.Fatalf("host reads %q from the image (%v)", out, err)
		}
	})

	t.Run("guest ejects a disk", func(t *testing.T) {
		addr, err := vm.AttachDisk(ctx, vmm.Disk{ID: "eject", Path: hot, ReadOnly: true, Kind: vmm.Block})
		if err != nil {
			t.Fatal(err)
		}
		dev := fmt.Sprintf("blk%d", vm.nextDev-1)
		node := dev + "-node"
		// Power off the slot from the guest, as a guest may without asking.
		sh.must(t, "d=$(pcidev "+string(addr.PCIPath)+") && b=$(basename $d) && "+
			"for s in /sys/bus/pci/slots/*; do [ $(cat $s/address) = ${b%.*} ] && echo 0 > $s/power; done; gone "+string(addr.PCIPath))
		// Let QEMU's DEVICE_DELETED reach the VM before DetachDisk.
		for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(10 * time.Millisecond) {
			vm.mu.Lock()
			ejected := vm.ejected[dev]
			vm.mu.Unlock()
			if ejected {
				break
			}
			if time.Now().After(deadline) {
				t.Fatal("no DEVICE_DELETED after the guest powered the slot off")
			}
		}
		if !hasBlockNode(t, vm, node) {
			t.Fatalf("backend %s gone before DetachDisk", node)
		}
		if err := vm.DetachDisk(ctx, "eject"); err != nil {
			t.Fatal(err)
		}
		if hasBlockNode(t, vm, node) {
			t.Fatalf("backend %s still there after DetachDisk", node)
		}
	})

	t.Run("detach cold", func(t *testing.T) {
		addr, _ := vm.Address("cold")
		sh.must(t, "umount /mnt")
		if err := vm.DetachDisk(ctx, "cold"); err != nil {
			t.Fatal(err)
		}
		sh.must(t, "gone "+string(addr.PCIPath))
	})

	t.Run("cold pmem", func(t *testing.T) {
		addr, err := vm.Address("cold-pmem")
		if err != nil {
			t.Fatal(err)
		}
		checkPMEM(t, sh, addr, "cold layer\n")
	})

	t.Run("hot pmem", func(t *testing.T) {
		addr, err := vm.AttachDisk(ctx, vmm.Disk{ID: "pmem", Path: pmem, ReadOnly: true, Kind: vmm.PMEM})
		if err != nil {
			t.Fatal(err)
		}
		if addr.Serial != "" {
			t.Fatalf("pmem disk has a serial %q", addr.Serial)
		}
		checkPMEM(t, sh, addr, "pmem layer\n")
		// A read-only pmem device cannot change the host file, whatever the guest writes.
		before, err := os.ReadFile(pmem)
		if err != nil {
			t.Fatal(err)
		}
		dev := strings.TrimSpace(sh.must(t, "devat "+string(addr.PCIPath)))
		out, _ := sh.run("dd if=/dev/urandom of="+dev+" bs=4096 count=16 conv=fsync 2>&1", time.Minute)
		t.Logf("guest writes to %s: %s", dev, strings.TrimSpace(out))
		after, err := os.ReadFile(pmem)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(before, after) {
			t.Fatal("the guest changed a read-only pmem file")
		}
		sh.must(t, "echo 3 > /proc/sys/vm/drop_caches")
		checkPMEM(t, sh, addr, "pmem layer\n")
		// QEMU 7.2 cannot unplug virtio-pmem.
		err = vm.DetachDisk(ctx, "pmem")
		if err == nil {
			sh.must(t, "gone "+string(addr.PCIPath))
			return
		}
		if !errdefs.IsNotImplemented(err) {
			t.Fatalf("detach pmem: %v", err)
		}
		t.Logf("detach pmem: %v", err)
		// The parked device serves the same file again, under a new id.
		again, err := vm.AttachDisk(ctx, vmm.Disk{ID: "pmem-again", Path: pmem, ReadOnly: true, Kind: vmm.PMEM})
		if err != nil {
			t.Fatal(err)
		}
		if again != addr {
			t.Fatalf("re-attach got %+v, want the parked device at %+v", again, addr)
		}
		checkPMEM(t, sh, again, "pmem layer\n")
	})

	t.Run("errors", func(t *testing.T) {
		if _, err := vm.AttachDisk(ctx, vmm.Disk{ID: "dup", Path: hot, ReadOnly: true, Kind: vmm.Block}); err != nil {
			t.Fatal(err)
		}
		for _, tc := range []struct {
			name string
			disk vmm.Disk
			is   func(error) bool
		}{
			{"pmem of a wrong size", vmm.Disk{ID: "bad", Path: unaligned, ReadOnly: true, Kind: vmm.PMEM}, errdefs.IsInvalidArgument},
			{"missing file", vmm.Disk{ID: "bad", Path: unaligned + ".missing", Kind: vmm.Block}, errdefs.IsNotFound},
			{"no id", vmm.Disk{Path: hot, Kind: vmm.Block}, errdefs.IsInvalidArgument},
			{"duplicate id", vmm.Disk{ID: "dup", Path: hot, Kind: vmm.Block}, errdefs.IsAlreadyExists},
		} {
			t.Run(tc.name, func(t *testing.T) {
				_, err := vm.AttachDisk(ctx, tc.disk)
				if !tc.is(err) {
					t.Fatalf("got %v", err)
				}
				t.Log(err)
			})
		}
		if err := vm.DetachDisk(ctx, "dup"); err != nil {
			t.Fatal(err)
		}
		if err := vm.DetachDisk(ctx, "unknown"); !errdefs.IsNotFound(err) {
			t.Fatalf("detach of an unknown id: %v", err)
		}
		// Fill every slot, then one more.
		var ids []string
		for i := 0; ; i++ {
			id := fmt.Sprint("fill", i)
			_, err := vm.AttachDisk(ctx, vmm.Disk{ID: id, Path: hot, ReadOnly: true, Kind: vmm.Block})
			if errdefs.IsResourceExhausted(err) {
				t.Log(err)
				break
			}
			if err != nil || i > MaxHotplugSlots {
				t.Fatalf("attach %s: %v", id, err)
			}
			ids = append(ids, id)
		}
		for _, id := range ids {
			if err := vm.DetachDisk(ctx, id); err != nil {
				t.Fatal(err)
			}
		}
	})

	if err := vm.Stop(ctx); err != nil {
		t.Fatal(err)
	}
	if err := vm.Wait(); err != nil {
		t.Fatalf("Wait after Stop: %v", err)
	}
	if !processGone(pid) {
		t.Fatalf("qemu (pid %d) still exists after Stop", pid)
	}
	if files := stateFiles(t, stateDir); len(files) != 1 || files[0] != "console.log" {
		t.Fatalf("state dir after Stop holds %v, want only console.log", files)
	}
	if err := vm.Stop(ctx); err != nil {
		t.Fatalf("second Stop: %v", err)
	}
}

// checkBlock finds the virtio-blk disk at addr in the guest, checks its serial, and
// mounts it on /mnt to read file.
func checkBlock(t *testing.T, sh *guestShell, addr vmm.DiskAddress, want, file string) {
	t.Helper()
	dev := strings.TrimSpace(sh.must(t, "devat "+string(addr.PCIPath)))
	if !strings.HasPrefix(dev, "/dev/vd") {
		t.Fatalf("device at %s is %q, want /dev/vdX", addr.PCIPath, dev)
	}
	if serial := sh.must(t, "cat /sys/block/"+strings.TrimPrefix(dev, "/dev/")+"/serial"); serial != addr.Serial {
		t.Fatalf("serial of %s is %q, want %q", dev, serial, addr.Serial)
	}
	sh.must(t, "mount -t erofs -o ro "+dev+" /mnt")
	if got := sh.must(t, "cat /mnt/"+file); got != want {
		t.Fatalf("read %q from %s, want %q", got, dev, want)
	}
}

// checkPMEM finds the pmem device at addr in the guest and mounts it with DAX to read /id.
func checkPMEM(t *testing.T, sh *guestShell, addr vmm.DiskAddress, want string) {
	t.Helper()
	dev := strings.TrimSpace(sh.must(t, "devat "+string(addr.PCIPath)))
	if !strings.HasPrefix(dev, "/dev/pmem") {
		t.Fatalf("device at %s is %s, want /dev/pmemN", addr.PCIPath, dev)
	}
	sh.must(t, "mount -t erofs -o ro,dax=always "+dev+" /mnt")
	if got := sh.must(t, "cat /mnt/id"); got != want {
		t.Fatalf("read %q from %s, want %q", got, dev, want)
	}
	sh.must(t, "grep -E '^"+dev+" /mnt erofs .*dax=always' /proc/mounts")
	sh.must(t, "umount /mnt")
}

// TestKilled kills QEMU with SIGKILL: Done closes and Wait says so.
func TestKilled(t *testing.T) {
	g := newTestGuest(t)
	stateDir := testutil.ShortTempDir(t)
	vm := startVM(t, g, vmm.Config{StateDir: stateDir})
	pid := vm.Pid()
	if _, err := vm.VCPUTime(); err != nil { // its files are kept open from now
		t.Fatal(err)
	}
	start := time.Now()
	if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	select {
	case <-vm.Done():
	case <-time.After(30 * time.Second):
		t.Fatal("Done not closed 30 s after QEMU was killed")
	}
	t.Logf("Done closed %v after SIGKILL", time.Since(start))
	err := vm.Wait()
	var ee *vmm.ExitError
	if !errors.As(err, &ee) || !strings.Contains(ee.Reason, "killed by signal 9") {
		t.Fatalf("Wait: %v, want an ExitError saying qemu was killed", err)
	}
	t.Log(err)
	if _, err := vm.AttachDisk(context.Background(), vmm.Disk{ID: "x", Path: g.kernel}); !errdefs.IsFailedPrecondition(err) {
		t.Fatalf("attach after death: %v", err)
	}
	if _, err := vm.VCPUTime(); !errdefs.IsFailedPrecondition(err) {
		t.Fatalf("VCPUTime after death: %v", err)
	}
	if vm.vcpus.files != nil {
		t.Fatal("the vCPU threads' files are still open after the VM's end")
	}
	if err := vm.Stop(context.Background()); err != nil {
		t.Fatal(err)
	}
	if err := vm.Wait(); !errors.As(err, &ee) {
		t.Fatalf("Stop after death changed Wait to %v", err)
	}
	if files := stateFiles(t, stateDir); len(files) != 1 || files[0] != "console.log" {
		t.Fatalf("state dir after Stop holds %v, want only console.log", files)
	}
}

// TestGuestEnds: the guest powering off, or its kernel panicking, ends the VM with a
// reason saying so.
func TestGuestEnds(t *testing.T) {
	g := newTestGuest(t)
	for _, tc := range []struct {
		name, cmd, reason string
	}{
		{"power off", "poweroff -f", "the guest powered off"},
		{"panic", "echo c > /proc/sysrq-trigger", "panicked"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			vm := startVM(t, g, vmm.Config{})
			sh := dialGuest(t, vm.Endpoint(), bootTimeout)
			sh.conn.Write([]byte(tc.cmd + "\n"))
			select {
			case <-vm.Done():
			case <-time.After(bootTimeout):
				t.Fatalf("VM still running after %q", tc.cmd)
			}
			err := vm.Wait()
			var ee *vmm.ExitError
			if !errors.As(err, &ee) || !strings.Contains(ee.Reason, tc.reason) {
				t.Fatalf("Wait: %v, want an ExitError saying %q", err, tc.reason)
			}
			t.Log(err)
		})
	}
}

func TestStartErrors(t *testing.T) {
	g := newTestGuest(t)
	garbage := filepath.Join(t.TempDir(), "garbage")
	if err := os.WriteFile(garbage, []byte("not a kernel"), 0o644); err != nil {
		t.Fatal(err)
	}
	unaligned := filepath.Join(t.TempDir(), "unaligned")
	if err := os.WriteFile(unaligned, make([]byte, 4096), 0o644); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name    string
		cfg     vmm.Config
		is      func(error) bool
		mention string
	}{
		{
			name: "missing kernel",
			cfg:  vmm.Config{Kernel: garbage + ".missing"},
			is:   errdefs.IsNotFound, mention: "kernel",
		},
		{
			name:    "not a kernel",
			cfg:     vmm.Config{Kernel: garbage},
			is:      func(err error) bool { return err != nil },
			mention: "qemu exited with status 1",
		},
		{
			name: "cold pmem of a wrong size",
			cfg:  vmm.Config{Kernel: g.kernel, Disks: []vmm.Disk{{ID: "l", Path: unaligned, ReadOnly: true, Kind: vmm.PMEM}}},
			is:   errdefs.IsInvalidArgument, mention: "2 MiB",
		},
		{
			name: "missing initramfs",
			cfg:  vmm.Config{Kernel: g.kernel, Initramfs: garbage + ".missing"},
			is:   errdefs.IsNotFound, mention: "initramfs",
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := tc.cfg
			cfg.StateDir = testutil.ShortTempDir(t)
			cfg.Accelerator = "tcg"
			vm, err := New(cfg, Config{})
			if err != nil {
				t.Fatal(err)
			}
			err = vm.Start(context.Background())
			if !tc.is(err) || !strings.Contains(err.Error(), tc.mention) {
				t.Fatalf("Start: %v, want an error mentioning %q", err, tc.mention)
			}
			t.Log(err)
			if pid := vm.Pid(); pid != 0 && !processGone(pid) {
				t.Fatalf("qemu (pid %d) left running", pid)
			}
			select {
			case <-vm.Done():
			default:
				t.Fatal("Done not closed after a failed Start")
			}
			if err := vm.Wait(); err == nil {
				t.Fatal("Wait after a failed Start: nil")
			}
			if err := vm.Start(context.Background()); !errdefs.IsFailedPrecondition(err) {
				t.Fatalf("second Start: %v", err)
			}
			for _, f := range stateFiles(t, cfg.StateDir) {
				if f != "console.log" {
					t.Fatalf("Start left %s in the state dir", f)
				}
			}
		})
	}
}

func TestNewErrors(t *testing.T) {
	for _, tc := range []struct {
		name string
		cfg  vmm.Config
	}{
		{"no state dir", vmm.Config{Kernel: "k"}},
		{"no kernel", vmm.Config{StateDir: "/tmp/x"}},
		{"bad accelerator", vmm.Config{Kernel: "k", StateDir: "/tmp/x", Accelerator: "hvf"}},
		{"bad transport", vmm.Config{Kernel: "k", StateDir: "/tmp/x", Agent: vmm.AgentChannel{Transport: "tcp"}}},
		{"vsock cid 2", vmm.Config{Kernel: "k", StateDir: "/tmp/x", Agent: vmm.AgentChannel{Transport: vmm.TransportVsock, CID: 2}}},
		{"max memory below memory", vmm.Config{Kernel: "k", StateDir: "/tmp/x", MemoryMiB: 1024, MaxMemoryMiB: 512}},
		{"too many disks", vmm.Config{Kernel: "k", StateDir: "/tmp/x", HotplugSlots: MaxHotplugSlots + 1}},
		{"state dir too long", vmm.Config{Kernel: "k", StateDir: "/" + strings.Repeat("x", 120)}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if _, err := New(tc.cfg, Config{}); !errdefs.IsInvalidArgument(err) {
				t.Fatalf("got %v, want ErrInvalidArgument", err)
			}
		})
	}
}

// TestDetachWaitsForGuest pauses the guest so that it cannot release an unplugged device:
// DetachDisk gives up when its context ends, a retry after the guest resumes completes,
// and Stop ends a DetachDisk that is still waiting.
func TestDetachWaitsForGuest(t *testing.T) {
	g := newTestGuest(t)
	img := erofsImage(t, map[string]string{"id": "x\n"}, 0)
	vm := startVM(t, g, vmm.Config{Disks: []vmm.Disk{
		{ID: "a", Path: img, ReadOnly: true, Kind: vmm.Block},
		{ID: "b", Path: img, ReadOnly: true, Kind: vmm.Block},
	}})
	sh := dialGuest(t, vm.Endpoint(), bootTimeout)
	addrA, _ := vm.Address("a")
	sh.must(t, "devat "+string(addrA.PCIPath))
	ctx := context.Background()
	if err := vm.qmp.Execute(ctx, "stop", nil, nil); err != nil {
		t.Fatal(err)
	}

	short, cancel := context.WithTimeout(ctx, time.Second)
	err := vm.DetachDisk(short, "a")
	cancel()
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("detach from a paused guest: %v, want a deadline error", err)
	}
	if !hasBlockNode(t, vm, "blk0-node") {
		t.Fatal("the backend was removed before the guest released the device")
	}
	if err := vm.qmp.Execute(ctx, "cont", nil, nil); err != nil {
		t.Fatal(err)
	}
	if err := vm.DetachDisk(ctx, "a"); err != nil {
		t.Fatalf("retry: %v", err)
	}
	sh.must(t, "gone "+string(addrA.PCIPath))
	if hasBlockNode(t, vm, "blk0-node") {
		t.Fatal("the backend is still there after DetachDisk")
	}

	if err := vm.qmp.Execute(ctx, "stop", nil, nil); err != nil {
		t.Fatal(err)
	}
	detached := make(chan error, 1)
	go func() { detached <- vm.DetachDisk(ctx, "b") }()
	time.Sleep(500 * time.Millisecond) // let it wait for the guest
	if err := vm.Stop(ctx); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-detached:
		if !errdefs.IsFailedPrecondition(err) {
			t.Fatalf("detach during Stop: %v", err)
		}
		t.Log(err)
	case <-time.After(30 * time.Second):
		t.Fatal("DetachDisk still waiting after Stop")
	}
}

// TestVsockNeedsVhost: without /dev/vhost-vsock, a vsock VM fails to start with QEMU's
// reason; with it, the VM starts.
func TestVsockNeedsVhost(t *testing.T) {
	g := newTestGuest(t)
	dir := testutil.ShortTempDir(t)
	vm, err := New(vmm.Config{
		Kernel: g.kernel, Initramfs: g.initramfs, Accelerator: "tcg", StateDir: dir,
		Agent: vmm.AgentChannel{Transport: vmm.TransportVsock, CID: 1234},
	}, Config{})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	err = vm.Start(ctx)
	defer vm.Stop(ctx)
	if _, statErr := os.Stat("/dev/vhost-vsock"); statErr != nil {
		if err == nil || !strings.Contains(err.Error(), "vhost-vsock") {
			t.Fatalf("Start without /dev/vhost-vsock: %v, want QEMU's vhost-vsock error", err)
		}
		t.Log(err)
		return
	}
	if err != nil {
		t.Fatal(err)
	}
	if ep := vm.Endpoint(); ep.Transport != vmm.TransportVsock || ep.CID != 1234 {
		t.Fatalf("endpoint %+v", ep)
	}
}

// TestShimDeathKillsQEMU starts a VM from a child process standing for the shim, kills
// that process with SIGKILL, and checks that QEMU dies with it (Pdeathsig).
func TestShimDeathKillsQEMU(t *testing.T) {
	if dir := os.Getenv("CAISSON_TEST_SHIM_STATE"); dir != "" {
		// The child: start a VM, say its pid, and wait to be killed.
		var qcfg Config
		if os.Getenv("CAISSON_TEST_SHIM_JAIL") != "" {
			qcfg.Jail = testJail
		}
		vm, err := New(vmm.Config{
			Kernel: os.Getenv("CAISSON_TEST_SHIM_KERNEL"), Initramfs: os.Getenv("CAISSON_TEST_SHIM_INITRAMFS"),
			Accelerator: "tcg", StateDir: dir,
		}, qcfg)
		if err != nil {
			t.Fatal(err)
		}
		if err := vm.Start(context.Background()); err != nil {
			t.Fatal(err)
		}
		fmt.Printf("qemu-pid=%d\n", vm.Pid())
		time.Sleep(time.Minute)
		vm.Stop(context.Background())
		t.Fatal("not killed")
	}
	g := newTestGuest(t)
	// A jailed QEMU too: its change of user cleared the parent-death signal, which the
	// jail sets again.
	for _, jailed := range []bool{false, true} {
		t.Run(fmt.Sprintf("jailed=%v", jailed), func(t *testing.T) { shimDeathKillsQEMU(t, g, jailed) })
	}
}

func shimDeathKillsQEMU(t *testing.T, g testGuest, jailed bool) {
	cmd := exec.Command(os.Args[0], "-test.run=^TestShimDeathKillsQEMU$", "-test.v")
	cmd.Env = append(os.Environ(),
		"CAISSON_TEST_SHIM_STATE="+testutil.ShortTempDir(t),
		"CAISSON_TEST_SHIM_KERNEL="+g.kernel,
		"CAISSON_TEST_SHIM_INITRAMFS="+g.initramfs,
	)
	if jailed {
		cmd.Env = append(cmd.Env, "CAISSON_TEST_SHIM_JAIL=1")
	}
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	pid := 0
	sc := bufio.NewScanner(out)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), "qemu-pid="); ok {
			pid, _ = strconv.Atoi(v)
			break
		}
	}
	if pid == 0 {
		t.Fatalf("the child shim did not start a VM: %v", sc.Err())
	}
	t.Cleanup(func() { syscall.Kill(pid, syscall.SIGKILL) }) // if the test fails
	if err := cmd.Process.Kill(); err != nil {
		t.Fatal(err)
	}
	cmd.Wait()
	// QEMU is the child's child: once it is killed, init reaps it.
	deadline := time.Now().Add(30 * time.Second)
	for !processGone(pid) {
		if time.Now().After(deadline) {
			t.Fatalf("qemu (pid %d) outlived its shim", pid)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestStopCanceledContext: Stop with a context that is already over still kills QEMU
// and removes its files.
func TestStopCanceledContext(t *testing.T) {
	g := newTestGuest(t)
	dir := testutil.ShortTempDir(t)
	vm := startVM(t, g, vmm.Config{StateDir: dir})
	pid := vm.Pid()
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := vm.Stop(ctx); err != nil {
		t.Fatal(err)
	}
	if !processGone(pid) {
		t.Fatalf("qemu (pid %d) still exists after Stop", pid)
	}
	if files := stateFiles(t, dir); len(files) > 1 || (len(files) == 1 && files[0] != "console.log") {
		t.Fatalf("state dir after Stop holds %v", files)
	}
}

// hasBlockNode asks QEMU whether a block node exists.
func hasBlockNode(t *testing.T, vm *VM, name string) bool {
	t.Helper()
	var nodes []struct {
		NodeName string `json:"node-name"`
	}
	if err := vm.qmp.Execute(context.Background(), "query-named-block-nodes", nil, &nodes); err != nil {
		t.Fatal(err)
	}
	for _, n := range nodes {
		if n.NodeName == name {
			return true
		}
	}
	return false
}
