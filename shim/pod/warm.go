package pod

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/containerd/errdefs/pkg/errgrpc"
	"github.com/containerd/log"
	"github.com/containerd/ttrpc"

	agent "github.com/caisson-containers/caisson/api/agent/v1"
	"github.com/caisson-containers/caisson/internal/rootfs"
	"github.com/caisson-containers/caisson/shim/config"
	"github.com/caisson-containers/caisson/shim/template"
	"github.com/caisson-containers/caisson/shim/vmboot"
	"github.com/caisson-containers/caisson/shim/vmm"
)

// Warm is a VM started ahead of its pod for a configuration, at the configuration's
// size and with no pod device: restored from its template (hypervisor.template) or
// booted. Its agent has run its warm-up (Sandbox.WarmUp) again: the translated code of
// an emulating accelerator (TCG) is not in a template, and a booted VM has not run the
// guest code of a pod's start yet. The pod that the process holding it serves next
// starts in it (Hold, then Start), with its NICs and disks hot-plugged and its size
// grown (hypervisor.warm_vms, shim/warm).
type Warm struct {
	g     *vmboot.Guest
	calls *deadlines
	// shape is what a pod must share with the VM to take it (warmShape).
	shape string
	// modules is the kernel modules image a booted warm VM boots with and mounts (as
	// a template's VMs have it), nil if none: the pod's own is then not attached.
	modules *vmm.Disk
	// dir is the VM's state directory (a warm pool's slot).
	dir string
	// cgroup holds the VM's QEMU until a pod takes it (nil then): one of Caisson's own
	// (warmCgroupPath), with the limits of a pod of the runtime configuration's size.
	cgroup Cgroup
	// ready is when it was warm; warmUp what the agent's warm-up took (both for the
	// pod's log: the warm shim's own log goes with its slot).
	ready  time.Time
	warmUp time.Duration
}

// WarmFile, in a pod's state directory, names the state directory of the warm VM the
// pod started in, for the cleanup after its shim died (shim delete).
const WarmFile = "warm-vm"

// PrepareWarm starts a VM of cfg's pods (at cfg's size, the runtime configuration's
// before any pod's additions) whose state is in dir, from their template or booted as
// cfg says, in a cgroup of its own (newCgroup's, given warmCgroupPath; nil: HostCgroup),
// and has its agent warm up. On error nothing of the VM is left.
//
// The cgroup is why a waiting VM is not charged to whoever started its shim
// (containerd): the memory a VM touches stays charged to the cgroup it touched it in,
// even after its process moves. A pod that takes the VM moves it into the pod's cgroup
// and removes the warm one; what the VM touched before stays charged below Caisson's
// parent cgroup (a removed cgroup's memory counts in its parent until it is freed).
func PrepareWarm(ctx context.Context, cfg config.Config, hv vmm.Hypervisor, dir string, newCgroup CgroupFunc) (*Warm, error) {
	vcfg := asWarm(cfg, vmConfig(cfg, dir), sizeOf(cfg))
	shape, t, modules, err := warmShape(ctx, cfg, hv, vcfg)
	if err != nil {
		return nil, err
	}
	vcfg.Template = t
	if modules != nil {
		vcfg.Disks = []vmm.Disk{*modules}
	}
	if newCgroup == nil {
		newCgroup = HostCgroup
	}
	cg, err := newCgroup(cfg, Options{StateDir: dir, Cgroup: warmCgroupPath(dir)})
	if err != nil {
		return nil, fmt.Errorf("the warm VM's cgroup: %w", err)
	}
	calls := &deadlines{}
	g, err := vmboot.Boot(ctx, hv, vcfg, vmboot.Options{
		Timeout:    BootTimeout,
		ClientOpts: []ttrpc.ClientOpts{ttrpc.WithUnaryClientInterceptor(calls.intercept)},
		Started:    func(vm vmm.VM) error { return cg.Add(vm.Pid()) },
	})
	if err != nil {
		if cerr := cg.Remove(context.WithoutCancel(ctx)); cerr != nil {
			err = errors.Join(err, cerr)
		}
		return nil, err
	}
	w := &Warm{g: g, calls: calls, shape: shape, dir: dir, modules: modules, cgroup: cg}
	resp, err := agent.NewSandboxClient(g.Client).WarmUp(ctx, &agent.WarmUpRequest{})
	if err == nil && modules != nil {
		mountModules(ctx, g.VM, agent.NewStorageClient(g.Client), *modules)
	}
	if err == nil {
		err = warmDisk(ctx, g, dir)
	}
	if err != nil {
		w.Stop(context.WithoutCancel(ctx))
		return nil, fmt.Errorf("warm-up: %w", errgrpc.ToNative(err))
	}
	w.ready, w.warmUp = time.Now(), time.Duration(resp.GetTookNs())
	log.G(ctx).WithFields(log.Fields{"shape": shape, "warm_up": w.warmUp, "qemu_pid": g.VM.Pid()}).Info("warm VM ready")
	return w, nil
}

// warmSlots are the hot-plug slots a booted warm VM has beyond the configuration's: the
// pod's NIC and virtio-fs device, which a booted pod has cold-plugged, take two, and the
// pod keeps hypervisor.hotplug_slots for its containers' disks.
const warmSlots = 2

// asWarm is vcfg, a VM of cfg's pods, as a warm VM starts: at size, and if it boots,
// with warmSlots more hot-plug slots and, when the pods share host paths, its memory
// shared from the start (a pod brings its virtiofsd, whose device the VM gets with the
// pod's others).
func asWarm(cfg config.Config, vcfg vmm.Config, size vmm.Size) vmm.Config {
	vcfg.MemoryMiB, vcfg.VCPUs = size.MemoryMiB, size.VCPUs
	if !cfg.Hypervisor.Template {
		vcfg.HotplugSlots += warmSlots
		vcfg.SharedMemory = SharesHostPaths(cfg)
	}
	return vcfg
}

// warmShape is what a warm VM started as vcfg (at its start size) shares with the pods
// that may take it: the directory of its template (returned too), or for a VM that
// boots, the key of its shape (template.Key: the VMM, the guest's files, its kernel
// parameters and sizes, the modules image, returned too if there is one), whether its
// memory is shared (asWarm) and how the modules image is attached.
func warmShape(ctx context.Context, cfg config.Config, hv vmm.Hypervisor, vcfg vmm.Config) (string, *vmm.Template, *vmm.Disk, error) {
	if cfg.Hypervisor.Template {
		t, err := vmTemplate(ctx, cfg, hv, vcfg)
		if err != nil {
			return "", nil, nil, err
		}
		return t.Dir, t, nil, nil
	}
	var storages []template.Storage
	modules, ok := modulesDisk(ctx, cfg, hv.MaxBootDisks(), 0, 0)
	if ok {
		storages = append(storages, template.Storage{Disk: modules, FSType: "erofs"})
	}
	k, err := template.Key(hv, vcfg, storages...)
	if err != nil {
		return "", nil, nil, err
	}
	shape := "booted " + k
	if vcfg.SharedMemory {
		shape += " with shared memory"
	}
	if !ok {
		return shape, nil, nil, nil
	}
	return shape + " modules on " + modules.Kind.String(), nil, &modules, nil
}

// Done is closed when the warm VM has ended.
func (w *Warm) Done() <-chan struct{} { return w.g.VM.Done() }

// Stop ends the warm VM and removes its cgroup; its state directory stays (the pool's
// slot is its owner's).
func (w *Warm) Stop(ctx context.Context) error {
	w.g.Close()
	err := w.g.VM.Stop(ctx)
	if w.cgroup != nil {
		if cerr := w.cgroup.Remove(ctx); cerr != nil {
			err = errors.Join(err, fmt.Errorf("the warm VM's cgroup: %w", cerr))
		}
	}
	return err
}

// releaseCgroup removes the warm VM's cgroup once its pod has moved the VM into its own.
func (w *Warm) releaseCgroup(ctx context.Context) error {
	if err := w.cgroup.Remove(ctx); err != nil {
		return err
	}
	w.cgroup = nil
	// The record is for a shim that dies before the move (shim delete): none is left.
	os.Remove(filepath.Join(w.dir, cgroupRecord))
	return nil
}

// Discard ends the warm VM and removes its state directory.
func (w *Warm) Discard(ctx context.Context) error {
	err := w.Stop(ctx)
	if rerr := os.RemoveAll(w.dir); rerr != nil {
		return errors.Join(err, rerr)
	}
	return err
}

// held is the warm VM this process's next pod starts in: a shim serves one pod, and the
// warm VM it made before it knew its pod is that pod's.
var held struct {
	mu sync.Mutex
	w  *Warm
}

// Hold makes w the VM the next Start of this process starts its pod in, if it fits.
func Hold(w *Warm) {
	held.mu.Lock()
	defer held.mu.Unlock()
	held.w = w
}

// takeHeld returns the held warm VM, if any, and forgets it.
func takeHeld() *Warm {
	held.mu.Lock()
	defer held.mu.Unlock()
	w := held.w
	held.w = nil
	return w
}

// adopt starts the pod in w, a warm VM, if it fits the pod (vcfg, with p.cfg's template
// or none): the pod's NICs, disks and virtio-fs device are hot-plugged, and Start grows
// the VM from the runtime configuration's size to the pod's. A warm VM that does not
// fit, or that fails to take the pod's devices, is stopped and nil is returned: the pod
// then starts as without it.
func (p *Pod) adopt(ctx context.Context, w *Warm, hv vmm.Hypervisor, vcfg vmm.Config) *vmboot.Guest {
	start := time.Now()
	sharedTaken := false
	misfit := func(why string, err error) *vmboot.Guest {
		log.G(ctx).WithError(err).WithField("warm_vm", w.dir).Info("the warm VM does not fit the pod (" + why + "): booting one")
		if err := w.Discard(context.WithoutCancel(ctx)); err != nil {
			log.G(ctx).WithError(err).Warn("stopping the warm VM")
		}
		// virtiofsd serves one connection, which the warm VM may have taken with
		// it: the pod's VM gets a new daemon, at the same socket.
		if sharedTaken {
			if err := p.restartShared(ctx); err != nil {
				log.G(ctx).WithError(err).Warn("restarting the pod's virtiofsd")
			}
		}
		return nil
	}
	select {
	case <-w.Done():
		return misfit("it ended", w.g.VM.Wait())
	default:
	}
	// Warm VMs start at the runtime configuration's size, the pod's base.
	shape, _, _, err := warmShape(ctx, p.cfg, hv, asWarm(p.cfg, vcfg, p.base))
	if err != nil {
		return misfit("the pod's VM shape", err)
	}
	if shape != w.shape {
		return misfit("another shape: "+shape, nil)
	}
	vm := w.g.VM
	for _, n := range vcfg.NICs {
		if err := vm.AttachNIC(ctx, n); err != nil {
			return misfit("its NICs", err)
		}
	}
	for _, d := range vcfg.Disks {
		if d.ID == modulesDiskID && w.modules != nil {
			continue // the warm VM has it: the same image, the shapes say
		}
		if _, err := vm.AttachDisk(ctx, d); err != nil {
			return misfit("its disks", err)
		}
	}
	if fs := vcfg.SharedFS; fs != nil {
		sharedTaken = true
		if err := vm.AttachSharedFS(ctx, *fs); err != nil {
			return misfit("its shared file system", err)
		}
	}
	if err := os.WriteFile(filepath.Join(p.stateDir, WarmFile), []byte(w.dir), 0o600); err != nil {
		return misfit("its state", err)
	}
	p.warmDir = w.dir
	p.modulesIn = w.modules != nil
	p.calls = w.calls
	p.size = p.base
	log.G(ctx).WithFields(log.Fields{
		"warm_vm": w.dir, "qemu_pid": vm.Pid(), "warm_up": w.warmUp, "waited": start.Sub(w.ready), "took": time.Since(start),
	}).Debug("warm VM taken")
	return w.g
}

// restartShared replaces the pod's virtiofsd with a new one, at the same socket.
func (p *Pod) restartShared(ctx context.Context) error {
	err := p.fs.Close(ctx)
	p.fs = nil
	if err != nil {
		return err
	}
	_, err = p.startShared(ctx)
	return err
}

// warmDiskSize is the warm-up disk's: enough for an ext4 journal.
const warmDiskSize = 16 << 20

// warmDisk hot-plugs a writable ext4 disk into the warm VM, has the agent mount and
// unmount it, and unplugs it: the guest's hot-plug, virtio-blk and ext4 paths, which a
// pod's first container takes (its writable image), then run in this QEMU before the pod
// does. Under TCG it took a warm pod's sandbox and storages phase from 0.38 to 0.27 s
// and its start from 1.32 to 1.11 s (docs/cri.md, Warm VMs). A virtio-pmem device, which
// QEMU cannot unplug, is not warmed so.
func warmDisk(ctx context.Context, g *vmboot.Guest, dir string) error {
	d := rootfs.Device{Source: filepath.Join(dir, "warm-up.ext4"), FSType: "ext4", Mkfs: &rootfs.Mkfs{FS: "ext4", Size: warmDiskSize}}
	if err := rootfs.Format(ctx, d); err != nil {
		return err
	}
	defer os.Remove(d.Source)
	disk := vmm.Disk{ID: "warm-up", Path: d.Source, Kind: vmm.Block}
	addr, err := g.VM.AttachDisk(ctx, disk)
	if err != nil {
		return err
	}
	st := agent.NewStorageClient(g.Client)
	_, err = st.Mount(ctx, &agent.MountStorageRequest{StorageId: disk.ID, Device: agentDevice(addr, disk.Kind), Fstype: d.FSType})
	if err == nil {
		_, err = st.Unmount(ctx, &agent.UnmountStorageRequest{StorageId: disk.ID})
	}
	if derr := g.VM.DetachDisk(ctx, disk.ID); derr != nil {
		return errors.Join(err, fmt.Errorf("unplug the warm-up disk: %w", derr))
	}
	return err
}
