package accel

import (
	"context"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/containerd/errdefs"

	"github.com/caisson-containers/caisson/internal/testutil"
)

func options(t *testing.T) Options {
	t.Helper()
	return Options{QEMU: testutil.RequireBinary(t, "qemu-system-x86_64")}
}

// guestKernel is the vmlinux pods boot.
func guestKernel(t *testing.T) string {
	t.Helper()
	return requireFile(t, filepath.Join(testutil.RepoRoot(t), "_output", "guest", "vmlinux"))
}

// guestBzImage is the same kernel as its package ships it, which a configuration may name.
func guestBzImage(t *testing.T) string {
	t.Helper()
	return requireFile(t, filepath.Join(testutil.RepoRoot(t), "_output", "guest", "kernel", "vmlinuz"))
}

func requireFile(t *testing.T, path string) string {
	t.Helper()
	if _, err := os.Stat(path); err != nil {
		t.Skipf("needs the guest kernel (run `make guest`): %v", err)
	}
	return path
}

func TestFirmwareRunsUnderTCG(t *testing.T) {
	if err := ProbeFirmware(context.Background(), TCG, options(t)); err != nil {
		t.Fatal(err)
	}
}

// The kernel probe boots either format guest.kernel may name.
func TestKernelBootsUnderTCG(t *testing.T) {
	for _, tc := range []struct {
		name   string
		kernel func(*testing.T) string
	}{
		{"vmlinux", guestKernel},
		{"bzImage", guestBzImage},
	} {
		t.Run(tc.name, func(t *testing.T) {
			o := options(t)
			o.Kernel = tc.kernel(t)
			o.Timeout = 60 * time.Second // TCG on a loaded 2-core machine
			if err := ProbeKernel(context.Background(), TCG, o); err != nil {
				t.Fatal(err)
			}
		})
	}
}

// A guest that cannot finish in time is reported as a hang, and QEMU is gone.
func TestHungGuestIsUnavailable(t *testing.T) {
	o := options(t)
	o.Kernel = guestKernel(t)
	o.Timeout = 200 * time.Millisecond // no kernel boots this fast under TCG
	err := ProbeKernel(context.Background(), TCG, o)
	if !errdefs.IsUnavailable(err) {
		t.Fatalf("ProbeKernel = %v, want Unavailable", err)
	}
}

func TestBrokenQEMUIsAnError(t *testing.T) {
	err := ProbeFirmware(context.Background(), TCG, Options{QEMU: "/nonexistent/qemu"})
	if err == nil {
		t.Fatal("probe with a missing QEMU succeeded")
	}
	o := options(t)
	if err := ProbeFirmware(context.Background(), "no-such-accel", o); err == nil {
		t.Fatal("probe with an unknown accelerator succeeded")
	}
}

// Choose(auto) must pick KVM exactly when the KVM probe (firmware and kernel) passes.
func TestChooseAutoFollowsTheProbe(t *testing.T) {
	o := options(t)
	o.Kernel = guestKernel(t)
	o.Cache = &Cache{Dir: t.TempDir()}
	got, err := Choose(context.Background(), Auto, o)
	if err != nil {
		t.Fatal(err)
	}
	kvmErr := Probe(context.Background(), KVM, o) // answered from the cache
	switch {
	case kvmErr == nil && got != KVM:
		t.Fatalf("KVM probe passed but Choose picked %s", got)
	case kvmErr != nil && got != TCG:
		t.Fatalf("KVM probe failed (%v) but Choose picked %s", kvmErr, got)
	}
	t.Logf("chose %s (kvm: %v)", got, kvmErr)
	if _, err := Choose(context.Background(), "xen", o); !errdefs.IsInvalidArgument(err) {
		t.Fatalf("Choose(xen) = %v, want InvalidArgument", err)
	}
}

func TestCacheRemembersAndInvalidates(t *testing.T) {
	c := &Cache{Dir: t.TempDir()}
	f := filepath.Join(t.TempDir(), "qemu")
	os.WriteFile(f, []byte("v1"), 0o755)
	calls := 0
	fail := func() error { calls++; return errdefs.ErrUnavailable }
	for range 2 {
		if err := c.remember("x", []string{f}, fail); err == nil {
			t.Fatal("cached failure reported success")
		}
	}
	if calls != 1 {
		t.Fatalf("probe ran %d times, want 1 (second answer from cache)", calls)
	}
	os.WriteFile(f, []byte("v2, a new build"), 0o755)
	c.remember("x", []string{f}, fail)
	if calls != 2 {
		t.Fatalf("probe ran %d times after the binary changed, want 2", calls)
	}
	var nilCache *Cache
	nilCache.remember("x", nil, fail)
	nilCache.remember("x", nil, fail)
	if calls != 4 {
		t.Fatalf("a nil cache remembered: %d calls, want 4", calls)
	}
}

func TestVhostVsockNeedsTheDevice(t *testing.T) {
	err := ProbeVhostVsock(context.Background(), options(t))
	if _, statErr := os.Stat("/dev/vhost-vsock"); os.IsNotExist(statErr) && err == nil {
		t.Fatal("vhost-vsock probe passed on a host without /dev/vhost-vsock")
	}
	t.Logf("vhost-vsock: %v", err)
}
