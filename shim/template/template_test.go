package template

import (
	"context"
	"errors"
	"io"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/containerd/errdefs"

	agent "github.com/caisson-containers/caisson/api/agent/v1"
	"github.com/caisson-containers/caisson/guest/modimage"
	"github.com/caisson-containers/caisson/internal/testutil"
	"github.com/caisson-containers/caisson/internal/transport"
	"github.com/caisson-containers/caisson/shim/config"
	"github.com/caisson-containers/caisson/shim/vmboot"
	"github.com/caisson-containers/caisson/shim/vmm"
	"github.com/caisson-containers/caisson/shim/vmm/hypervisor"
)

// testHypervisor is the shim's QEMU with its default settings.
func testHypervisor(t *testing.T) vmm.Hypervisor {
	t.Helper()
	hv, err := hypervisor.New(config.Config{StateDir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	return hv
}

// testConfig is the VM config of a template of the real guest, whose initramfs is a copy
// the test can change.
func testConfig(t *testing.T) vmm.Config {
	testutil.RequireRoot(t)
	testutil.RequireBinary(t, "qemu-system-x86_64")
	g := testutil.RequireGuest(t)
	initramfs := filepath.Join(t.TempDir(), "initramfs.cpio.lz4")
	copyFile(t, g.Initramfs, initramfs)
	return vmm.Config{
		Kernel:       g.Kernel,
		Initramfs:    initramfs,
		KernelParams: []string{transport.CmdlineKey + "=" + transport.Endpoint{Kind: transport.Serial}.String(), "quiet"},
		Accelerator:  "tcg",
		HotplugSlots: 2,
	}
}

// TestGet: concurrent Gets of one shape make one template; a later Get finds it; a Get
// after the guest image changed makes a new one and removes the stale one; a VM starts
// from it.
func TestGet(t *testing.T) {
	cfg := testConfig(t)
	hv := testHypervisor(t)
	root := testutil.ShortTempDir(t)
	ctx := context.Background()

	dirs := make([]string, 3)
	var wg sync.WaitGroup
	for i := range dirs {
		wg.Go(func() {
			d, err := Get(ctx, root, hv, cfg)
			if err != nil {
				t.Error(err)
			}
			dirs[i] = d
		})
	}
	wg.Wait()
	if t.Failed() {
		t.FailNow()
	}
	if dirs[0] != dirs[1] || dirs[1] != dirs[2] {
		t.Fatalf("concurrent Gets of one shape: %v", dirs)
	}
	state := filepath.Join(dirs[0], vmm.TemplateState)
	st1, err := os.Stat(state)
	if err != nil {
		t.Fatal(err)
	}
	if d, err := Get(ctx, root, hv, cfg); err != nil || d != dirs[0] {
		t.Fatalf("second Get: %s %v", d, err)
	}
	if st2, err := os.Stat(state); err != nil || !st2.ModTime().Equal(st1.ModTime()) {
		t.Fatalf("the template was made again (%v)", err)
	}
	if n := countTemplates(t, root); n != 1 {
		t.Fatalf("%d templates, want 1", n)
	}

	// A VM made from it answers.
	vmCfg := cfg
	vmCfg.StateDir = testutil.ShortTempDir(t)
	vmCfg.Template = &vmm.Template{Dir: dirs[0], Restore: true}
	rctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	g, err := vmboot.Boot(rctx, hv, vmCfg, vmboot.Options{DevicesReady: true})
	if err != nil {
		t.Fatalf("VM made from the template: %v", err)
	}
	defer g.VM.Stop(ctx)
	g.Close()
	if err := g.VM.Stop(ctx); err != nil {
		t.Fatal(err)
	}

	// A rebuilt guest image: a new template, the stale one gone.
	later := time.Now().Add(time.Second)
	if err := os.Chtimes(cfg.Initramfs, later, later); err != nil {
		t.Fatal(err)
	}
	d, err := Get(ctx, root, hv, cfg)
	if err != nil {
		t.Fatal(err)
	}
	if d == dirs[0] {
		t.Fatal("same template after the initramfs changed")
	}
	if _, err := os.Stat(dirs[0]); !os.IsNotExist(err) {
		t.Fatalf("stale template still there: %v", err)
	}
	if n := countTemplates(t, root); n != 1 {
		t.Fatalf("%d templates, want 1", n)
	}
}

func TestGetErrors(t *testing.T) {
	cfg := testConfig(t)
	hv := testHypervisor(t)
	root := t.TempDir()
	ctx := context.Background()
	for _, tc := range []struct {
		name   string
		adjust func(*vmm.Config)
		want   error
	}{
		{"disks", func(c *vmm.Config) { c.Disks = []vmm.Disk{{ID: "d", Path: c.Initramfs}} }, errdefs.ErrInvalidArgument},
		{"vsock", func(c *vmm.Config) { c.Agent.Transport = vmm.TransportVsock }, errdefs.ErrNotImplemented},
		{"template", func(c *vmm.Config) { c.Template = &vmm.Template{Dir: root} }, errdefs.ErrInvalidArgument},
		{"no kernel", func(c *vmm.Config) { c.Kernel = filepath.Join(root, "missing") }, os.ErrNotExist},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := cfg
			tc.adjust(&c)
			if _, err := Get(ctx, root, hv, c); !errors.Is(err, tc.want) {
				t.Fatalf("got %v, want %v", err, tc.want)
			}
		})
	}
	for _, st := range []Storage{
		{Disk: vmm.Disk{ID: "rw", Path: cfg.Initramfs}, FSType: "erofs"},
		{Disk: vmm.Disk{ID: "pmem", Path: cfg.Initramfs, ReadOnly: true, Kind: vmm.PMEM}, FSType: "erofs"},
		{Disk: vmm.Disk{ID: "nofs", Path: cfg.Initramfs, ReadOnly: true}},
	} {
		t.Run("storage "+st.Disk.ID, func(t *testing.T) {
			if _, err := Get(ctx, root, hv, cfg, st); !errors.Is(err, errdefs.ErrInvalidArgument) {
				t.Fatalf("got %v, want %v", err, errdefs.ErrInvalidArgument)
			}
		})
	}
	t.Run("missing storage", func(t *testing.T) {
		st := Storage{Disk: vmm.Disk{ID: "gone", Path: filepath.Join(root, "missing"), ReadOnly: true}, FSType: "erofs"}
		if _, err := Get(ctx, root, hv, cfg, st); !errors.Is(err, os.ErrNotExist) {
			t.Fatalf("got %v, want %v", err, os.ErrNotExist)
		}
	})
	t.Run("guest that never answers", func(t *testing.T) {
		c := cfg
		c.KernelParams = append(c.KernelParams, "rdinit=/nonexistent") // no init: the kernel panics, QEMU exits
		ctx, cancel := context.WithTimeout(ctx, time.Minute)
		defer cancel()
		if _, err := Get(ctx, root, hv, c); err == nil {
			t.Fatal("a template of a guest that cannot start")
		}
		if n := countTemplates(t, root); n != 0 {
			t.Fatalf("%d templates left", n)
		}
		left, _ := filepath.Glob(filepath.Join(root, "*.tmp"))
		if len(left) != 0 {
			t.Fatalf("left: %v", left)
		}
	})
}

// TestGetGivesUp: a Get whose context ends while the template VM still boots returns,
// with the VM stopped and nothing left.
func TestGetGivesUp(t *testing.T) {
	cfg := testConfig(t)
	hv := testHypervisor(t)
	root := t.TempDir()
	ctx, cancel := context.WithTimeout(context.Background(), time.Second) // a boot takes longer
	defer cancel()
	done := make(chan error, 1)
	go func() {
		_, err := Get(ctx, root, hv, cfg)
		done <- err
	}()
	select {
	case err := <-done:
		if !errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("got %v, want the context's deadline", err)
		}
	case <-time.After(time.Minute):
		t.Fatal("Get did not return after its context ended")
	}
	if n := countTemplates(t, root); n != 0 {
		t.Fatalf("%d templates left", n)
	}
	if left, _ := filepath.Glob(filepath.Join(root, "*.tmp")); len(left) != 0 {
		t.Fatalf("left: %v", left)
	}
}

func countTemplates(t *testing.T, root string) int {
	t.Helper()
	m, err := filepath.Glob(filepath.Join(root, "*", vmm.TemplateState))
	if err != nil {
		t.Fatal(err)
	}
	return len(m)
}

func copyFile(t *testing.T, src, dst string) {
	t.Helper()
	in, err := os.Open(src)
	if err != nil {
		t.Fatal(err)
	}
	defer in.Close()
	out, err := os.Create(dst)
	if err != nil {
		t.Fatal(err)
	}
	defer out.Close()
	if _, err := io.Copy(out, in); err != nil {
		t.Fatal(err)
	}
}

// TestGetStorage: a template with a storage (the guest's kernel modules image) boots with
// it and has it mounted; a VM started from the template with the same disk has it
// mounted from the start (its agent unmounts it); the image is part of the shape: a
// rebuilt image makes a new template and removes the stale one.
func TestGetStorage(t *testing.T) {
	cfg := testConfig(t)
	hv := testHypervisor(t)
	root := testutil.ShortTempDir(t)
	ctx := context.Background()
	g := testutil.RequireGuest(t)
	image := filepath.Join(t.TempDir(), "modules.erofs")
	copyFile(t, modimage.Beside(g.Kernel), image)
	storage := Storage{Disk: vmm.Disk{ID: "kernel-modules", Path: image, ReadOnly: true}, FSType: "erofs"}

	bare, err := Get(ctx, root, hv, cfg)
	if err != nil {
		t.Fatal(err)
	}
	dir, err := Get(ctx, root, hv, cfg, storage)
	if err != nil {
		t.Fatal(err)
	}
	if dir == bare {
		t.Fatal("the template with a storage is the one without")
	}

	vmCfg := cfg
	vmCfg.StateDir = testutil.ShortTempDir(t)
	vmCfg.Template = &vmm.Template{Dir: dir, Restore: true, Disks: []vmm.Disk{storage.Disk}}
	rctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	vm, err := vmboot.Boot(rctx, hv, vmCfg, vmboot.Options{})
	if err != nil {
		t.Fatalf("VM made from the template: %v", err)
	}
	defer vm.VM.Stop(ctx)
	sc := agent.NewStorageClient(vm.Client)
	if _, err := sc.Unmount(rctx, &agent.UnmountStorageRequest{StorageId: storage.Disk.ID}); err != nil {
		t.Fatalf("the template's storage is not mounted in a VM made from it: %v", err)
	}
	vm.Close()
	if err := vm.VM.Stop(ctx); err != nil {
		t.Fatal(err)
	}

	later := time.Now().Add(time.Second)
	if err := os.Chtimes(image, later, later); err != nil {
		t.Fatal(err)
	}
	d, err := Get(ctx, root, hv, cfg, storage)
	if err != nil {
		t.Fatal(err)
	}
	if d == dir {
		t.Fatal("same template after the storage's image changed")
	}
	if _, err := os.Stat(dir); !os.IsNotExist(err) {
		t.Fatalf("stale template still there: %v", err)
	}
}

// TestKey: Key names a VM's shape, not its instance: state directories, console logs,
// disks and NICs leave it alone; the kernel parameters, the sizes and a rebuilt guest
// image change it; a guest file that is missing is an error.
func TestKey(t *testing.T) {
	hv := testHypervisor(t)
	dir := t.TempDir()
	base := vmm.Config{
		Kernel: filepath.Join(dir, "vmlinux"), Initramfs: filepath.Join(dir, "initramfs"),
		KernelParams: []string{"quiet"}, VCPUs: 1, MemoryMiB: 512, HotplugSlots: 2,
	}
	for _, f := range []string{base.Kernel, base.Initramfs} {
		if err := os.WriteFile(f, []byte("guest"), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	key := func(t *testing.T, cfg vmm.Config) string {
		t.Helper()
		k, err := Key(hv, cfg)
		if err != nil {
			t.Fatal(err)
		}
		return k
	}
	want := key(t, base)
	for _, tc := range []struct {
		name   string
		change func(c *vmm.Config)
		same   bool
	}{
		{"another instance", func(c *vmm.Config) {
			c.StateDir, c.ConsoleLog = "/run/a", "/run/a/console.log"
			c.Disks = []vmm.Disk{{ID: "d", Path: "/x", Kind: vmm.Block}}
			c.NICs = []vmm.NIC{{ID: "n", MAC: "02:00:00:00:00:01"}}
		}, true},
		{"kernel parameters", func(c *vmm.Config) { c.KernelParams = []string{"loglevel=7"} }, false},
		{"memory", func(c *vmm.Config) { c.MemoryMiB = 640 }, false},
		{"vCPUs", func(c *vmm.Config) { c.VCPUs = 2 }, false},
		{"hot-plug slots", func(c *vmm.Config) { c.HotplugSlots = 3 }, false},
		{"another initramfs", func(c *vmm.Config) {
			c.Initramfs = filepath.Join(dir, "initramfs2")
			copyFile(t, base.Initramfs, c.Initramfs)
		}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := base
			tc.change(&cfg)
			if got := key(t, cfg); (got == want) != tc.same {
				t.Fatalf("key %s against %s: same = %v, want %v", got, want, got == want, tc.same)
			}
		})
	}
	later := time.Now().Add(time.Second)
	if err := os.Chtimes(base.Kernel, later, later); err != nil {
		t.Fatal(err)
	}
	if key(t, base) == want {
		t.Fatal("the same key after the kernel changed")
	}
	missing := base
	missing.Initramfs = filepath.Join(dir, "none")
	if _, err := Key(hv, missing); err == nil || !strings.Contains(err.Error(), missing.Initramfs) {
		t.Fatalf("Key with a missing initramfs: %v", err)
	}
}
