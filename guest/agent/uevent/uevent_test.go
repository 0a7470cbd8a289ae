package uevent

import (
	"context"
	"errors"
	"os"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/caisson-containers/caisson/internal/testutil"
)

func TestParse(t *testing.T) {
	for _, tc := range []struct {
		name string
		msg  string
		want Event
		ok   bool
	}{
		{"a disk", "add@/devices/pci0000:00/0000:00:1c.0/0000:01:01.0/virtio3/block/vdb\x00ACTION=add\x00DEVPATH=/devices/pci0000:00/0000:00:1c.0/0000:01:01.0/virtio3/block/vdb\x00SUBSYSTEM=block\x00MAJOR=254\x00MINOR=16\x00DEVNAME=vdb\x00DEVTYPE=disk\x00DISKSEQ=5\x00SEQNUM=1234\x00",
			Event{Action: "add", DevPath: "/devices/pci0000:00/0000:00:1c.0/0000:01:01.0/virtio3/block/vdb", Subsystem: "block", DevName: "vdb", DevType: "disk"}, true},
		{"no trailing NUL, a value with =", "change@/devices/virtual/mem/full\x00ACTION=change\x00DEVPATH=/devices/virtual/mem/full\x00SUBSYSTEM=mem\x00X=a=b",
			Event{Action: "change", DevPath: "/devices/virtual/mem/full", Subsystem: "mem"}, true},
		{"libudev's", "libudev\x00\xfe\xed\xca\xfe(\x00\x00\x00", Event{}, false},
		{"no header", "ACTION=add\x00DEVPATH=/x\x00", Event{}, false},
		{"no action", "add@/x\x00DEVPATH=/x\x00", Event{}, false},
		{"no devpath", "add@/x\x00ACTION=add\x00", Event{}, false},
		{"empty", "", Event{}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, ok := Parse([]byte(tc.msg))
			if ok != tc.ok || got != tc.want {
				t.Errorf("Parse = %+v, %v; want %+v, %v", got, ok, tc.want, tc.ok)
			}
		})
	}
}

// trigger makes the kernel send a uevent for /dev/full (the "change" that udevadm
// trigger writes; udev, if the host runs it, re-applies /dev/full's rules).
func trigger(t *testing.T) {
	t.Helper()
	if err := os.WriteFile("/sys/class/mem/full/uevent", []byte("change"), 0); err != nil {
		t.Fatal(err)
	}
}

// listen opens a Listener for the test (root only), closed when the test ends.
func listen(t *testing.T) *Listener {
	t.Helper()
	testutil.RequireRoot(t)
	l, err := Listen()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	return l
}

// The kernel's events arrive; one sent by a process to the kernel's group does not.
func TestListen(t *testing.T) {
	l := listen(t)

	fd, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, unix.NETLINK_KOBJECT_UEVENT)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	forged := "add@/devices/forged/block/vdz\x00ACTION=add\x00DEVPATH=/devices/forged/block/vdz\x00SUBSYSTEM=block\x00DEVNAME=vdz\x00"
	if err := unix.Sendto(fd, []byte(forged), 0, &unix.SockaddrNetlink{Family: unix.AF_NETLINK, Groups: kernelGroup}); err != nil {
		t.Fatal(err)
	}
	trigger(t)

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	for {
		ev, err := l.Next(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if ev.DevPath == "/devices/forged/block/vdz" {
			t.Fatalf("a process's message was taken for the kernel's: %+v", ev)
		}
		if ev.DevPath == "/devices/virtual/mem/full" {
			if ev.Action != "change" || ev.Subsystem != "mem" || ev.DevName != "full" {
				t.Errorf("event %+v", ev)
			}
			return
		}
	}
}

// Next returns when its context ends, and the listener still works after that.
func TestNextContext(t *testing.T) {
	l := listen(t)

	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		_, err := l.Next(ctx)
		done <- err
	}()
	cancel()
	select {
	case err := <-done:
		if !errors.Is(err, context.Canceled) {
			t.Errorf("Next after cancel: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Next did not return when its context was canceled")
	}

	// The host's own events (other tests' loop devices, say) may come first.
	short, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
	defer cancel()
	for {
		if _, err := l.Next(short); err != nil {
			if !errors.Is(err, context.DeadlineExceeded) {
				t.Errorf("Next past its deadline: %v", err)
			}
			break
		}
	}

	trigger(t)
	ctx, cancel = context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	for {
		ev, err := l.Next(ctx)
		if err != nil {
			t.Fatalf("Next after a canceled one: %v", err)
		}
		if ev.DevPath == "/devices/virtual/mem/full" {
			return
		}
	}
}
