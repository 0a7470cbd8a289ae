package template

import (
	"context"
	"errors"
	"io"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/containerd/errdefs"

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
