package hostcheck

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/caisson-containers/caisson/guest/initramfs"
	"github.com/caisson-containers/caisson/guest/modimage"
	"github.com/caisson-containers/caisson/shim/config"
)

func TestGuestModules(t *testing.T) {
	if _, err := exec.LookPath("mkfs.erofs"); err != nil {
		t.Skip("mkfs.erofs not installed (erofs-utils)")
	}
	src := t.TempDir()
	write := func(name, content string) string {
		p := filepath.Join(src, name)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
		return p
	}
	dep := write("mods/modules.dep", "kernel/virtio.ko:\nkernel/erofs.ko:\nkernel/bridge.ko: kernel/llc.ko\nkernel/llc.ko:\n")
	for _, m := range []string{"virtio", "erofs", "bridge", "llc"} {
		write("mods/kernel/"+m+".ko", m)
	}
	guest := t.TempDir()
	a, err := initramfs.Build(initramfs.Image{Agent: write("agent", "agent"), KernelRelease: "6.1.0-test",
		ModulesDir: filepath.Join(src, "mods"), ModulesDep: dep, Modules: []string{"virtio", "erofs"}})
	if err != nil {
		t.Fatal(err)
	}
	f, err := os.Create(filepath.Join(guest, "initramfs.cpio.lz4"))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := a.WriteTo(f); err != nil {
		t.Fatal(err)
	}
	f.Close()
	cfg := config.Default(guest)
	image := modimage.Beside(cfg.Guest.Kernel)

	for _, tc := range []struct {
		name    string
		release string // of the image; "" for none
		status  Status
		words   []string
	}{
		{name: "no image", status: Warn, words: []string{"no modules image", "make guest"}},
		{name: "image", release: "6.1.0-test", status: OK, words: []string{image, "the other 2 of kernel 6.1.0-test's 4 modules, loaded on demand"}},
		{name: "another kernel's", release: "6.1.0-other", status: Warn, words: []string{"6.1.0-other", "6.1.0-test", "make guest"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			os.Remove(image)
			if tc.release != "" {
				if err := modimage.Build(context.Background(), modimage.Image{Dir: filepath.Join(src, "mods"), Release: tc.release}, image); err != nil {
					t.Fatal(err)
				}
			}
			m := byItem(guestModules(cfg))
			if p := m["guest-preload"]; p.Status != OK || !strings.Contains(p.Detail, "2 modules loaded at boot from the initramfs: erofs virtio") {
				t.Errorf("guest-preload: %+v", p)
			}
			r := m["guest-modules"]
			if r.Status != tc.status {
				t.Errorf("status %s, want %s: %s", r.Status, tc.status, r.Detail)
			}
			for _, w := range tc.words {
				if !strings.Contains(r.Detail, w) {
					t.Errorf("%q does not say %q", r.Detail, w)
				}
			}
		})
	}
}
