package hostcheck

import (
	"bytes"
	"context"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/caisson-containers/caisson/internal/testutil"
	"github.com/caisson-containers/caisson/internal/transport"
	"github.com/caisson-containers/caisson/shim/config"
	"github.com/caisson-containers/caisson/shim/vmm/qemu/accel"
)

func byItem(results []Result) map[string]Result {
	m := map[string]Result{}
	for _, r := range results {
		m[r.Item] = r
	}
	return m
}

// The verdict must follow the probes: KVM exactly when the kvm probe passed, and
// "can run" exactly when nothing failed. The transport is serial whatever the
// vhost-vsock probe found: it is the one pods use (shim/pod has no vsock path).
func TestVerdictFollowsTheProbes(t *testing.T) {
	testutil.RequireRoot(t)
	testutil.RequireBinary(t, "qemu-system-x86_64")
	g := testutil.RequireGuest(t)
	c := config.Default(filepath.Dir(g.Kernel))
	results, v := Run(context.Background(), Options{Config: c, StateRoot: t.TempDir(), ProbeTimeout: 60 * time.Second})
	var buf bytes.Buffer
	Print(&buf, results, v)
	t.Log("\n" + buf.String())

	m := byItem(results)
	for _, item := range []string{"qemu", "kvm", "tcg", "vhost-vsock", "guest-kernel", "guest-initrd", "guest-preload", "guest-modules", "loop", "erofs", "overlay", "tun", "mkfs.erofs", "mkfs.ext4", "cgroup", "disk"} {
		if _, ok := m[item]; !ok {
			t.Errorf("no %s line", item)
		}
	}
	if (m["kvm"].Status == OK) != (v.Accelerator == accel.KVM) {
		t.Errorf("kvm %s but accelerator %s", m["kvm"].Status, v.Accelerator)
	}
	if v.Transport != transport.Serial {
		t.Errorf("vhost-vsock %s and transport %s, want serial: pods use nothing else", m["vhost-vsock"].Status, v.Transport)
	}
	if m["vhost-vsock"].Status == Fail {
		t.Errorf("vhost-vsock is information only, yet it failed: %s", m["vhost-vsock"].Detail)
	}
	failed := false
	for _, r := range results {
		failed = failed || r.Status == Fail
	}
	if v.CanRun == failed {
		t.Errorf("CanRun = %v with failures = %v", v.CanRun, failed)
	}
	if m["tcg"].Status != OK {
		t.Errorf("TCG must work wherever QEMU does: %s", m["tcg"].Detail)
	}
	if !strings.Contains(buf.String(), "verdict") {
		t.Error("no verdict line")
	}
}

func TestMissingGuestImageCannotRun(t *testing.T) {
	testutil.RequireBinary(t, "qemu-system-x86_64")
	c := config.Default(t.TempDir()) // no kernel or initramfs there
	c.Hypervisor.Accelerator = "tcg"
	results, v := Run(context.Background(), Options{Config: c, StateRoot: t.TempDir()})
	m := byItem(results)
	if m["guest-kernel"].Status != Fail || m["guest-initrd"].Status != Fail {
		t.Fatalf("missing guest image not reported: %+v / %+v", m["guest-kernel"], m["guest-initrd"])
	}
	if v.CanRun {
		t.Fatal("verdict says Caisson can run without a guest image")
	}
}

func TestForcedKVMWithoutKVMFails(t *testing.T) {
	testutil.RequireBinary(t, "qemu-system-x86_64")
	g := testutil.RequireGuest(t)
	if accel.Probe(context.Background(), accel.KVM, accel.Options{QEMU: "qemu-system-x86_64", Kernel: g.Kernel}) == nil {
		t.Skip("KVM works on this host; this case needs a host where it does not")
	}
	c := config.Default(filepath.Dir(g.Kernel))
	c.Hypervisor.Accelerator = "kvm"
	results, v := Run(context.Background(), Options{Config: c, StateRoot: t.TempDir()})
	if v.CanRun || byItem(results)["accelerator"].Status != Fail {
		t.Fatalf("accelerator = kvm on a host without KVM: CanRun %v, results %+v", v.CanRun, results)
	}
}

// A configuration asking for vsock is reported as a failure, not turned into a vsock
// verdict: pods cannot use it.
func TestVsockTransportCannotRun(t *testing.T) {
	testutil.RequireBinary(t, "qemu-system-x86_64")
	g := testutil.RequireGuest(t)
	c := config.Default(filepath.Dir(g.Kernel))
	c.Hypervisor.Accelerator = "tcg"
	c.Guest.Transport = "vsock"
	results, v := Run(context.Background(), Options{Config: c, StateRoot: t.TempDir(), ProbeTimeout: 60 * time.Second})
	r := byItem(results)["config"]
	if r.Status != Fail || !strings.Contains(r.Detail, "not supported for pods yet") {
		t.Fatalf("transport vsock: config line %+v, want a failure saying pods cannot use vsock", r)
	}
	if v.CanRun || v.Transport != transport.Serial {
		t.Fatalf("transport vsock: verdict %+v, want cannot run (and no vsock transport)", v)
	}
}
