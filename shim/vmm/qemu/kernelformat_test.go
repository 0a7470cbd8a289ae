package qemu

import (
	"context"
	"strings"
	"testing"

	"github.com/caisson-containers/caisson/internal/testutil"
	"github.com/caisson-containers/caisson/shim/vmm"
)

// TestTemplateKernelFormat: a template made by booting the vmlinux (PVH) restores and runs
// with the vmlinux, and with the bzImage of the same kernel alike. The kernel a restored VM
// runs is the one in the template's memory: QEMU 7.2's q35 gives the option ROM that started
// it (pvh.bin or linuxboot_dma.bin) no RAM block, it reaches the firmware through fw_cfg,
// which a migration does not carry, and QEMU does not copy the ELF's segments into the
// guest's memory while a migration comes in (which would overwrite the running kernel).
// shim/template keys a template on the kernel file all the same (its shape).
func TestTemplateKernelFormat(t *testing.T) {
	g := newTestGuest(t)
	dir := t.TempDir()
	saveTemplate(t, g, vmm.Config{Template: &vmm.Template{Dir: dir}}, "pvh")
	for _, tc := range []struct{ name, kernel string }{
		{"vmlinux", g.kernel},
		{"bzImage", g.bzImage},
	} {
		t.Run(tc.name, func(t *testing.T) {
			g := g
			g.kernel = tc.kernel
			vm := startVM(t, g, vmm.Config{Template: &vmm.Template{Dir: dir, Restore: true}})
			sh := dialGuest(t, vm.Endpoint(), bootTimeout)
			defer sh.conn.Close()
			if got := sh.must(t, "cat /tmp/marker"); got != "pvh\n" {
				t.Fatalf("VM restored with the %s reads %q from its RAM", tc.name, got)
			}
			// Work that runs much of the kernel's code and data.
			sh.must(t, "ls -R /sys >/dev/null && cat /proc/meminfo /proc/interrupts >/dev/null && dd if=/dev/urandom of=/tmp/x bs=1M count=8 2>/dev/null && sha256sum /tmp/x")
		})
	}
}

// An ELF kernel QEMU cannot boot directly (no PVH entry note: a kernel built without
// CONFIG_PVH, or any other ELF) fails the start with QEMU's reason.
func TestStartELFWithoutPVHNote(t *testing.T) {
	g := newTestGuest(t)
	notPVH := testutil.RequireBinary(t, "true") // an x86-64 ELF, no kernel
	vm, err := New(vmm.Config{Kernel: notPVH, Initramfs: g.initramfs, Accelerator: "tcg", StateDir: testutil.ShortTempDir(t)}, Config{})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), bootTimeout)
	defer cancel()
	err = vm.Start(ctx)
	if err == nil || !strings.Contains(err.Error(), "PVH ELF Note") {
		vm.Stop(context.Background())
		t.Fatalf("start with %s as the kernel: %v, want QEMU's error about the PVH note", notPVH, err)
	}
	<-vm.Done()
}
