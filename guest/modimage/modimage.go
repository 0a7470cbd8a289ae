// Package modimage builds the guest kernel's modules image: a read-only EROFS holding the
// kernel's whole module tree (one directory per kernel release, as /lib/modules has
// them, with the files depmod writes), which the shim attaches to every pod VM and the
// agent mounts on /lib/modules/$(uname -r), so that the kernel loads any module on demand
// (request_module, through the guest's modprobe) while the initramfs carries only the
// modules the boot needs.
package modimage

import (
	"context"
	"crypto/sha256"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strings"

	"github.com/containerd/errdefs"

	"github.com/caisson-containers/caisson/guest/initramfs"
	"github.com/caisson-containers/caisson/guest/initramfs/moddep"
)

// FileName is the image's name beside the guest kernel and initramfs.
const FileName = "modules.erofs"

// Alignment is the size the image is padded to a multiple of: a virtio-pmem device's
// (vmm.PMEMAlignment), so that it can be mapped into the guest with DAX.
const Alignment = 2 << 20

// Image describes the modules image.
type Image struct {
	// Dir is the kernel's /lib/modules/RELEASE tree, with the files depmod wrote
	// (modules.dep, modules.alias, ...).
	Dir string
	// Release is the kernel's `uname -r`: the image's one top directory.
	Release string
}

// Build writes the image to out (replacing it once it is whole). Module signatures are
// stripped, as in the initramfs (see initramfs.StripModuleSignature). The same inputs give
// the same bytes: every file is root's, every timestamp zero, and the filesystem UUID is
// derived from the release.
func Build(ctx context.Context, img Image, out string) (retErr error) {
	if img.Release == "" || strings.ContainsRune(img.Release, '/') {
		return fmt.Errorf("kernel release %q: %w", img.Release, errdefs.ErrInvalidArgument)
	}
	if _, err := os.Stat(filepath.Join(img.Dir, moddep.FileName)); err != nil {
		return fmt.Errorf("module tree %s has no %s (run depmod): %w", img.Dir, moddep.FileName, errdefs.ErrNotFound)
	}
	stage, err := os.MkdirTemp(filepath.Dir(out), ".modules-*")
	if err != nil {
		return err
	}
	defer os.RemoveAll(stage)
	if err := copyTree(img.Dir, filepath.Join(stage, img.Release)); err != nil {
		return err
	}
	tmp := out + ".tmp"
	defer func() {
		if retErr != nil {
			os.Remove(tmp)
		}
	}()
	cmd := exec.CommandContext(ctx, "mkfs.erofs", "--quiet", "--all-root", "-T0", "-x-1", "-U", uuidOf(img.Release), tmp, stage)
	if b, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("mkfs.erofs %s: %w: %s", tmp, err, b)
	}
	if err := Pad(tmp); err != nil {
		return err
	}
	return os.Rename(tmp, out)
}

// copyTree copies the regular files and directories of src into dst, module files
// without their signatures. Symbolic links (a package's build and source links to
// kernel headers) are left out.
func copyTree(src, dst string) error {
	return filepath.WalkDir(src, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, err := filepath.Rel(src, p)
		if err != nil {
			return err
		}
		target := filepath.Join(dst, rel)
		switch {
		case d.IsDir():
			return os.MkdirAll(target, 0o755)
		case !d.Type().IsRegular():
			return nil
		}
		b, err := os.ReadFile(p)
		if err != nil {
			return err
		}
		if strings.HasSuffix(p, ".ko") {
			if b, err = initramfs.StripModuleSignature(b); err != nil {
				return fmt.Errorf("module %s: %w", rel, err)
			}
		}
		return os.WriteFile(target, b, 0o644)
	})
}

// uuidOf is the image's filesystem UUID: mkfs.erofs picks a random one otherwise.
func uuidOf(release string) string {
	h := sha256.Sum256([]byte("caisson modules image " + release))
	h[6] = h[6]&0x0f | 0x50 // a name-based UUID's version and variant bits
	h[8] = h[8]&0x3f | 0x80
	return fmt.Sprintf("%x-%x-%x-%x-%x", h[0:4], h[4:6], h[6:8], h[8:10], h[10:16])
}

// Pad extends the file at path with zeros to a multiple of Alignment.
func Pad(path string) error {
	st, err := os.Stat(path)
	if err != nil {
		return err
	}
	if r := st.Size() % Alignment; r != 0 || st.Size() == 0 {
		return os.Truncate(path, st.Size()+Alignment-r)
	}
	return nil
}

// Info is what an image holds.
type Info struct {
	// Releases are the kernel releases it has modules for.
	Releases []string
	// Modules counts the modules of each release (its modules.dep's lines).
	Modules map[string]int
}

// Beside is where the modules image of the guest kernel at kernel is: FileName in the
// kernel's directory, where `make guest` and the installation put it.
func Beside(kernel string) string {
	return filepath.Join(filepath.Dir(kernel), FileName)
}
