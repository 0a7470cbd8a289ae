package qemu

import (
	"fmt"
	"os/exec"

	"github.com/containerd/errdefs"
)

// Config holds the QEMU-specific settings of the shim's VMM; vmm.Config describes the VM.
type Config struct {
	// Path is the qemu-system-x86_64 binary. Default: qemu-system-x86_64 on PATH.
	Path string `toml:"path"`
	// TCGTranslationCacheMiB bounds TCG's translation cache (QEMU's -accel tcg,tb-size),
	// which is most of QEMU's memory when KVM is not available. 0 keeps QEMU's default
	// (1 GiB of address space in QEMU 7.2, touched as the guest runs code). Ignored with KVM.
	TCGTranslationCacheMiB int `toml:"tcg_translation_cache_mib"`
	// FreePageReporting adds a virtio-balloon device with free-page-reporting=on, through
	// which a guest that loads virtio_balloon (Caisson's does, at boot) hands back the
	// memory it freed: the kernel and the agent touch and free tens of MiB while they
	// start. The shim's hypervisor.free_page_reporting (default true) sets it. VMs of a
	// template never get the device (cmdline.go's deviceArgs says why).
	FreePageReporting bool `toml:"free_page_reporting"`
	// AccelCacheDir keeps the results of the accelerator probe (see package accel) for
	// the current host boot, so that only the first VM pays for it. Empty: no cache.
	AccelCacheDir string `toml:"accel_cache_dir"`
	// Jail, if set, runs QEMU as an unprivileged user in a mount namespace holding only
	// its files (jailed.go). Nil: QEMU runs as the shim's user, confined by -sandbox only.
	Jail *Jail `toml:"-"`
}

const defaultBinary = "qemu-system-x86_64"

// Binary is the QEMU executable VMs of c run: Path, or qemu-system-x86_64, looked up on
// PATH when it has no slash.
func (c Config) Binary() (string, error) {
	p := c.Path
	if p == "" {
		p = defaultBinary
	}
	bin, err := exec.LookPath(p)
	if err != nil {
		return "", fmt.Errorf("qemu: %w: %w", errdefs.ErrNotFound, err)
	}
	return bin, nil
}
