package qemu

import (
	"context"
	"fmt"
	"slices"

	"github.com/containerd/errdefs"

	"github.com/caisson-containers/caisson/shim/vmm"
	"github.com/caisson-containers/caisson/shim/vmm/qemu/qmp"
)

// memoryBlockMiB is the guest's memory block on x86-64 (Linux's MIN_MEMORY_BLOCK_SIZE,
// the block size of a guest with less than 64 GiB at boot): the kernel onlines hot-plugged
// memory in whole blocks and refuses a device that does not start and end on one, so
// Resize rounds the memory it adds up to it and places the device on a block boundary.
const memoryBlockMiB = 128

// Resize grows the VM to want: memory by one pc-dimm of the missing size rounded up
// to memoryBlockMiB (the VM only grows, so a DIMM, which the guest cannot give back
// without unplugging it whole, is enough; virtio-mem would also shrink), vCPUs by
// hot-plugging the missing ones into the free places QEMU lists. The guest kernel onlines
// the memory itself (memhp_default_state=online, cmdline.go); the vCPUs it leaves
// offline until the agent onlines them.
func (v *VM) Resize(ctx context.Context, want vmm.Size) (vmm.Size, error) {
	v.opMu.Lock()
	defer v.opMu.Unlock()
	c, err := v.running()
	if err != nil {
		return vmm.Size{}, err
	}
	mem, err := queryMemoryDevices(ctx, c)
	if err != nil {
		return vmm.Size{}, err
	}
	cpus, err := queryHotpluggableCPUs(ctx, c)
	if err != nil {
		return vmm.Size{}, err
	}
	cur := vmm.Size{MemoryMiB: v.cfg.MemoryMiB + mem.dimmMiB(), VCPUs: cpus.plugged()}
	if err := v.checkResize(cur, want); err != nil {
		return cur, err
	}
	if want.MemoryMiB > cur.MemoryMiB {
		added, err := v.addMemory(ctx, c, mem, want.MemoryMiB-cur.MemoryMiB)
		if err != nil {
			return cur, err
		}
		cur.MemoryMiB += added
	}
	free := cpus.free()
	if len(free) < want.VCPUs-cur.VCPUs {
		return cur, fmt.Errorf("resize the VM to %d vCPUs: QEMU has room for %d more: %w", want.VCPUs, len(free), errdefs.ErrInvalidArgument)
	}
	if want.VCPUs > cur.VCPUs {
		defer v.vcpus.forget() // VCPUTime finds the new vCPUs' threads
	}
	for _, cpu := range free[:want.VCPUs-cur.VCPUs] {
		if err := c.Execute(ctx, "device_add", cpu.device(cur.VCPUs), nil); err != nil {
			return cur, fmt.Errorf("hot-plug vCPU %d: %w", cur.VCPUs, err)
		}
		cur.VCPUs++
	}
	return cur, nil
}

// checkResize refuses a size the VM cannot grow to from cur.
func (v *VM) checkResize(cur, want vmm.Size) error {
	switch {
	case want.MemoryMiB < cur.MemoryMiB || want.VCPUs < cur.VCPUs:
		return fmt.Errorf("resize the VM from %d MiB and %d vCPUs to %d MiB and %d vCPUs: a VM only grows: %w",
			cur.MemoryMiB, cur.VCPUs, want.MemoryMiB, want.VCPUs, errdefs.ErrInvalidArgument)
	case want.VCPUs > v.cfg.MaxVCPUs:
		return fmt.Errorf("resize the VM to %d vCPUs: at most %d (its maximum): %w", want.VCPUs, v.cfg.MaxVCPUs, errdefs.ErrInvalidArgument)
	case roundUp(want.MemoryMiB-cur.MemoryMiB, memoryBlockMiB)+cur.MemoryMiB > v.cfg.MaxMemoryMiB:
		return fmt.Errorf("resize the VM to %d MiB of memory: at most %d MiB (its maximum): %w", want.MemoryMiB, v.cfg.MaxMemoryMiB, errdefs.ErrInvalidArgument)
	}
	return nil
}

// addMemory hot-plugs one DIMM of at least mib MiB, after every memory device the VM
// has, and returns its size.
func (v *VM) addMemory(ctx context.Context, c *qmp.Client, devs memoryDevices, mib int) (int, error) {
	mib = roundUp(mib, memoryBlockMiB)
	n := len(devs.dimms())
	if n >= memorySlots {
		return 0, fmt.Errorf("hot-plug %d MiB of memory: the VM's %d memory slots are used: %w", mib, memorySlots, errdefs.ErrResourceExhausted)
	}
	id := fmt.Sprintf("dimm%d", n)
	backend := map[string]any{"qom-type": "memory-backend-ram", "id": id + "-mem", "size": int64(mib) << 20}
	if v.cfg.SharesMemory() {
		// virtiofsd maps all of the guest's memory: it must be shared, as the boot
		// memory is (cmdline.go).
		backend["qom-type"], backend["share"] = "memory-backend-memfd", true
	}
	if err := c.Execute(ctx, "object-add", backend, nil); err != nil {
		return 0, fmt.Errorf("hot-plug %d MiB of memory: %w", mib, err)
	}
	dev := map[string]any{"driver": "pc-dimm", "id": id, "memdev": id + "-mem"}
	if end := devs.end(); end > 0 {
		// QEMU places a device after the others aligned to its backend's page only: a
		// PMEM disk's 2 MiB multiple would leave the DIMM off a memory block.
		dev["addr"] = roundUp64(end, memoryBlockMiB<<20)
	}
	if err := c.Execute(ctx, "device_add", dev, nil); err != nil {
		if derr := c.Execute(context.WithoutCancel(ctx), "object-del", map[string]any{"id": id + "-mem"}, nil); derr != nil {
			return 0, fmt.Errorf("hot-plug %d MiB of memory: %w (and removing its backend: %v)", mib, err, derr)
		}
		return 0, fmt.Errorf("hot-plug %d MiB of memory: %w", mib, err)
	}
	return mib, nil
}

func roundUp(n, to int) int { return (n + to - 1) / to * to }

func roundUp64(n, to uint64) uint64 { return (n + to - 1) / to * to }

// memoryDevices are QEMU's query-memory-devices: DIMMs and PMEM disks, each placed in
// the memory above the guest's RAM.
type memoryDevices []struct {
	Type string `json:"type"`
	Data struct {
		ID      string `json:"id"`
		Addr    uint64 `json:"addr"`    // dimm, nvdimm
		MemAddr uint64 `json:"memaddr"` // virtio-pmem, virtio-mem
		Size    uint64 `json:"size"`
	} `json:"data"`
}

func queryMemoryDevices(ctx context.Context, c *qmp.Client) (memoryDevices, error) {
	var devs memoryDevices
	if err := c.Execute(ctx, "query-memory-devices", nil, &devs); err != nil {
		return nil, fmt.Errorf("query the VM's memory devices: %w", err)
	}
	return devs, nil
}

// dimms are the ids of the DIMMs.
func (m memoryDevices) dimms() []string {
	var ids []string
	for _, d := range m {
		if d.Type == "dimm" {
			ids = append(ids, d.Data.ID)
		}
	}
	return ids
}

// dimmMiB is the memory the DIMMs add.
func (m memoryDevices) dimmMiB() int {
	var n uint64
	for _, d := range m {
		if d.Type == "dimm" {
			n += d.Data.Size
		}
	}
	return int(n >> 20)
}

// end is the first address after every device, 0 without devices.
func (m memoryDevices) end() uint64 {
	var end uint64
	for _, d := range m {
		end = max(end, d.Data.Addr+d.Data.Size, d.Data.MemAddr+d.Data.Size)
	}
	return end
}

// hotpluggableCPUs are QEMU's query-hotpluggable-cpus: every place a vCPU may be, the
// plugged ones with their QOM path.
type hotpluggableCPUs []hotpluggableCPU

type hotpluggableCPU struct {
	Type    string         `json:"type"`
	Props   map[string]int `json:"props"`
	QOMPath string         `json:"qom-path"`
}

func queryHotpluggableCPUs(ctx context.Context, c *qmp.Client) (hotpluggableCPUs, error) {
	var cpus hotpluggableCPUs
	if err := c.Execute(ctx, "query-hotpluggable-cpus", nil, &cpus); err != nil {
		return nil, fmt.Errorf("query the VM's vCPUs: %w", err)
	}
	return cpus, nil
}

func (h hotpluggableCPUs) plugged() int {
	n := 0
	for _, c := range h {
		if c.QOMPath != "" {
			n++
		}
	}
	return n
}

// free are the places with no vCPU, in topology order (socket, die, core, thread), so
// that the guest numbers them as QEMU would have at boot.
func (h hotpluggableCPUs) free() []hotpluggableCPU {
	var f []hotpluggableCPU
	for _, c := range h {
		if c.QOMPath == "" {
			f = append(f, c)
		}
	}
	keys := []string{"node-id", "socket-id", "die-id", "core-id", "thread-id"}
	slices.SortStableFunc(f, func(a, b hotpluggableCPU) int {
		for _, k := range keys {
			if d := a.Props[k] - b.Props[k]; d != 0 {
				return d
			}
		}
		return 0
	})
	return f
}

// device is the device_add of a vCPU in place c, the n-th of the VM.
func (c hotpluggableCPU) device(n int) map[string]any {
	dev := map[string]any{"driver": c.Type, "id": fmt.Sprintf("cpu%d", n)}
	for k, v := range c.Props {
		dev[k] = v
	}
	return dev
}
