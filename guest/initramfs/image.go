package initramfs

import (
	"bytes"
	"fmt"
	"os"
	"path"
	"path/filepath"

	"github.com/caisson-containers/caisson/guest/initramfs/moddep"
)

// Image describes the guest's initramfs.
type Image struct {
	// Agent is the static caisson-agent binary, installed as /init.
	Agent string
	// KernelRelease is the guest kernel's `uname -r`.
	KernelRelease string
	// ModulesDir is the kernel's unpacked /lib/modules/RELEASE directory (the .ko files).
	ModulesDir string
	// ModulesDep is the modules.dep depmod computed for that tree.
	ModulesDep string
	// Modules are the modules the guest loads at boot; their dependencies come along,
	// without their signatures (see StripModuleSignature), and so does their part of
	// ModulesDep, which tells the agent what to load in which order.
	Modules []string
	// Busybox, if set, is a static busybox installed as /bin/busybox with /bin/sh: the
	// debug image. The production image has no shell.
	Busybox string
}

// Build assembles the archive for img.
func Build(img Image) (*Archive, error) {
	a := NewArchive()
	if err := a.CopyFile("init", 0o755, img.Agent); err != nil {
		return nil, fmt.Errorf("agent: %w", err)
	}
	// No /sbin/modprobe: the agent makes that link to itself when it starts (see
	// guest/agent/boot.SetModprobe), so that the kernel does not run it as modprobe
	// during its own initcalls.
	for _, d := range []string{"dev", "proc", "sys", "run", "tmp", "etc", "mnt"} {
		if err := a.Dir(d, 0o755); err != nil {
			return nil, err
		}
	}
	if err := a.Dir("tmp", 0o1777); err != nil {
		return nil, err
	}
	depFile, err := os.ReadFile(img.ModulesDep)
	if err != nil {
		return nil, err
	}
	dep, err := moddep.Parse(bytes.NewReader(depFile))
	if err != nil {
		return nil, err
	}
	mods, err := dep.Closure(img.Modules)
	if err != nil {
		return nil, err
	}
	modRoot := path.Join("lib/modules", img.KernelRelease)
	for _, m := range mods {
		ko, err := os.ReadFile(filepath.Join(img.ModulesDir, filepath.FromSlash(m)))
		if err != nil {
			return nil, fmt.Errorf("module %s: %w", m, err)
		}
		if ko, err = StripModuleSignature(ko); err != nil {
			return nil, fmt.Errorf("module %s: %w", m, err)
		}
		if err := a.File(path.Join(modRoot, m), 0o644, ko); err != nil {
			return nil, err
		}
	}
	// The image's own modules.dep: the modules it carries, in load order.
	var imageDep bytes.Buffer
	if err := dep.WriteSubset(&imageDep, mods); err != nil {
		return nil, err
	}
	if err := a.File(path.Join(modRoot, moddep.FileName), 0o644, imageDep.Bytes()); err != nil {
		return nil, err
	}
	if img.Busybox != "" {
		if err := a.CopyFile("bin/busybox", 0o755, img.Busybox); err != nil {
			return nil, fmt.Errorf("busybox: %w", err)
		}
		if err := a.Symlink("bin/sh", "busybox"); err != nil {
			return nil, err
		}
	}
	return a, nil
}
