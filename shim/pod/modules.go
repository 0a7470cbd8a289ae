package pod

import (
	"context"
	"os"

	"github.com/containerd/log"

	agent "github.com/caisson-containers/caisson/api/agent/v1"
	"github.com/caisson-containers/caisson/guest/modimage"
	"github.com/caisson-containers/caisson/internal/rootfs"
	"github.com/caisson-containers/caisson/shim/config"
	"github.com/caisson-containers/caisson/shim/template"
	"github.com/caisson-containers/caisson/shim/vmm"
)

// The guest kernel's modules image (guest/modimage: every module of the kernel, beside
// it) is attached to every pod VM, read-only, and mounted by the agent on
// /lib/modules/$(uname -r), so that the guest kernel loads a module the initramfs does not
// carry when something in the pod needs it (a bridge, a tun device, a VLAN, netfilter).
// Without the image the VM boots all the same and has the initramfs's modules only.
//
// A pod VM made from a template has it from its template (templateStorages): the
// template's VM booted with it and mounted it before it was saved, and the VMs restored
// from it get the same disk, so that nothing is attached nor mounted at their start. A
// booted warm VM (Warm) boots with it and mounts it before its pod comes.

// modulesDiskID is the image's disk in the VM and its storage id in the guest, which the
// agent knows the image by (its boot.ModulesStorageID).
const modulesDiskID = "kernel-modules"

// modulesDisk is the modules image of cfg's guest kernel as a disk of a VM that has
// other disks and NICs already: on virtio-pmem with DAX when storage.dax allows it and the
// VM boots with it (its pages in the host's page cache, shared by every VM), else
// virtio-blk. It is false, with a warning, when there is no image or no room for it
// (maxBoot: how many disks the VMM boots a VM with, vmm.Hypervisor's MaxBootDisks).
// A VM made from a template has the image from its template (templateStorages): false.
func modulesDisk(ctx context.Context, cfg config.Config, maxBoot, disks, nics int) (vmm.Disk, bool) {
	if cfg.Hypervisor.Template {
		return vmm.Disk{}, false
	}
	path := modimage.Beside(cfg.Guest.Kernel)
	st, err := os.Stat(path)
	if err != nil {
		log.G(ctx).WithError(err).Warn("no kernel modules image beside the guest kernel: the pod's VM loads only its initramfs's modules (build it with `make guest`)")
		return vmm.Disk{}, false
	}
	if maxBoot-disks < 1 {
		log.G(ctx).WithField("disks", disks).Warn("no slot left for the kernel modules image: the pod's VM loads only its initramfs's modules")
		return vmm.Disk{}, false
	}
	kind := vmm.Block
	if cfg.Storage.DAX && st.Size() > 0 && st.Size()%vmm.PMEMAlignment == 0 {
		kind = vmm.PMEM
	}
	return vmm.Disk{ID: modulesDiskID, Path: path, ReadOnly: true, Kind: kind}, true
}

// templateStorages are the storages of cfg's VM templates: the modules image, if there
// is one, as a read-only virtio-blk disk (a template carries no virtio-pmem device: its
// saved state holds no memory but the guest's RAM).
func templateStorages(ctx context.Context, cfg config.Config) []template.Storage {
	path := modimage.Beside(cfg.Guest.Kernel)
	if _, err := os.Stat(path); err != nil {
		log.G(ctx).WithError(err).Warn("no kernel modules image beside the guest kernel: the pod's VM loads only its initramfs's modules (build it with `make guest`)")
		return nil
	}
	return []template.Storage{{
		Disk:   vmm.Disk{ID: modulesDiskID, Path: path, ReadOnly: true, Kind: vmm.Block},
		FSType: "erofs",
		// The image of another kernel: the pods run without modules on demand, as booted
		// ones do (mountModules).
		Optional: true,
	}}
}

// mountModules has the agent mount the modules image attached as disk. A failure is
// logged, not returned: the pod runs without modules on demand.
func (p *Pod) mountModules(ctx context.Context, disk vmm.Disk) {
	mountModules(ctx, p.vm, p.storage, disk)
}

// mountModules has the agent behind st mount the modules image attached to vm as disk;
// a failure is logged.
func mountModules(ctx context.Context, vm vmm.VM, st agent.StorageService, disk vmm.Disk) {
	addr, err := vm.Address(disk.ID)
	if err == nil {
		err = mountStorage(ctx, st, rootfs.Device{Source: disk.Path, FSType: "erofs", ReadOnly: true}, disk, addr)
	}
	if err != nil {
		log.G(ctx).WithError(err).WithField("image", disk.Path).Warn("kernel modules image: the pod's VM loads only its initramfs's modules")
	}
}
