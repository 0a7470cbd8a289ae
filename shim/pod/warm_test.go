package pod

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/caisson-containers/caisson/internal/testutil"
	"github.com/caisson-containers/caisson/shim/config"
	"github.com/caisson-containers/caisson/shim/internal/fakevm"
	"github.com/caisson-containers/caisson/shim/podid"
	"github.com/caisson-containers/caisson/shim/virtiofs"
	"github.com/caisson-containers/caisson/shim/vmm"
)

// recordingCgroup records the pids added to it and its removals; the first failRemoves
// removals fail.
type recordingCgroup struct {
	mu          sync.Mutex
	pids        []int
	removed     int
	failRemoves int
}

func (c *recordingCgroup) Add(pid int) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.pids = append(c.pids, pid)
	return nil
}

func (c *recordingCgroup) Remove(context.Context) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.failRemoves > 0 {
		c.failRemoves--
		return errors.New("cgroup busy")
	}
	c.removed++
	return nil
}

// TestWarmOnFakeVMM: a pod started while a booted warm VM is held (PrepareWarm, Hold)
// starts in it if its VM would have the warm VM's shape: no VM is made, the pod's disks
// are hot-plugged (the warm VM has two hot-plug slots more than the configuration's, for
// the NIC and virtio-fs device a booted pod has cold-plugged), the pod's state names the
// warm VM's, and Stop removes both. A pod whose
// VM would differ (its kernel parameters) ends the warm VM and boots one of its own. A
// warm VM that refuses the pod's virtio-fs device is ended too, and the pod boots with a
// new virtiofsd, the first one gone (it may have lost its one connection with the VM).
func TestWarmOnFakeVMM(t *testing.T) {
	ctx := context.Background()
	base := fakeConfig(t)
	files(t, filepath.Dir(base.Guest.Kernel), filepath.Base(base.Guest.Kernel), filepath.Base(base.Guest.Initramfs))
	var rootfsFiles []string
	// The warm VM's own cgroup, as the last start made it.
	var warmCgroup *recordingCgroup
	// failWarmRemoves is how many removals of the next warm VM's cgroup fail.
	failWarmRemoves := 0
	start := func(t *testing.T, hv *fakevm.Hypervisor, warmCfg, podCfg config.Config, cg Cgroup) (*Pod, string, error) {
		t.Helper()
		warmDir := t.TempDir()
		warmCgroup = &recordingCgroup{failRemoves: failWarmRemoves}
		w, err := PrepareWarm(ctx, warmCfg, hv, warmDir, func(_ config.Config, o Options) (Cgroup, error) {
			if want := warmCgroupPath(warmDir); o.Cgroup != want || o.StateDir != warmDir {
				t.Errorf("the warm VM's cgroup %q in %s, want %q in its slot", o.Cgroup, o.StateDir, want)
			}
			return warmCgroup, nil
		})
		if err != nil {
			t.Fatal(err)
		}
		if len(warmCgroup.pids) != 1 || warmCgroup.pids[0] != hv.VMs()[0].Pid() || warmCgroup.removed != 0 {
			t.Fatalf("the warm VM's cgroup: pids %v, removed %d; want the warm VM's and in place", warmCgroup.pids, warmCgroup.removed)
		}
		Hold(w)
		t.Cleanup(func() {
			if w := takeHeld(); w != nil {
				w.Discard(ctx)
			}
		})
		rootfsFiles = files(t, t.TempDir(), "layer.erofs", "rw.ext4")
		p, _, err := Start(ctx, podCfg, Options{ID: "warm", StateDir: podid.StateDir(podCfg.StateDir, "test", "warm"), Hostname: "warm",
			Rootfs: overlayPlan(rootfsFiles[0], rootfsFiles[1]), Hypervisor: hv,
			NewCgroup: func(config.Config, Options) (Cgroup, error) { return cg, nil }})
		if err == nil {
			t.Cleanup(func() { p.Stop(ctx) })
		}
		return p, warmDir, err
	}

	t.Run("fits", func(t *testing.T) {
		hv := fakevm.New()
		podCgroup := &recordingCgroup{}
		p, warmDir, err := start(t, hv, base, base, podCgroup)
		if err != nil {
			t.Fatal(err)
		}
		if n := len(hv.VMs()); n != 1 {
			t.Fatalf("%d VMs, want the warm one only", n)
		}
		vm := hv.VMs()[0]
		if p.vm != vmm.VM(vm) {
			t.Fatal("the pod is not in the warm VM")
		}
		// The VM moved into the pod's cgroup, and the warm one went.
		if !slices.Equal(podCgroup.pids, []int{vm.Pid()}) || warmCgroup.removed != 1 {
			t.Errorf("the pod's cgroup holds %v (want the VM's %d); the warm one removed %d times, want 1", podCgroup.pids, vm.Pid(), warmCgroup.removed)
		}
		if got, want := vm.Config().HotplugSlots, base.Hypervisor.HotplugSlots+warmSlots; got != want {
			t.Errorf("the booted warm VM has %d hot-plug slots, want %d (the NIC's and virtio-fs device's on top)", got, want)
		}
		// The warm-up's disk plugged and unplugged, then the pod's layer and image.
		want := []fakevm.Event{"start", "attach warm-up", "detach warm-up", fakevm.Event("attach " + storageID(rootfsFiles[0])), fakevm.Event("attach " + storageID(rootfsFiles[1]))}
		if got := vm.Events(); !slices.Equal(got, want) {
			t.Errorf("the warm VM's events %v, want %v", got, want)
		}
		if b, err := os.ReadFile(filepath.Join(p.stateDir, WarmFile)); err != nil || string(b) != warmDir {
			t.Errorf("the pod's %s: %q, %v; want %s", WarmFile, b, err, warmDir)
		}
		if err := p.Stop(ctx); err != nil {
			t.Fatal(err)
		}
		if !vm.Stopped() {
			t.Error("the warm VM outlived its pod")
		}
		if _, err := os.Stat(warmDir); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("the warm VM's state after Stop: %v", err)
		}
	})

	// The warm VM's cgroup, busy when the pod moved the VM out of it, goes at Stop.
	t.Run("warm cgroup removed at stop", func(t *testing.T) {
		failWarmRemoves = 1
		defer func() { failWarmRemoves = 0 }()
		p, _, err := start(t, fakevm.New(), base, base, noCgroup{})
		if err != nil {
			t.Fatal(err)
		}
		if warmCgroup.removed != 0 {
			t.Fatalf("the warm VM's cgroup removed %d times despite the failure", warmCgroup.removed)
		}
		if err := p.Stop(ctx); err != nil {
			t.Fatal(err)
		}
		if warmCgroup.removed != 1 {
			t.Errorf("the warm VM's cgroup removed %d times by Stop, want 1", warmCgroup.removed)
		}
	})

	t.Run("another shape", func(t *testing.T) {
		hv := fakevm.New()
		other := base
		other.Guest.KernelParams = "caisson.test=1"
		p, warmDir, err := start(t, hv, base, other, noCgroup{})
		if err != nil {
			t.Fatal(err)
		}
		vms := hv.VMs()
		if len(vms) != 2 || !vms[0].Stopped() || p.vm != vmm.VM(vms[1]) {
			t.Fatalf("%d VMs (the warm one stopped: %v), want the warm one ended and the pod in a second", len(vms), vms[0].Stopped())
		}
		if !slices.Contains(vms[1].Config().KernelParams, "caisson.test=1") {
			t.Errorf("the booted VM's kernel parameters %v", vms[1].Config().KernelParams)
		}
		if _, err := os.Stat(warmDir); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("the ended warm VM's state: %v", err)
		}
		if warmCgroup.removed != 1 {
			t.Errorf("the ended warm VM's cgroup removed %d times, want 1", warmCgroup.removed)
		}
	})

	t.Run("virtio-fs refused", func(t *testing.T) {
		testutil.RequireRoot(t)
		if _, err := os.Stat(virtiofs.DefaultBinary); err != nil {
			t.Skipf("needs %s (make deps)", virtiofs.DefaultBinary)
		}
		shared := base
		shared.Guest.SharedFS = config.SharedFSVirtio
		shared.Guest.Virtiofsd = virtiofs.DefaultBinary
		hv := fakevm.New()
		hv.Fail(fakevm.OpAttachSharedFS, errors.New("device_add refused"))
		cg := &recordingCgroup{}
		p, _, err := start(t, hv, shared, shared, cg)
		if err != nil {
			t.Fatal(err)
		}
		vms := hv.VMs()
		if len(vms) != 2 || !vms[0].Config().SharedMemory || !vms[0].Stopped() || vms[1].Config().SharedFS == nil {
			t.Fatalf("%d VMs, want the warm one (shared memory) ended and the pod's booted with its virtio-fs device", len(vms))
		}
		// The cgroup got the first virtiofsd, the second, then the VM.
		if len(cg.pids) != 3 || cg.pids[1] != p.fs.Pid() || cg.pids[0] == cg.pids[1] {
			t.Fatalf("pids added to the pod's cgroup %v, the pod's virtiofsd %d: want two daemons, the second the pod's, and the VM", cg.pids, p.fs.Pid())
		}
		for end := time.Now().Add(10 * time.Second); syscall.Kill(cg.pids[0], 0) == nil; time.Sleep(50 * time.Millisecond) {
			if time.Now().After(end) {
				t.Fatalf("the first virtiofsd (%d) still runs", cg.pids[0])
			}
		}
		select {
		case <-p.fs.Done():
			t.Fatalf("the pod's virtiofsd ended: %v", p.fs.Err())
		default:
		}
	})
}
