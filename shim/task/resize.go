package task

import (
	"context"
	"encoding/json"
	"fmt"
	"sync"

	"github.com/containerd/errdefs"
	specs "github.com/opencontainers/runtime-spec/specs-go"

	"github.com/caisson-containers/caisson/shim/config"
	"github.com/caisson-containers/caisson/shim/pod"
	"github.com/caisson-containers/caisson/shim/vmm"
)

// podLimits are the memory limit (MiB) and CPUs of each of the pod's containers, as
// created or last updated: the pod's VM must hold their sum above its base size.
type podLimits struct {
	mu   sync.Mutex
	byID map[string]vmm.Size
}

// limitsOf is what r limits a container to: its memory limit rounded up to a MiB and
// its CFS quota rounded up to whole CPUs; 0 where unlimited.
func limitsOf(r *specs.LinuxResources) vmm.Size {
	var s vmm.Size
	if r == nil {
		return s
	}
	if m := r.Memory; m != nil && m.Limit != nil && *m.Limit > 0 {
		s.MemoryMiB = int((*m.Limit + 1<<20 - 1) >> 20)
	}
	if c := r.CPU; c != nil && c.Quota != nil && *c.Quota > 0 && c.Period != nil && *c.Period > 0 {
		s.VCPUs = int((uint64(*c.Quota) + *c.Period - 1) / *c.Period)
	}
	return s
}

// set records container id's limits.
func (l *podLimits) set(id string, s vmm.Size) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.byID == nil {
		l.byID = map[string]vmm.Size{}
	}
	l.byID[id] = s
}

// sum is the limits of the containers live says are the pod's, with id's as s; the
// others' records are dropped.
func (l *podLimits) sum(id string, s vmm.Size, live func(string) bool) vmm.Size {
	l.mu.Lock()
	defer l.mu.Unlock()
	total := s
	for other, o := range l.byID {
		switch {
		case other == id:
		case !live(other):
			delete(l.byID, other)
		default:
			total.MemoryMiB += o.MemoryMiB
			total.VCPUs += o.VCPUs
		}
	}
	return total
}

// basePodSize is the VM size of cfg, the runtime configuration before the pod's
// annotations and CRI resources: the size of the template its pod starts from.
func basePodSize(cfg config.Config) vmm.Size {
	return vmm.Size{MemoryMiB: cfg.Hypervisor.MemoryMiB, VCPUs: max(cfg.Hypervisor.VCPUs, 1)}
}

// growForUpdate grows the pod's VM when container id's new resources (the JSON of an
// OCI LinuxResources) bring the pod's containers' limits beyond it: the VM holds the
// base size plus every container's limits, as the CRI's sandbox resources sized it at
// its start. Above the host's hypervisor.max_memory_mib or max_vcpus it is an
// InvalidArgument error, and neither the VM nor the container changes. It returns the
// limits to record once the update is done.
func (s *service) growForUpdate(ctx context.Context, pd *pod.Pod, id string, resources []byte) (vmm.Size, error) {
	var r specs.LinuxResources
	if len(resources) > 0 {
		if err := json.Unmarshal(resources, &r); err != nil {
			return vmm.Size{}, fmt.Errorf("container %s: resources: %v: %w", id, err, errdefs.ErrInvalidArgument)
		}
	}
	lim := limitsOf(&r)
	total := s.limits.sum(id, lim, func(other string) bool {
		_, err := s.container(other)
		return err == nil
	})
	base := pd.Base()
	want := vmm.Size{MemoryMiB: base.MemoryMiB + total.MemoryMiB, VCPUs: base.VCPUs + total.VCPUs}
	if err := pd.Grow(ctx, want); err != nil {
		return vmm.Size{}, fmt.Errorf("container %s: its new resources need a VM of %d MiB and %d vCPUs (the base %d MiB and %d vCPUs, and the pod's containers' limits): %w",
			id, want.MemoryMiB, want.VCPUs, base.MemoryMiB, base.VCPUs, err)
	}
	return lim, nil
}
