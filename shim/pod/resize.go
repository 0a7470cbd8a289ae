package pod

import (
	"context"
	"fmt"
	"time"

	"github.com/containerd/errdefs"
	"github.com/containerd/errdefs/pkg/errgrpc"
	"github.com/containerd/log"

	agent "github.com/caisson-containers/caisson/api/agent/v1"
	"github.com/caisson-containers/caisson/shim/config"
	"github.com/caisson-containers/caisson/shim/vmm"
)

// sizeOf is the VM size cfg asks for.
func sizeOf(cfg config.Config) vmm.Size {
	return vmm.Size{MemoryMiB: cfg.Hypervisor.MemoryMiB, VCPUs: max(cfg.Hypervisor.VCPUs, 1)}
}

// baseSize is the size a pod's VM from a template starts at: o.BaseSize, the runtime
// configuration's before the pod's additions, or cfg's.
func baseSize(cfg config.Config, o Options) vmm.Size {
	if o.BaseSize == (vmm.Size{}) {
		return sizeOf(cfg)
	}
	return o.BaseSize
}

// Size is the VM's size now: what it booted with and what Grow added (memory rounded
// up to the guest's memory block).
func (p *Pod) Size() vmm.Size {
	p.sizeMu.Lock()
	defer p.sizeMu.Unlock()
	return p.size
}

// Base is the runtime configuration's VM size before the pod's additions (its
// annotations, its CRI resources): a pod's own needs are counted above it.
func (p *Pod) Base() vmm.Size { return p.base }

// Grow makes the VM at least want: the VMM hot-plugs the missing memory and vCPUs, the
// guest's agent onlines them, and the pod's host cgroup is raised to the new size. A
// want the VM already has is no change; one above the host's hypervisor.max_memory_mib
// or max_vcpus is an InvalidArgument error naming the limit, and nothing changes.
func (p *Pod) Grow(ctx context.Context, want vmm.Size) error {
	p.sizeMu.Lock()
	defer p.sizeMu.Unlock()
	want = vmm.Size{MemoryMiB: max(want.MemoryMiB, p.size.MemoryMiB), VCPUs: max(want.VCPUs, p.size.VCPUs)}
	if want == p.size {
		return nil
	}
	h := p.cfg.Hypervisor
	switch {
	case want.VCPUs > h.MaxVCPUs:
		return fmt.Errorf("grow the pod's VM to %d vCPUs: above this host's hypervisor.max_vcpus = %d: %w", want.VCPUs, h.MaxVCPUs, errdefs.ErrInvalidArgument)
	case want.MemoryMiB > h.MaxMemoryMiB:
		return fmt.Errorf("grow the pod's VM to %d MiB of memory: above this host's hypervisor.max_memory_mib = %d: %w", want.MemoryMiB, h.MaxMemoryMiB, errdefs.ErrInvalidArgument)
	}
	// Raised first: the guest may use the memory as soon as it is plugged.
	if err := p.raiseCgroup(want); err != nil {
		return err
	}
	start := time.Now()
	got, err := p.vm.Resize(ctx, want)
	if got != (vmm.Size{}) {
		p.size = got
	}
	if err != nil {
		return fmt.Errorf("grow the pod's VM: %w", err)
	}
	if got != want { // memory rounded up to the guest's memory block
		if err := p.raiseCgroup(got); err != nil {
			return err
		}
	}
	plugged := time.Since(start)
	resp, err := agent.NewResourcesClient(p.client).Resize(ctx, &agent.ResizeRequest{Vcpus: uint32(got.VCPUs), MemoryMib: uint64(got.MemoryMiB)})
	if err != nil {
		return fmt.Errorf("bring the pod's grown VM into use in the guest: %w", errgrpc.ToNative(err))
	}
	log.G(ctx).WithField("memory_mib", got.MemoryMiB).WithField("vcpus", got.VCPUs).
		WithField("guest_mem_total_kib", resp.MemTotalKib).WithField("hotplug", plugged).
		WithField("took", time.Since(start)).Info("pod VM grown")
	return nil
}

// raiseCgroup raises the limits of the pod's host cgroup to a VM of size s.
func (p *Pod) raiseCgroup(s vmm.Size) error {
	c, ok := p.cgroup.(*vmCgroup)
	if !ok {
		return nil // none of the VM's limits (NoCgroup)
	}
	cfg := p.cfg
	cfg.Hypervisor.MemoryMiB, cfg.Hypervisor.VCPUs = s.MemoryMiB, s.VCPUs
	c.limits = cgroupLimits(cfg)
	if !c.applied {
		return nil // set when QEMU is added
	}
	if err := c.m.Set(c.limits); err != nil {
		return fmt.Errorf("raise the pod's cgroup %s to a VM of %d MiB and %d vCPUs: %w", c.path, s.MemoryMiB, s.VCPUs, err)
	}
	return nil
}
