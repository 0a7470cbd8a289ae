package service

import (
	"context"
	"fmt"

	"github.com/containerd/errdefs"
	specs "github.com/opencontainers/runtime-spec/specs-go"

	agent "github.com/caisson-containers/caisson/api/agent/v1"
	"github.com/caisson-containers/caisson/guest/agent/container"
	"github.com/caisson-containers/caisson/guest/agent/storage"
)

// containerDevices puts the guest's devices into a container's spec: the disks the
// shim attached for its host block devices, and for a privileged container the
// guest's /dev (see CreateContainerRequest).
func (a *Agent) containerDevices(ctx context.Context, spec *specs.Spec, req *agent.CreateContainerRequest) error {
	finder := storage.DefaultFinder
	if a.cfg.Finder != nil {
		finder = *a.cfg.Finder
	}
	var devs []container.BlockDevice
	for _, b := range req.GetBlockDevices() {
		d := b.GetDevice()
		if d.GetKind() != agent.DeviceKind_DEVICE_KIND_BLOCK {
			return fmt.Errorf("block device %d: device kind %v: %w", b.GetDeviceIndex(), d.GetKind(), errdefs.ErrInvalidArgument)
		}
		fctx, cancel := context.WithTimeout(ctx, defaultDeviceTimeout)
		node, err := finder.Find(fctx, storage.Device{PCIPath: d.GetPciPath(), Serial: d.GetSerial()})
		cancel()
		if err != nil {
			return fmt.Errorf("block device %d: %w", b.GetDeviceIndex(), err)
		}
		devs = append(devs, container.BlockDevice{Index: int(b.GetDeviceIndex()), Node: node})
	}
	if err := container.UseBlockDevices(spec, devs); err != nil {
		return err
	}
	if req.GetGuestDevices() {
		return container.AddGuestDevices(spec)
	}
	return nil
}
