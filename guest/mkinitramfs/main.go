// Command mkinitramfs writes the guest's initramfs (see package guest/initramfs). `make
// guest` runs it; the output is the same bytes for the same inputs.
package main

import (
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/caisson-containers/caisson/guest/initramfs"
)

func main() {
	var (
		img     initramfs.Image
		out     string
		modules string
	)
	flag.StringVar(&out, "o", "", "output file (gzip-compressed cpio)")
	flag.StringVar(&img.Agent, "agent", "", "static caisson-agent binary, installed as /init")
	flag.StringVar(&img.KernelRelease, "release", "", "guest kernel release (uname -r)")
	flag.StringVar(&img.ModulesDir, "modules-dir", "", "the kernel's lib/modules/RELEASE directory")
	flag.StringVar(&img.ModulesDep, "modules-dep", "", "modules.dep for that directory (from depmod)")
	flag.StringVar(&modules, "modules", "", "comma-separated modules to load at boot (their dependencies are added)")
	flag.StringVar(&img.Busybox, "busybox", "", "static busybox for a debug image (optional)")
	flag.Parse()
	if out == "" || img.Agent == "" || img.KernelRelease == "" || img.ModulesDir == "" || img.ModulesDep == "" {
		flag.Usage()
		os.Exit(2)
	}
	if modules != "" {
		img.Modules = strings.Split(modules, ",")
	}
	if err := run(img, out); err != nil {
		fmt.Fprintln(os.Stderr, "mkinitramfs:", err)
		os.Exit(1)
	}
}

func run(img initramfs.Image, out string) (retErr error) {
	a, err := initramfs.Build(img)
	if err != nil {
		return err
	}
	tmp, err := os.CreateTemp(filepath.Dir(out), ".initramfs-*")
	if err != nil {
		return err
	}
	defer func() {
		if retErr != nil {
			tmp.Close()
			os.Remove(tmp.Name())
		}
	}()
	if _, err := a.WriteTo(tmp); err != nil {
		return err
	}
	if err := tmp.Chmod(0o644); err != nil {
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	return os.Rename(tmp.Name(), out)
}
