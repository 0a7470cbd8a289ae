// Command mkvmlinux writes the uncompressed vmlinux ELF that a bzImage carries, after
// checking that QEMU can boot it directly (its PVH entry note). `make guest` runs it on
// the kernel package's bzImage; the output is the same bytes for the same input.
package main

import (
	"bytes"
	"flag"
	"fmt"
	"os"
	"path/filepath"

	"github.com/caisson-containers/caisson/guest/vmlinux"
)

func main() {
	var in, out string
	flag.StringVar(&in, "kernel", "", "the kernel's bzImage (LZ4-compressed)")
	flag.StringVar(&out, "o", "", "output file (the vmlinux ELF)")
	flag.Parse()
	if in == "" || out == "" {
		flag.Usage()
		os.Exit(2)
	}
	if err := run(in, out); err != nil {
		fmt.Fprintln(os.Stderr, "mkvmlinux:", err)
		os.Exit(1)
	}
}

func run(in, out string) error {
	bz, err := os.ReadFile(in)
	if err != nil {
		return err
	}
	elf, err := vmlinux.Extract(bz)
	if err != nil {
		return fmt.Errorf("%s: %w", in, err)
	}
	entry, err := vmlinux.PVHEntry(bytes.NewReader(elf))
	if err != nil {
		return fmt.Errorf("%s: %w", in, err)
	}
	// Replace the file whole: running VMs keep the pages of the one they booted.
	tmp, err := os.CreateTemp(filepath.Dir(out), filepath.Base(out)+".tmp*")
	if err != nil {
		return err
	}
	defer os.Remove(tmp.Name())
	if _, err := tmp.Write(elf); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Chmod(0o644); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	if err := os.Rename(tmp.Name(), out); err != nil {
		return err
	}
	fmt.Printf("vmlinux: %d bytes, PVH entry %#x\n", len(elf), entry)
	return nil
}
