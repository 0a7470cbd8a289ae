package qemu

import (
	"context"
	"errors"
	"fmt"
	"os"
	"slices"

	"github.com/containerd/errdefs"
	"github.com/containerd/log"

	"github.com/caisson-containers/caisson/shim/vmm"
	"github.com/caisson-containers/caisson/shim/vmm/qemu/qmp"
)

// checkDisk validates d and returns its file's stat.
func (v *VM) checkDisk(d vmm.Disk) (os.FileInfo, error) {
	if d.ID == "" {
		return nil, fmt.Errorf("disk %s: empty id: %w", d.Path, errdefs.ErrInvalidArgument)
	}
	v.mu.Lock()
	_, dup := v.disks[d.ID]
	v.mu.Unlock()
	if dup {
		return nil, fmt.Errorf("disk %q: %w", d.ID, errdefs.ErrAlreadyExists)
	}
	if d.Kind != vmm.Block && d.Kind != vmm.PMEM {
		return nil, fmt.Errorf("disk %q: kind %v: %w", d.ID, d.Kind, errdefs.ErrInvalidArgument)
	}
	st, err := os.Stat(d.Path)
	if errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("disk %q: %w: %w", d.ID, errdefs.ErrNotFound, err)
	} else if err != nil {
		return nil, fmt.Errorf("disk %q: %w", d.ID, err)
	}
	if !st.Mode().IsRegular() && st.Mode()&os.ModeDevice == 0 {
		return nil, fmt.Errorf("disk %q: %s is not a file or a block device: %w", d.ID, d.Path, errdefs.ErrInvalidArgument)
	}
	if size := st.Size(); d.Kind == vmm.PMEM && (size == 0 || size%vmm.PMEMAlignment != 0) {
		return nil, fmt.Errorf("pmem disk %q: %s is %d bytes, not a non-zero multiple of 2 MiB (pad it with zeros): %w",
			d.ID, d.Path, size, errdefs.ErrInvalidArgument)
	}
	return st, nil
}

// running returns the QMP client, or an error if the VM is not running.
func (v *VM) running() (*qmp.Client, error) {
	v.mu.Lock()
	defer v.mu.Unlock()
	select {
	case <-v.done:
		return nil, fmt.Errorf("vm has exited: %w", errdefs.ErrFailedPrecondition)
	default:
	}
	if v.qmp == nil || v.stopping {
		return nil, fmt.Errorf("vm is not running: %w", errdefs.ErrFailedPrecondition)
	}
	return v.qmp, nil
}

// AttachDisk hot-plugs d into a free slot: a bridge slot, or the root port of a detached
// cold-plugged disk.
func (v *VM) AttachDisk(ctx context.Context, d vmm.Disk) (vmm.DiskAddress, error) {
	v.opMu.Lock()
	defer v.opMu.Unlock()
	c, err := v.running()
	if err != nil {
		return vmm.DiskAddress{}, err
	}
	return v.attach(ctx, c, d)
}

// attach hot-plugs d into a free slot; the caller holds opMu.
func (v *VM) attach(ctx context.Context, c *qmp.Client, d vmm.Disk) (vmm.DiskAddress, error) {
	st, err := v.checkDisk(d)
	if err != nil {
		return vmm.DiskAddress{}, err
	}
	if addr, ok := v.unpark(d, st); ok {
		log.G(ctx).WithField("disk", d.ID).WithField("pci", addr.PCIPath).Debug("pmem disk reused")
		return addr, nil
	}
	v.mu.Lock()
	s := slices.Index(v.used, false)
	v.mu.Unlock()
	if s < 0 {
		return vmm.DiskAddress{}, fmt.Errorf("disk %q: all %d disk slots in use: %w", d.ID, len(v.used), errdefs.ErrResourceExhausted)
	}
	n := v.nextDev
	v.nextDev++

	// Not ctx: a command QEMU ran after the caller gave up would leave a device or a
	// backend nobody knows about. QMP commands return at once unless QEMU is stuck.
	qctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), qmpTimeout)
	defer cancel()
	qpath := "" // what a jailed QEMU opens instead of d.Path
	var fdset int
	var releaseFD bool // the fd set is QEMU's to close when attach returns
	if v.jailed() {
		f, err := v.openDisk(d)
		if err != nil {
			return vmm.DiskAddress{}, err
		}
		var fd int
		fdset, fd, err = addFD(qctx, c, f)
		f.Close() // QEMU has its own
		if err != nil {
			return vmm.DiskAddress{}, fmt.Errorf("disk %q: passing its file to qemu: %w", d.ID, err)
		}
		qpath = jailedPath(d, fdset, fd)
		releaseFD = true
		defer func() {
			// A PMEM backend opened the file again through /proc/self/fd; a
			// Block backend uses the set until it is deleted (DetachDisk).
			if releaseFD {
				if err := removeFD(qctx, c, fdset); err != nil {
					log.G(ctx).WithError(err).WithField("disk", d.ID).Warn("closing qemu's descriptor of a disk")
				}
			}
		}()
	}
	be, dev, addr := diskDevices(d, n, v.slots[s], st.Size())
	if qpath != "" {
		be.openedAs(qpath)
	}
	if err := c.Execute(qctx, be.command, be.args, nil); err != nil {
		return vmm.DiskAddress{}, fmt.Errorf("disk %q: %w", d.ID, err)
	}
	if err := c.Execute(qctx, "device_add", dev, nil); err != nil {
		if derr := c.Execute(qctx, be.del, be.delArgs, nil); derr != nil {
			log.G(ctx).WithError(derr).WithField("disk", d.ID).Warn("removing the backend of a failed disk")
		}
		return vmm.DiskAddress{}, fmt.Errorf("disk %q: %w", d.ID, err)
	}
	v.mu.Lock()
	v.used[s] = true
	v.disks[d.ID] = &disk{Disk: d, file: st, devID: dev["id"].(string), slot: s, addr: addr, backend: be}
	if d.Kind == vmm.Block && releaseFD {
		v.disks[d.ID].fdset = &fdset
		releaseFD = false // kept until DetachDisk
	}
	v.mu.Unlock()
	log.G(ctx).WithField("disk", d.ID).WithField("pci", addr.PCIPath).Debug("disk attached")
	return addr, nil
}

// Address returns the guest address of an attached disk.
func (v *VM) Address(id string) (vmm.DiskAddress, error) {
	v.mu.Lock()
	defer v.mu.Unlock()
	d, ok := v.disks[id]
	if !ok {
		return vmm.DiskAddress{}, fmt.Errorf("disk %q: %w", id, errdefs.ErrNotFound)
	}
	return d.addr, nil
}

// DetachDisk unplugs the disk: device_del, wait for the guest to release it
// (DEVICE_DELETED), then remove its backend. Other disk changes may proceed while it
// waits for the guest.
func (v *VM) DetachDisk(ctx context.Context, id string) error {
	gone, err := v.requestUnplug(ctx, id)
	if err != nil {
		return err
	}
	select {
	case <-gone:
	case <-v.done:
		return fmt.Errorf("disk %q: vm exited while unplugging: %w", id, errdefs.ErrFailedPrecondition)
	case <-v.stopCh:
		return fmt.Errorf("disk %q: vm stopped while unplugging: %w", id, errdefs.ErrFailedPrecondition)
	case <-ctx.Done():
		return fmt.Errorf("disk %q: waiting for the guest to release the device: %w", id, ctx.Err())
	}

	v.opMu.Lock()
	defer v.opMu.Unlock()
	v.mu.Lock()
	d, ok := v.disks[id]
	v.mu.Unlock()
	if !ok || d.gone != gone {
		return nil // a concurrent DetachDisk of the same disk finished the job
	}
	c, err := v.running()
	if err != nil {
		return err
	}
	qctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), qmpTimeout)
	defer cancel()
	if err := c.Execute(qctx, d.backend.del, d.backend.delArgs, nil); err != nil {
		return fmt.Errorf("disk %q: removing its backend: %w", id, err)
	}
	if d.fdset != nil {
		if err := removeFD(qctx, c, *d.fdset); err != nil {
			log.G(ctx).WithError(err).WithField("disk", id).Warn("closing qemu's descriptor of a disk")
		}
	}
	v.mu.Lock()
	delete(v.disks, id)
	v.used[d.slot] = false
	v.mu.Unlock()
	log.G(ctx).WithField("disk", id).Debug("disk detached")
	return nil
}

// requestUnplug sends device_del for the disk, once, and returns the channel that
// DEVICE_DELETED closes.
func (v *VM) requestUnplug(ctx context.Context, id string) (<-chan struct{}, error) {
	v.opMu.Lock()
	defer v.opMu.Unlock()
	v.mu.Lock()
	d, ok := v.disks[id]
	v.mu.Unlock()
	if !ok {
		return nil, fmt.Errorf("disk %q: %w", id, errdefs.ErrNotFound)
	}
	if d.gone != nil {
		return d.gone, nil // already requested; wait again
	}
	c, err := v.running()
	if err != nil {
		return nil, err
	}
	gone := make(chan struct{})
	v.mu.Lock()
	if v.ejected[d.devID] {
		delete(v.ejected, d.devID)
		v.mu.Unlock()
		close(gone)
		d.gone = gone
		return gone, nil
	}
	v.unplug[d.devID] = gone
	v.mu.Unlock()
	qctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), qmpTimeout)
	defer cancel()
	if err := c.Execute(qctx, "device_del", map[string]any{"id": d.devID}, nil); err != nil {
		v.mu.Lock()
		delete(v.unplug, d.devID)
		v.mu.Unlock()
		var qerr *qmp.Error
		if d.Kind == vmm.PMEM && errors.As(err, &qerr) && qerr.Class == "GenericError" {
			v.mu.Lock()
			delete(v.disks, id)
			v.parked = append(v.parked, d)
			v.mu.Unlock()
			return nil, fmt.Errorf("disk %q: qemu cannot unplug virtio-pmem devices; it stays attached, and attaching the same file again reuses it: %w: %w",
				id, errdefs.ErrNotImplemented, err)
		}
		return nil, fmt.Errorf("disk %q: %w", id, err)
	}
	d.gone = gone
	return gone, nil
}

// unpark gives a parked PMEM device of the same file (same inode, same read-only mode)
// the new disk's id.
func (v *VM) unpark(d vmm.Disk, st os.FileInfo) (vmm.DiskAddress, bool) {
	if d.Kind != vmm.PMEM {
		return vmm.DiskAddress{}, false
	}
	v.mu.Lock()
	defer v.mu.Unlock()
	for i, p := range v.parked {
		if p.ReadOnly == d.ReadOnly && os.SameFile(p.file, st) && p.file.Size() == st.Size() {
			v.parked = append(v.parked[:i], v.parked[i+1:]...)
			p.Disk = d
			v.disks[d.ID] = p
			return p.addr, true
		}
	}
	return vmm.DiskAddress{}, false
}
