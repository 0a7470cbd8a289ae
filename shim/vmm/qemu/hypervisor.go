package qemu

import (
	"path/filepath"
	"strconv"

	"github.com/caisson-containers/caisson/shim/config"
	"github.com/caisson-containers/caisson/shim/vmm"
	"github.com/caisson-containers/caisson/shim/vmm/qemu/accel"
)

// Hypervisor makes QEMU VMs with the settings of one shim configuration.
type Hypervisor struct {
	qcfg Config
}

var _ vmm.Hypervisor = (*Hypervisor)(nil)

// NewHypervisor is the QEMU of cfg's pod VMs: its binary, translation cache, free page
// reporting, accelerator probe cache and jail (hypervisor.*).
func NewHypervisor(cfg config.Config) vmm.Hypervisor {
	return &Hypervisor{qcfg: Config{
		Path:                   cfg.Hypervisor.Path,
		TCGTranslationCacheMiB: cfg.Hypervisor.TCGTranslationCacheMiB,
		FreePageReporting:      cfg.Hypervisor.FreePageReporting,
		AccelCacheDir:          filepath.Join(cfg.StateDir, "probes"),
		Jail:                   jailOf(cfg),
	}}
}

// jailOf is how cfg's VMs' QEMU is jailed (hypervisor.jailer); nil: not at all.
func jailOf(cfg config.Config) *Jail {
	if !cfg.Hypervisor.Jailer.Enabled {
		return nil
	}
	return &Jail{User: cfg.Hypervisor.Jailer.User}
}

// New returns a QEMU VM of cfg, not started yet.
func (h *Hypervisor) New(cfg vmm.Config) (vmm.VM, error) {
	vm, err := New(cfg, h.qcfg)
	if err != nil {
		return nil, err // not a typed nil in the interface
	}
	return vm, nil
}

// Identity is the QEMU binary and the settings that add devices or change the emulation:
// a template saved by one QEMU loads only into the same QEMU with the same devices.
func (h *Hypervisor) Identity() (vmm.Identity, error) {
	bin, err := h.qcfg.Binary()
	if err != nil {
		return vmm.Identity{}, err
	}
	return vmm.Identity{VMM: "qemu", Binary: bin, Settings: map[string]string{
		"tcg_translation_cache_mib": strconv.Itoa(h.qcfg.TCGTranslationCacheMiB),
		"free_page_reporting":       strconv.FormatBool(h.qcfg.FreePageReporting),
		"tcg_cpu":                   accel.CPUModel(accel.TCG),
	}}, nil
}

// MaxBootDisks is how many disks a VM boots with: one PCIe root port each.
func (h *Hypervisor) MaxBootDisks() int { return MaxColdDisks }
