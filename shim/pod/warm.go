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
	"github.com/caisson-containers/caisson/shim/vmboot"
	"github.com/caisson-containers/caisson/shim/vmm"
)

// Warm is a VM restored from the template of a configuration ahead of its pod, with no
// pod device, whose agent has run its warm-up again (Sandbox.WarmUp): the translated
// code of an emulating accelerator (TCG) is not in a template, so a restored VM is cold
// where a warm one is not. The pod that the process holding it serves next starts in it
// (Hold, then Start), with its NICs and disks hot-plugged (hypervisor.warm_vms, shim/warm).
type Warm struct {
	g     *vmboot.Guest
	calls *deadlines
	// template is the template's directory: a pod whose template differs boots instead.
	template string
	// dir is the VM's state directory (a warm pool's slot).
	dir string
	// ready is when it was warm; warmUp what the agent's warm-up took (both for the
	// pod's log: the warm shim's own log goes with its slot).
	ready  time.Time
	warmUp time.Duration
}

// WarmFile, in a pod's state directory, names the state directory of the warm VM the
// pod started in, for the cleanup after its shim died (shim delete).
const WarmFile = "warm-vm"

// PrepareWarm restores the template of cfg's pods (at cfg's size, the runtime
// configuration's before any pod's additions) into a VM whose state is in dir, and has
// its agent warm up. On error nothing of the VM is left.
func PrepareWarm(ctx context.Context, cfg config.Config, hv vmm.Hypervisor, dir string) (*Warm, error) {
	if !cfg.Hypervisor.Template {
		return nil, fmt.Errorf("warm VMs are restored from a template: hypervisor.template is false")
	}
	vcfg := vmConfig(cfg, dir)
	t, err := templateOf(ctx, cfg, hv)
	if err != nil {
		return nil, err
	}
	vcfg.Template = t
	calls := &deadlines{}
	g, err := vmboot.Boot(ctx, hv, vcfg, vmboot.Options{
		Timeout:    BootTimeout,
		ClientOpts: []ttrpc.ClientOpts{ttrpc.WithUnaryClientInterceptor(calls.intercept)},
	})
	if err != nil {
		return nil, err
	}
	w := &Warm{g: g, calls: calls, template: t.Dir, dir: dir}
	resp, err := agent.NewSandboxClient(g.Client).WarmUp(ctx, &agent.WarmUpRequest{})
	if err == nil {
		err = warmDisk(ctx, g, dir)
	}
	if err != nil {
		w.Stop(context.WithoutCancel(ctx))
		return nil, fmt.Errorf("warm-up: %w", errgrpc.ToNative(err))
	}
	w.ready, w.warmUp = time.Now(), time.Duration(resp.GetTookNs())
	log.G(ctx).WithFields(log.Fields{"template": t.Dir, "warm_up": w.warmUp, "qemu_pid": g.VM.Pid()}).Info("warm VM ready")
	return w, nil
}

// Done is closed when the warm VM has ended.
func (w *Warm) Done() <-chan struct{} { return w.g.VM.Done() }

// Stop ends the warm VM; its state directory stays (the pool's slot is its owner's).
func (w *Warm) Stop(ctx context.Context) error {
	w.g.Close()
	return w.g.VM.Stop(ctx)
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

// adopt starts the pod in w, a warm VM, if it fits the pod (vcfg, with cfg's template):
// the pod's NICs and disks are hot-plugged and QEMU joins the pod's cgroup. A warm VM
// that does not fit, or that fails to take the pod's devices, is stopped and nil is
// returned: the pod then boots as without it.
func (p *Pod) adopt(ctx context.Context, w *Warm, hv vmm.Hypervisor, vcfg vmm.Config) *vmboot.Guest {
	start := time.Now()
	misfit := func(why string, err error) *vmboot.Guest {
		log.G(ctx).WithError(err).WithField("warm_vm", w.dir).Info("the warm VM does not fit the pod (" + why + "): booting one")
		if err := w.Discard(context.WithoutCancel(ctx)); err != nil {
			log.G(ctx).WithError(err).Warn("stopping the warm VM")
		}
		return nil
	}
	if !p.cfg.Hypervisor.Template {
		return misfit("the pod's VMs boot", nil)
	}
	select {
	case <-w.Done():
		return misfit("it ended", w.g.VM.Wait())
	default:
	}
	if vcfg.SharedFS != nil {
		return misfit("the pod shares host paths", nil)
	}
	t, err := vmTemplate(ctx, p.cfg, hv, vcfg)
	if err != nil {
		return misfit("the pod's template", err)
	}
	if t.Dir != w.template {
		return misfit("another template: "+t.Dir, nil)
	}
	vm := w.g.VM
	for _, n := range vcfg.NICs {
		if err := vm.AttachNIC(ctx, n); err != nil {
			return misfit("its NICs", err)
		}
	}
	for _, d := range vcfg.Disks {
		if _, err := vm.AttachDisk(ctx, d); err != nil {
			return misfit("its disks", err)
		}
	}
	if err := os.WriteFile(filepath.Join(p.stateDir, WarmFile), []byte(w.dir), 0o600); err != nil {
		return misfit("its state", err)
	}
	p.warmDir = w.dir
	p.calls = w.calls
	log.G(ctx).WithFields(log.Fields{
		"warm_vm": w.dir, "qemu_pid": vm.Pid(), "warm_up": w.warmUp, "waited": start.Sub(w.ready), "took": time.Since(start),
	}).Debug("warm VM taken")
	return w.g
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
