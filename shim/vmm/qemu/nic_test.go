package qemu

import (
	"context"
	"errors"
	"os"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/containerd/errdefs"
	"golang.org/x/sys/unix"

	"github.com/caisson-containers/caisson/shim/vmm"
)

// openTap opens a tap device in a network namespace of its own, which goes when the tap
// is closed: nothing of the test is left on the host.
func openTap(t *testing.T) *os.File {
	t.Helper()
	done := make(chan struct{})
	var (
		tap *os.File
		err error
	)
	go func() {
		defer close(done)
		// The thread's namespace is not restored: it exits with the goroutine.
		runtime.LockOSThread()
		if err = unix.Unshare(unix.CLONE_NEWNET); err != nil {
			return
		}
		var fd int
		if fd, err = unix.Open("/dev/net/tun", unix.O_RDWR|unix.O_CLOEXEC, 0); err != nil {
			return
		}
		var ifr *unix.Ifreq
		if ifr, err = unix.NewIfreq("tap0"); err != nil {
			unix.Close(fd)
			return
		}
		ifr.SetUint16(unix.IFF_TAP | unix.IFF_NO_PI)
		if err = unix.IoctlIfreq(fd, unix.TUNSETIFF, ifr); err != nil {
			unix.Close(fd)
			return
		}
		tap = os.NewFile(uintptr(fd), "tap0")
	}()
	<-done
	if err != nil {
		t.Fatalf("open a tap: %v", err)
	}
	t.Cleanup(func() { tap.Close() })
	return tap
}

// TestAttachNIC hot-plugs NICs into a running VM, each tap closed by the caller once
// attached: the guest sees each NIC with its MAC; a bad MAC, a missing tap and a NIC
// without a free slot are refused.
func TestAttachNIC(t *testing.T) {
	g := newTestGuest(t)
	vm := startVM(t, g, vmm.Config{HotplugSlots: 2})
	sh := dialGuest(t, vm.Endpoint(), bootTimeout)
	ctx := context.Background()

	if err := vm.AttachNIC(ctx, vmm.NIC{ID: "bad", MAC: "not-a-mac", Tap: openTap(t)}); !errdefs.IsInvalidArgument(err) {
		t.Fatalf("a bad MAC: %v, want InvalidArgument", err)
	}
	if err := vm.AttachNIC(ctx, vmm.NIC{ID: "none", MAC: "0a:58:0a:58:00:09"}); !errdefs.IsInvalidArgument(err) {
		t.Fatalf("no tap: %v, want InvalidArgument", err)
	}
	macs := []string{"0a:58:0a:58:00:05", "0a:58:0a:58:00:06"}
	for i, mac := range macs {
		tap := openTap(t)
		if err := vm.AttachNIC(ctx, vmm.NIC{ID: "nic" + string(rune('0'+i)), MAC: mac, Tap: tap}); err != nil {
			t.Fatalf("NIC %s: %v", mac, err)
		}
		tap.Close()
	}
	deadline := time.Now().Add(20 * time.Second)
	for {
		got := sh.must(t, "cat /sys/class/net/*/address")
		if strings.Contains(got, macs[0]) && strings.Contains(got, macs[1]) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the guest's NICs: %q, want %v", got, macs)
		}
		time.Sleep(200 * time.Millisecond)
	}
	// Both slots are taken now.
	err := vm.AttachNIC(ctx, vmm.NIC{ID: "third", MAC: "0a:58:0a:58:00:07", Tap: openTap(t)})
	if !errors.Is(err, errdefs.ErrResourceExhausted) {
		t.Fatalf("a NIC without a slot: %v, want ResourceExhausted", err)
	}
}
