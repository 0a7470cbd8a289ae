package qemu

import (
	"context"
	"fmt"
	"net"
	"os"
	"slices"

	"github.com/containerd/errdefs"

	"github.com/caisson-containers/caisson/shim/vmm"
	"github.com/caisson-containers/caisson/shim/vmm/qemu/qmp"
)

// NICs sit on the root bus from firstNICSlot, before the disks' root ports.
const (
	firstNICSlot = 0x04
	// MaxNICs is how many NICs one VM can have.
	MaxNICs = firstPortSlot - firstNICSlot
	// firstNICFD is the descriptor number of the first tap in QEMU: ExtraFiles start at 3.
	firstNICFD = 3
)

// nicArgs returns the -netdev/-device pairs of the NICs, whose taps QEMU inherits as
// descriptors firstNICFD, firstNICFD+1, ... (see nicFiles). With hot, only the -netdev
// backends: the devices are hot-plugged later (nicDevice).
func nicArgs(nics []vmm.NIC, hot bool) ([]string, error) {
	if len(nics) > MaxNICs {
		return nil, fmt.Errorf("%d NICs, at most %d: %w", len(nics), MaxNICs, errdefs.ErrInvalidArgument)
	}
	var a []string
	for i, n := range nics {
		mac, err := checkNIC(n)
		if err != nil {
			return nil, err
		}
		id := fmt.Sprintf("net%d", i)
		a = append(a, "-netdev", fmt.Sprintf("tap,id=%s,fd=%d", id, firstNICFD+i))
		if hot {
			continue
		}
		// No option ROM (iPXE): nothing boots from the network, and SeaBIOS would
		// initialise the ROM on every boot.
		a = append(a, "-device", fmt.Sprintf("virtio-net-pci,id=%s-dev,netdev=%s,mac=%s,bus=pcie.0,addr=%02x.0,romfile=", id, id, mac, firstNICSlot+i))
	}
	return a, nil
}

// checkNIC refuses a NIC without a tap or with a bad MAC, and returns its MAC.
func checkNIC(n vmm.NIC) (net.HardwareAddr, error) {
	if n.Tap == nil {
		return nil, fmt.Errorf("NIC %q has no tap: %w", n.ID, errdefs.ErrInvalidArgument)
	}
	mac, err := net.ParseMAC(n.MAC)
	if err != nil {
		return nil, fmt.Errorf("NIC %q: mac %q: %v: %w", n.ID, n.MAC, err, errdefs.ErrInvalidArgument)
	}
	return mac, nil
}

// nicDevice is the device_add arguments of NIC i (its backend from nicArgs), not yet
// placed on a bus.
func nicDevice(i int, n vmm.NIC) map[string]any {
	id := fmt.Sprintf("net%d", i)
	return map[string]any{
		"driver":  "virtio-net-pci",
		"id":      id + "-dev",
		"netdev":  id,
		"mac":     n.MAC,
		"romfile": "",
	}
}

// nicFiles are the descriptors QEMU inherits, in nicArgs' order.
func nicFiles(nics []vmm.NIC) []*os.File {
	var f []*os.File
	for _, n := range nics {
		f = append(f, n.Tap)
	}
	return f
}

// plugNIC adds the device of NIC i, whose backend QEMU has, in a free hot-plug slot; the
// caller holds opMu.
func (v *VM) plugNIC(ctx context.Context, c *qmp.Client, i int, n vmm.NIC) error {
	return v.plugInFreeSlot(ctx, c, fmt.Sprintf("NIC %q", n.ID), nicDevice(i, n))
}

// plugInFreeSlot adds dev (device_add arguments, not yet on a bus), named what in errors,
// in the first free hot-plug slot and marks the slot used; the caller holds opMu.
func (v *VM) plugInFreeSlot(ctx context.Context, c *qmp.Client, what string, dev map[string]any) error {
	v.mu.Lock()
	s := slices.Index(v.used, false)
	v.mu.Unlock()
	if s < 0 {
		return fmt.Errorf("%s: no hot-plug slot left: %w", what, errdefs.ErrResourceExhausted)
	}
	v.slots[s].plug(dev)
	if err := c.Execute(ctx, "device_add", dev, nil); err != nil {
		return fmt.Errorf("%s: %w", what, err)
	}
	v.mu.Lock()
	v.used[s] = true
	v.mu.Unlock()
	return nil
}

// AttachNIC hot-plugs n after the VM's NICs: QEMU gets the tap over QMP (getfd), then
// the NIC's backend and device are added in a free hot-plug slot. A failed step undoes
// the ones before it.
func (v *VM) AttachNIC(ctx context.Context, n vmm.NIC) error {
	v.opMu.Lock()
	defer v.opMu.Unlock()
	c, err := v.running()
	if err != nil {
		return err
	}
	if _, err := checkNIC(n); err != nil {
		return err
	}
	v.mu.Lock()
	i := len(v.cfg.NICs) + v.hotNICs
	free := slices.Contains(v.used, false)
	v.mu.Unlock()
	if i >= MaxNICs {
		return fmt.Errorf("NIC %q: the VM has %d NICs already, at most %d: %w", n.ID, i, MaxNICs, errdefs.ErrResourceExhausted)
	}
	if !free {
		return fmt.Errorf("NIC %q: no hot-plug slot left: %w", n.ID, errdefs.ErrResourceExhausted)
	}
	// Not ctx: as in attach, a command QEMU ran after the caller gave up would leave a
	// backend nobody knows about.
	qctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), qmpTimeout)
	defer cancel()
	id := fmt.Sprintf("net%d", i)
	if err := c.ExecuteWithFile(qctx, "getfd", map[string]any{"fdname": id}, nil, n.Tap); err != nil {
		return fmt.Errorf("NIC %q: pass its tap to qemu: %w", n.ID, err)
	}
	if err := c.Execute(qctx, "netdev_add", map[string]any{"type": "tap", "id": id, "fd": id}, nil); err != nil {
		c.Execute(qctx, "closefd", map[string]any{"fdname": id}, nil)
		return fmt.Errorf("NIC %q: %w", n.ID, err)
	}
	if err := v.plugNIC(qctx, c, i, n); err != nil {
		c.Execute(qctx, "netdev_del", map[string]any{"id": id}, nil)
		return err
	}
	v.mu.Lock()
	v.hotNICs++
	v.mu.Unlock()
	return nil
}
