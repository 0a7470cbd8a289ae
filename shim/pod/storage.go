package pod

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"sync"
	"time"

	"github.com/containerd/errdefs"
	"github.com/containerd/errdefs/pkg/errgrpc"
	"github.com/containerd/log"

	agent "github.com/caisson-containers/caisson/api/agent/v1"
	"github.com/caisson-containers/caisson/internal/rootfs"
	"github.com/caisson-containers/caisson/shim/vmm"
)

// attached is a host file attached to the VM and mounted by the agent.
type attached struct {
	id   string
	refs int
}

// AttachRootfs attaches the plan's devices (sharing those already attached) and has the
// agent mount them, for a container after the pod's first. On error, nothing stays
// attached.
func (p *Pod) AttachRootfs(ctx context.Context, plan *rootfs.Plan) (_ Rootfs, retErr error) {
	var acquired []string
	defer func() {
		if retErr != nil {
			if err := p.releaseAll(context.WithoutCancel(ctx), acquired); err != nil {
				log.G(ctx).WithError(err).Warn("releasing rootfs devices after a failed attach")
			}
		}
	}()
	ids := make([]string, len(plan.Devices))
	for i, d := range plan.Devices {
		id, err := p.acquire(ctx, d)
		if err != nil {
			return Rootfs{}, fmt.Errorf("rootfs device %s: %w", d.Source, err)
		}
		acquired = append(acquired, d.Source)
		ids[i] = id
	}
	return p.rootfsOf(plan, ids, acquired), nil
}

// bootRootfs is the first container's rootfs, whose devices the VM booted with and the
// agent has mounted (mountBootDisks): it takes a reference on each.
func (p *Pod) bootRootfs(plan *rootfs.Plan) Rootfs {
	if plan == nil {
		return Rootfs{}
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	ids := make([]string, len(plan.Devices))
	sources := make([]string, len(plan.Devices))
	for i, d := range plan.Devices {
		a := p.storages[d.Source]
		a.refs++
		ids[i], sources[i] = a.id, d.Source
	}
	return p.rootfsOf(plan, ids, sources)
}

// rootfsOf is plan's rootfs on the storages ids (one per plan device), released by
// dropping the references taken on sources.
func (p *Pod) rootfsOf(plan *rootfs.Plan, ids, sources []string) Rootfs {
	ref := func(r *rootfs.Ref) *agent.StoragePath {
		if r == nil {
			return nil
		}
		return &agent.StoragePath{StorageId: ids[r.Device], Path: r.Path}
	}
	rfs := &agent.Rootfs{Upper: ref(plan.Upper), Work: ref(plan.Work), TmpfsUpper: plan.TmpfsUpper, Options: plan.Options}
	for i := range plan.Lower {
		rfs.Lower = append(rfs.Lower, ref(&plan.Lower[i]))
	}
	return Rootfs{Agent: rfs, Release: func(ctx context.Context) error { return p.releaseAll(ctx, sources) }}
}

// releaseAll drops the references taken on sources, last first.
func (p *Pod) releaseAll(ctx context.Context, sources []string) error {
	var errs []error
	for i := len(sources) - 1; i >= 0; i-- {
		errs = append(errs, p.release(ctx, sources[i]))
	}
	return errors.Join(errs...)
}

// acquire attaches and mounts d, or takes another reference on it (a disk the
// VM booted with is already mounted, see Start).
func (p *Pod) acquire(ctx context.Context, d rootfs.Device) (string, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if a, ok := p.storages[d.Source]; ok {
		a.refs++
		return a.id, nil
	}
	disk, err := diskOf(ctx, d, p.cfg.Storage.DAX)
	if err != nil {
		return "", err
	}
	start := time.Now()
	addr, err := p.vm.AttachDisk(ctx, disk)
	if err != nil {
		return "", err
	}
	log.G(ctx).WithField("storage", disk.ID).WithField("took", time.Since(start)).Debug("disk hot-plugged")
	if err := p.mount(ctx, d, disk, addr); err != nil {
		if derr := p.vm.DetachDisk(context.WithoutCancel(ctx), disk.ID); derr != nil {
			log.G(ctx).WithError(derr).Warn("detaching a disk the agent could not mount")
		}
		return "", err
	}
	p.storages[d.Source] = &attached{id: disk.ID, refs: 1}
	return disk.ID, nil
}

// mount has the agent mount an attached disk as storage disk.ID.
func (p *Pod) mount(ctx context.Context, d rootfs.Device, disk vmm.Disk, addr vmm.DiskAddress) error {
	return mountStorage(ctx, p.storage, d, disk, addr)
}

// mountStorage has the agent behind st mount device d, attached as disk at addr, as
// storage disk.ID.
func mountStorage(ctx context.Context, st agent.StorageService, d rootfs.Device, disk vmm.Disk, addr vmm.DiskAddress) error {
	start := time.Now()
	dev := agentDevice(addr, disk.Kind)
	var opts []string
	if d.ReadOnly {
		opts = append(opts, "ro")
	}
	_, err := st.Mount(ctx, &agent.MountStorageRequest{
		StorageId: disk.ID, Device: dev, Fstype: d.FSType, Options: opts, Dax: disk.Kind == vmm.PMEM,
	})
	if err != nil {
		return fmt.Errorf("mount %s in the guest: %w", d.Source, errgrpc.ToNative(err))
	}
	log.G(ctx).WithFields(log.Fields{"storage": disk.ID, "source": d.Source, "kind": disk.Kind, "took": time.Since(start)}).Debug("storage mounted")
	return nil
}

// bootDisks formats the devices of the pod's first container and returns them
// as disks for the VM to boot with, one per file, with the device each came from.
func bootDisks(ctx context.Context, plan *rootfs.Plan, dax bool) ([]vmm.Disk, []rootfs.Device, error) {
	if plan == nil {
		return nil, nil, nil
	}
	var disks []vmm.Disk
	var devs []rootfs.Device
	seen := map[string]bool{}
	for _, d := range plan.Devices {
		if seen[d.Source] {
			continue
		}
		seen[d.Source] = true
		disk, err := diskOf(ctx, d, dax)
		if err != nil {
			return nil, nil, fmt.Errorf("rootfs device %s: %w", d.Source, err)
		}
		disks = append(disks, disk)
		devs = append(devs, d)
	}
	return disks, devs, nil
}

// mountBootDisks has the agent mount the disks the VM booted with, all at once.
// Each becomes a storage with no reference yet: the first container's rootfs
// (bootRootfs) takes them.
func (p *Pod) mountBootDisks(ctx context.Context, disks []vmm.Disk, devs []rootfs.Device) error {
	errs := make([]error, len(disks))
	var wg sync.WaitGroup
	for i := range disks {
		wg.Go(func() {
			addr, err := p.vm.Address(disks[i].ID)
			if err == nil {
				err = p.mount(ctx, devs[i], disks[i], addr)
			}
			if err != nil {
				errs[i] = fmt.Errorf("rootfs device %s: %w", devs[i].Source, err)
				return
			}
			p.mu.Lock()
			p.storages[devs[i].Source] = &attached{id: disks[i].ID}
			p.mu.Unlock()
		})
	}
	wg.Wait()
	return errors.Join(errs...)
}

// diskOf formats d's file if it asks for it and says how to attach it.
func diskOf(ctx context.Context, d rootfs.Device, dax bool) (vmm.Disk, error) {
	if err := rootfs.Format(ctx, d); err != nil {
		return vmm.Disk{}, err
	}
	kind, err := diskKind(d, dax)
	if err != nil {
		return vmm.Disk{}, err
	}
	return vmm.Disk{ID: storageID(d.Source), Path: d.Source, ReadOnly: d.ReadOnly, Kind: kind}, nil
}

// release drops a reference; the last one unmounts and detaches.
func (p *Pod) release(ctx context.Context, source string) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	a, ok := p.storages[source]
	if !ok {
		return nil
	}
	if a.refs--; a.refs > 0 {
		return nil
	}
	delete(p.storages, source)
	var errs []error
	if _, err := p.storage.Unmount(ctx, &agent.UnmountStorageRequest{StorageId: a.id}); err != nil {
		errs = append(errs, fmt.Errorf("unmount %s in the guest: %w", a.id, errgrpc.ToNative(err)))
	}
	// QEMU cannot hot-unplug virtio-pmem: the VMM parks the device (NotImplemented) and
	// reuses it if the same layer is attached again.
	if err := p.vm.DetachDisk(ctx, a.id); err != nil && !errdefs.IsNotImplemented(err) {
		errs = append(errs, fmt.Errorf("detach %s: %w", source, err))
	}
	return errors.Join(errs...)
}

// diskKind puts read-only EROFS layers on virtio-pmem (DAX) when the config
// allows it and the file's size is pmem-aligned (the snapshotter pads layers).
func diskKind(d rootfs.Device, dax bool) (vmm.DiskKind, error) {
	if !dax || !d.ReadOnly || d.FSType != "erofs" {
		return vmm.Block, nil
	}
	st, err := os.Stat(d.Source)
	if err != nil {
		return 0, err
	}
	if st.Size() == 0 || st.Size()%vmm.PMEMAlignment != 0 {
		return vmm.Block, nil
	}
	return vmm.PMEM, nil
}

// storageID names a host file's storage in the guest: stable for the file, so
// a layer shared by containers is one storage, and short enough for a
// virtio-blk serial (20 bytes).
func storageID(source string) string {
	h := sha256.Sum256([]byte(source))
	return "s" + hex.EncodeToString(h[:])[:19]
}
