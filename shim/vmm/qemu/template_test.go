package qemu

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"os"
	"path/filepath"
	"testing"

	"github.com/containerd/errdefs"

	"github.com/caisson-containers/caisson/internal/testutil"
	"github.com/caisson-containers/caisson/shim/vmm"
)

// TestTemplate saves a booted VM as a template and starts two VMs from it: each resumes
// where the template was (a file the template's guest wrote in its RAM is there), gets its
// own disk hot-plugged before it resumes, and writes to its RAM without the other VM or the
// template's memory file seeing it.
func TestTemplate(t *testing.T) {
	g := newTestGuest(t)
	dir := t.TempDir()
	saveTemplate(t, g, vmm.Config{HotplugSlots: 2, Template: &vmm.Template{Dir: dir}}, "from-template")
	memSum := fileSum(t, filepath.Join(dir, vmm.TemplateMemory))
	if st, err := os.Stat(filepath.Join(dir, vmm.TemplateState)); err != nil || st.Size() == 0 || st.Size() > 16<<20 {
		t.Fatalf("template state: %v %v (want the devices only, not the RAM)", st, err)
	}

	layers := map[string]string{}
	var shells []*guestShell
	for _, name := range []string{"one", "two"} {
		layers[name] = erofsImage(t, map[string]string{"id": name + "\n"}, vmm.PMEMAlignment)
		vm := startVM(t, g, vmm.Config{HotplugSlots: 2, Template: &vmm.Template{Dir: dir, Restore: true},
			Disks: []vmm.Disk{{ID: "layer", Path: layers[name], ReadOnly: true, Kind: vmm.PMEM}}})
		sh := dialGuest(t, vm.Endpoint(), bootTimeout)
		if got := sh.must(t, "cat /tmp/marker"); got != "from-template\n" {
			t.Fatalf("VM %s restored from the template reads %q from its RAM", name, got)
		}
		addr, err := vm.Address("layer")
		if err != nil {
			t.Fatal(err)
		}
		if addr.PCIPath != hotSlot(0).pciPath {
			t.Fatalf("disk of VM %s at %s, want the first hot-plug slot %s", name, addr.PCIPath, hotSlot(0).pciPath)
		}
		checkPMEM(t, sh, addr, name+"\n")
		sh.must(t, "echo "+name+" > /tmp/marker")
		shells = append(shells, sh)
	}
	for i, name := range []string{"one", "two"} {
		if got := shells[i].must(t, "cat /tmp/marker"); got != name+"\n" {
			t.Fatalf("VM %s reads %q: the VMs share written memory", name, got)
		}
	}
	if !bytes.Equal(fileSum(t, filepath.Join(dir, vmm.TemplateMemory)), memSum) {
		t.Fatal("the template's memory file changed under the VMs made from it")
	}
}

// saveTemplate boots a VM of cfg (its Template names the directory), has its guest write
// marker into /tmp/marker, a file in its RAM, and saves it as a template.
func saveTemplate(t *testing.T, g testGuest, cfg vmm.Config, marker string) {
	t.Helper()
	tmpl := startVM(t, g, cfg)
	sh := dialGuest(t, tmpl.Endpoint(), bootTimeout)
	sh.must(t, "echo "+marker+" > /tmp/marker")
	sh.conn.Close()
	ctx := context.Background()
	if err := tmpl.SaveTemplate(ctx); err != nil {
		t.Fatal(err)
	}
	if err := tmpl.Stop(ctx); err != nil {
		t.Fatal(err)
	}
}

func TestTemplateErrors(t *testing.T) {
	g := newTestGuest(t)
	disk := erofsImage(t, map[string]string{"id": "x\n"}, 0)
	for _, tc := range []struct {
		name string
		cfg  vmm.Config
		want error
	}{
		{"no dir", vmm.Config{Template: &vmm.Template{}}, errdefs.ErrInvalidArgument},
		{"template with a disk", vmm.Config{Template: &vmm.Template{Dir: t.TempDir()}, Disks: []vmm.Disk{{ID: "d", Path: disk, Kind: vmm.Block}}}, errdefs.ErrInvalidArgument},
		{"more disks than slots", vmm.Config{Template: &vmm.Template{Dir: t.TempDir(), Restore: true}, Disks: []vmm.Disk{{ID: "d", Path: disk, Kind: vmm.Block}}}, errdefs.ErrInvalidArgument},
		{"writable template disk", vmm.Config{Template: &vmm.Template{Dir: t.TempDir(), Disks: []vmm.Disk{{ID: "d", Path: disk, Kind: vmm.Block}}}}, errdefs.ErrInvalidArgument},
		{"pmem template disk", vmm.Config{Template: &vmm.Template{Dir: t.TempDir(), Restore: true, Disks: []vmm.Disk{{ID: "d", Path: disk, Kind: vmm.PMEM, ReadOnly: true}}}}, errdefs.ErrInvalidArgument},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tc.cfg.Kernel, tc.cfg.Initramfs, tc.cfg.StateDir = g.kernel, g.initramfs, testutil.ShortTempDir(t)
			if _, err := New(tc.cfg, Config{}); !errors.Is(err, tc.want) {
				t.Fatalf("got %v, want %v", err, tc.want)
			}
		})
	}
	t.Run("no saved template", func(t *testing.T) {
		stateDir := testutil.ShortTempDir(t)
		vm, err := New(vmm.Config{Kernel: g.kernel, Initramfs: g.initramfs, Accelerator: "tcg", StateDir: stateDir,
			Template: &vmm.Template{Dir: t.TempDir(), Restore: true}}, Config{})
		if err != nil {
			t.Fatal(err)
		}
		if err := vm.Start(context.Background()); !errdefs.IsNotFound(err) {
			t.Fatalf("start from an empty template dir: %v, want NotFound", err)
		}
		<-vm.Done()
		if left, _ := os.ReadDir(stateDir); len(left) != 0 {
			t.Fatalf("left in the state dir: %v", left)
		}
	})
}

func fileSum(t *testing.T, path string) []byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	s := sha256.Sum256(b)
	return s[:]
}
