package initramfs

import (
	"bytes"
	"fmt"
	"os"
	"path"
	"path/filepath"
	"strings"
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
	// Modules are the modules the guest loads at boot; their dependencies come along.
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
	dep, err := ParseModulesDep(bytes.NewReader(depFile))
	if err != nil {
		return nil, err
	}
	mods, err := dep.Closure(img.Modules)
	if err != nil {
		return nil, err
	}
	modRoot := path.Join("lib/modules", img.KernelRelease)
	for _, m := range mods {
		if err := a.CopyFile(path.Join(modRoot, m), 0o644, filepath.Join(img.ModulesDir, filepath.FromSlash(m))); err != nil {
			return nil, fmt.Errorf("module %s: %w", m, err)
		}
	}
	if err := a.File(path.Join(modRoot, LoadListName), 0o644, []byte(strings.Join(mods, "\n")+"\n")); err != nil {
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
