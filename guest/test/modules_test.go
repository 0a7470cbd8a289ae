package test

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	agent "github.com/caisson-containers/caisson/api/agent/v1"
	"github.com/caisson-containers/caisson/guest/agent/boot"
	"github.com/caisson-containers/caisson/guest/modimage"
	"github.com/caisson-containers/caisson/internal/testutil"
	"github.com/caisson-containers/caisson/shim/vmm"
)

// modulesImage is the modules image `make guest` built beside the kernel.
func modulesImage(t testing.TB) string {
	t.Helper()
	g := testutil.RequireGuest(t)
	p := filepath.Join(filepath.Dir(g.Kernel), modimage.FileName)
	if _, err := os.Stat(p); err != nil {
		t.Skipf("needs the modules image (run `make guest`): %v", err)
	}
	return p
}

// TestGuestModulesOnDemand: a module the initramfs does not carry (bridge, and its
// dependencies stp and llc) is loaded by the kernel when a container with CAP_NET_ADMIN
// asks for a bridge, once the modules image is mounted; before, the same request fails.
// The kernel runs the guest's modprobe, not one the container put in its own /sbin.
func TestGuestModulesOnDemand(t *testing.T) {
	mods := modulesImage(t)
	disks := append(layerDisks(t), vmm.Disk{ID: "modules", Path: mods, ReadOnly: true, Kind: vmm.PMEM})
	g := bootGuest(t, disks, 0)
	g.mountLayers(t)

	netAdmin := func(script string) result {
		spec := testSpec("sh", "-c", script)
		for _, set := range []*[]string{&spec.Process.Capabilities.Bounding, &spec.Process.Capabilities.Effective, &spec.Process.Capabilities.Permitted} {
			*set = append(*set, "CAP_NET_ADMIN")
		}
		return g.run(t, "netadmin", spec)
	}
	// A modprobe of the container's own that, were the kernel to run it, would leave a
	// mark in the container's rootfs.
	const addBridge = `mkdir -p /sbin && printf '#!/bin/sh\necho ran > /tmp/fake-modprobe-ran\n' > /sbin/modprobe && chmod +x /sbin/modprobe
cat /proc/sys/kernel/modprobe
ip link add br0 type bridge && ip -o link show br0 | grep -o 'br0: <[^>]*>'
echo exit=$?; ls /tmp/fake-modprobe-ran 2>&1; grep -oE '^(bridge|stp|llc) ' /proc/modules | cut -d' ' -f1 | sort | tr '\n' ' '`

	before := netAdmin(addBridge)
	t.Logf("without the modules image:\n%s%s", before.stdout, before.stderr)
	if !strings.HasPrefix(before.stdout, "/sbin/modprobe\n") {
		t.Errorf("kernel.modprobe is not the guest's modprobe: %q", before.stdout)
	}
	if strings.Contains(before.stdout, "br0: <") || strings.Contains(before.stdout, "bridge ") {
		t.Fatalf("a bridge without the modules image: the initramfs carries bridge, so this test shows nothing:\n%s", before.stdout)
	}

	ctx := ctxT(t)
	resp, err := g.storage.Mount(ctx, &agent.MountStorageRequest{
		StorageId: boot.ModulesStorageID, Fstype: "erofs", Options: []string{"ro"}, Dax: true,
		Device: &agent.Device{Kind: agent.DeviceKind_DEVICE_KIND_PMEM, PciPath: g.address(t, "modules")},
	})
	if err != nil {
		t.Fatalf("mount the modules image: %v", native(err))
	}
	t.Logf("modules image: %s on %s", resp.DevicePath, resp.MountPoint)

	after := netAdmin(addBridge)
	t.Logf("with the modules image:\n%s%s", after.stdout, after.stderr)
	if !strings.Contains(after.stdout, "br0: <") || !strings.Contains(after.stdout, "exit=0") {
		t.Errorf("no bridge with the modules image mounted:\n%s%s", after.stdout, after.stderr)
	}
	if !strings.Contains(after.stdout, "bridge llc stp ") {
		t.Errorf("bridge and its dependencies llc and stp are not all loaded: %q", after.stdout)
	}
	if !strings.Contains(after.stdout, "/tmp/fake-modprobe-ran: No such file") {
		t.Errorf("the container's /sbin/modprobe ran: %q", after.stdout)
	}

	// Mounting it again is refused (one modules image per VM).
	if _, err := g.storage.Mount(ctx, &agent.MountStorageRequest{
		StorageId: boot.ModulesStorageID, Fstype: "erofs", Options: []string{"ro"}, Dax: true,
		Device: &agent.Device{Kind: agent.DeviceKind_DEVICE_KIND_PMEM, PciPath: g.address(t, "modules")},
	}); err == nil {
		t.Error("the modules image mounted twice")
	}
}
