package pod

import (
	"github.com/caisson-containers/caisson/shim/config"
	"github.com/caisson-containers/caisson/shim/vmm/qemu"
)

// jailOf is how cfg's VMs' QEMU is jailed (hypervisor.jailer); nil: not at all.
func jailOf(cfg config.Config) *qemu.Jail {
	if !cfg.Hypervisor.Jailer.Enabled {
		return nil
	}
	return &qemu.Jail{User: cfg.Hypervisor.Jailer.User}
}
