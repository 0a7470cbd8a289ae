package pod

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"strconv"
	"time"

	"github.com/containerd/errdefs"
	"github.com/containerd/log"

	agent "github.com/caisson-containers/caisson/api/agent/v1"
	"github.com/caisson-containers/caisson/shim/vmm"
)

// BlockDevice is a host block device a container asked for (a CRI raw block volume:
// an OCI linux.devices entry of type "b").
type BlockDevice struct {
	// Index is the entry's index in the container's spec linux.devices.
	Index int
	// Path is the host's device node, e.g. /dev/loop3.
	Path string
	// ReadOnly makes the guest's disk read-only: the container may not write to it.
	ReadOnly bool
}

// AttachBlockDevices hot-plugs each device into the VM as a virtio-blk disk of its own,
// for container id, and returns where the guest finds them and a release function
// that unplugs them (call it once the container is gone from the guest). On error,
// nothing stays attached.
//
// Each container's device is a disk of its own, even when two containers of the pod
// pass the same host device: QEMU's image locking then refuses a second writer, as it
// would refuse two VMs writing one disk.
func (p *Pod) AttachBlockDevices(ctx context.Context, id string, devs []BlockDevice) (_ []*agent.BlockDevice, release func(context.Context) error, retErr error) {
	var attached []string
	release = func(ctx context.Context) error {
		var errs []error
		for i := len(attached) - 1; i >= 0; i-- {
			if err := p.vm.DetachDisk(ctx, attached[i]); err != nil && !errdefs.IsNotFound(err) {
				errs = append(errs, fmt.Errorf("detach block device: %w", err))
			}
		}
		attached = nil
		return errors.Join(errs...)
	}
	defer func() {
		if retErr != nil {
			if err := release(context.WithoutCancel(ctx)); err != nil {
				log.G(ctx).WithError(err).Warn("detaching block devices after a failed attach")
			}
		}
	}()
	var out []*agent.BlockDevice
	for _, d := range devs {
		disk := vmm.Disk{ID: blockDeviceID(id, d.Index), Path: d.Path, ReadOnly: d.ReadOnly, Kind: vmm.Block}
		start := time.Now()
		addr, err := p.vm.AttachDisk(ctx, disk)
		if err != nil {
			return nil, nil, fmt.Errorf("block device %s: %w", d.Path, err)
		}
		attached = append(attached, disk.ID)
		log.G(ctx).WithFields(log.Fields{"device": d.Path, "disk": disk.ID, "readonly": d.ReadOnly, "took": time.Since(start)}).Debug("block device hot-plugged")
		out = append(out, &agent.BlockDevice{DeviceIndex: uint32(d.Index), Device: agentDevice(addr, vmm.Block)})
	}
	return out, release, nil
}

// agentDevice is how the agent finds an attached disk: by its PCI path, the stable
// address, or else by the serial, the fallback the API allows.
func agentDevice(addr vmm.DiskAddress, kind vmm.DiskKind) *agent.Device {
	dev := &agent.Device{Kind: agent.DeviceKind_DEVICE_KIND_BLOCK, PciPath: string(addr.PCIPath)}
	if dev.PciPath == "" {
		dev.Serial = addr.Serial
	}
	if kind == vmm.PMEM {
		dev.Kind = agent.DeviceKind_DEVICE_KIND_PMEM
	}
	return dev
}

// blockDeviceID names container id's disk for its spec device index: unique in the
// pod and, like storage ids, short enough for a virtio-blk serial.
func blockDeviceID(id string, index int) string {
	h := sha256.Sum256([]byte(id + "/" + strconv.Itoa(index)))
	return "b" + hex.EncodeToString(h[:])[:19]
}
