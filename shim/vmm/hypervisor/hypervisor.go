// Package hypervisor chooses the VMM of a shim configuration: the one place that knows
// every vmm.Hypervisor implementation. The shim's task service and tools get their
// hypervisor here and hand it down (pod.Options.Hypervisor, template.Get), so that
// packages pod and template depend on the vmm interfaces only; a second VMM is a new
// package beside shim/vmm/qemu, chosen here.
package hypervisor

import (
	"github.com/caisson-containers/caisson/shim/config"
	"github.com/caisson-containers/caisson/shim/vmm"
	"github.com/caisson-containers/caisson/shim/vmm/qemu"
)

// New returns the hypervisor of cfg's pod VMs: QEMU, the only VMM so far.
func New(cfg config.Config) (vmm.Hypervisor, error) {
	return qemu.NewHypervisor(cfg), nil
}
