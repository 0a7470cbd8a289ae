// Package uevent receives the kernel's device events (kobject uevents, on a
// NETLINK_KOBJECT_UEVENT socket: what udev listens to). The guest has no udev; the agent
// waits on these events for the devices the shim hot-plugs, where it would otherwise
// poll sysfs, which under TCG takes the guest's only vCPU from the very probe it waits for.
package uevent

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// ErrLost is returned by Next when the kernel dropped events because the socket's buffer
// was full: whoever waits for a device must look for it again.
var ErrLost = errors.New("uevents lost: the socket's receive buffer overflowed")

// Event is one kernel uevent, with the keys the agent matches on.
type Event struct {
	Action    string // add, remove, change, bind, unbind, move, online, offline
	DevPath   string // the device's sysfs path below /sys, such as /devices/pci0000:00/.../block/vda
	Subsystem string // block, pci, net, ...
	DevName   string // its node below /dev, if it has one (vda, pmem0)
	DevType   string // disk, partition, ...
}

// Listener receives the kernel's uevents from the moment Listen returns.
type Listener struct {
	f   *os.File
	rc  syscall.RawConn
	buf []byte
}

// kernelGroup is the multicast group the kernel sends its uevents to (udev's re-sent
// events go to group 2, which the agent does not listen to).
const kernelGroup = 1

// receiveBuffer is the socket's receive buffer: a hot-plug sends a dozen events of a few
// hundred bytes each, and a burst of disks and NICs at a pod's start several of those.
const receiveBuffer = 1 << 20

// Listen opens a socket for the kernel's uevents.
func Listen() (*Listener, error) {
	fd, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_DGRAM|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, unix.NETLINK_KOBJECT_UEVENT)
	if err != nil {
		return nil, fmt.Errorf("uevent socket: %w", err)
	}
	if err := unix.Bind(fd, &unix.SockaddrNetlink{Family: unix.AF_NETLINK, Groups: kernelGroup}); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("uevent socket: bind: %w", err)
	}
	// Best effort: a smaller buffer only makes ErrLost likelier.
	_ = unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_RCVBUF, receiveBuffer)
	f := os.NewFile(uintptr(fd), "uevent") // non-blocking: the runtime's poller waits for it
	rc, err := f.SyscallConn()
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("uevent socket: %w", err)
	}
	return &Listener{f: f, rc: rc, buf: make([]byte, 8192)}, nil
}

// Close closes the socket; a Next waiting on it returns.
func (l *Listener) Close() error { return l.f.Close() }

// Next waits for the kernel's next uevent until ctx is done (then it returns ctx's
// error). Messages that are not the kernel's, or that do not parse, are skipped.
func (l *Listener) Next(ctx context.Context) (Event, error) {
	deadline, _ := ctx.Deadline()
	if err := l.f.SetReadDeadline(deadline); err != nil {
		return Event{}, err
	}
	stop := context.AfterFunc(ctx, func() { l.f.SetReadDeadline(time.Unix(1, 0)) })
	defer stop()
	for {
		var (
			n    int
			from unix.Sockaddr
			rerr error
		)
		err := l.rc.Read(func(fd uintptr) bool {
			n, from, rerr = unix.Recvfrom(int(fd), l.buf, 0)
			return rerr != unix.EAGAIN
		})
		if err == nil {
			err = rerr
		}
		switch {
		case errors.Is(err, os.ErrDeadlineExceeded):
			// The socket's deadline and ctx's timer are two timers: either may fire first.
			if err := ctx.Err(); err != nil {
				return Event{}, err
			}
			if !deadline.IsZero() && !time.Now().Before(deadline) {
				return Event{}, context.DeadlineExceeded
			}
			continue
		case errors.Is(err, unix.ENOBUFS):
			return Event{}, ErrLost
		case err != nil:
			return Event{}, fmt.Errorf("receive uevent: %w", err)
		}
		// Only the kernel (port 0) speaks for the kernel: another process in the VM's
		// network namespace with CAP_NET_ADMIN could send to the group too.
		if nl, ok := from.(*unix.SockaddrNetlink); !ok || nl.Pid != 0 {
			continue
		}
		if ev, ok := Parse(l.buf[:n]); ok {
			return ev, nil
		}
	}
}

// Parse reads a kernel uevent: "ACTION@DEVPATH", then KEY=VALUE pairs, each ended by a
// NUL. It reports false for anything else (libudev's messages start "libudev").
func Parse(b []byte) (Event, bool) {
	head, rest, ok := bytes.Cut(b, []byte{0})
	if !ok || !bytes.Contains(head, []byte("@")) {
		return Event{}, false
	}
	var ev Event
	for len(rest) > 0 {
		var kv []byte
		kv, rest, _ = bytes.Cut(rest, []byte{0})
		k, v, ok := bytes.Cut(kv, []byte("="))
		if !ok {
			continue
		}
		switch string(k) {
		case "ACTION":
			ev.Action = string(v)
		case "DEVPATH":
			ev.DevPath = string(v)
		case "SUBSYSTEM":
			ev.Subsystem = string(v)
		case "DEVNAME":
			ev.DevName = string(v)
		case "DEVTYPE":
			ev.DevType = string(v)
		}
	}
	if ev.Action == "" || ev.DevPath == "" {
		return Event{}, false
	}
	return ev, true
}
