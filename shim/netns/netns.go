// Package netns keeps a small process in a network namespace on the host, for a pod VM.
//
// OCI hooks find "the container's" network namespace through the pid in the state they
// read (/proc/PID/ns/net): nerdctl's network hook runs CNI there. A Caisson container's
// processes run in the guest, so the shim gives hooks the pid of a holder process instead:
// a process in a network namespace of its own (New: the one the VM's NICs then come from,
// see shim/network), or in a namespace that already exists (Join: a CRI pod's). Kata
// Containers gives its hooks the hypervisor's pid, in the same role; Caisson's hooks run
// before QEMU starts, so that the VM boots with the NICs they create.
//
// The holder is this same binary started again with holderName as its argv[0] (see init):
// it runs no main, holds the namespace, and exits when its stdin closes: on Close, or when
// the shim dies, so a killed shim leaves no holder behind. The namespace itself lives on
// while something holds it (QEMU's tap descriptors) and goes with the last holder, and with
// it the veths CNI put in it.
//
// Do runs code on a thread moved into a network namespace (shim/network creates taps so).
package netns

import (
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"runtime"
	"syscall"
	"time"

	"github.com/containerd/errdefs"
	"github.com/vishvananda/netlink"
	vnetns "github.com/vishvananda/netns"
)

// holderName is the holder's argv[0]: the process list shows what it is.
const holderName = "caisson-netns-holder"

// The holder's whole life: this package's init runs in every binary that imports it (the
// shim, and this package's tests), before main, which a holder never reaches.
func init() {
	if len(os.Args) == 1 && os.Args[0] == holderName {
		io.Copy(io.Discard, os.Stdin) // until the shim closes it, or dies
		os.Exit(0)
	}
}

// NS is a holder process in a network namespace.
type NS struct {
	cmd   *exec.Cmd
	stdin *os.File // the holder lives while it is open
	done  chan struct{}
}

// New starts a holder in a new network namespace whose loopback is up (runc brings up a
// new namespace's loopback too).
func New() (_ *NS, retErr error) {
	n, err := start(&syscall.SysProcAttr{Cloneflags: syscall.CLONE_NEWNET})
	if err != nil {
		return nil, err
	}
	defer func() {
		if retErr != nil {
			n.Close()
		}
	}()
	h, err := vnetns.GetFromPath(n.Path())
	if err != nil {
		return nil, fmt.Errorf("open the new network namespace: %w", err)
	}
	defer h.Close()
	nl, err := netlink.NewHandleAt(h)
	if err != nil {
		return nil, fmt.Errorf("netlink in the new network namespace: %w", err)
	}
	defer nl.Close()
	lo, err := nl.LinkByName("lo")
	if err == nil {
		err = nl.LinkSetUp(lo)
	}
	if err != nil {
		return nil, fmt.Errorf("bring up loopback in the new network namespace: %w", err)
	}
	return n, nil
}

// Join starts a holder in the existing network namespace at path.
func Join(path string) (*NS, error) {
	var n *NS
	// A child starts in the network namespace of the thread that forks it.
	err := Do(path, func(vnetns.NsHandle) error {
		var err error
		n, err = start(&syscall.SysProcAttr{})
		return err
	})
	return n, err
}

// Do runs f on an OS thread moved into the network namespace at path (target, open while
// f runs), so that what f creates through the thread's namespace is created there: a tap
// (through /dev/net/tun), a child process. The thread returns to its namespace after, or
// is thrown away if it cannot. A path that does not exist is errdefs.ErrNotFound.
func Do(path string, f func(target vnetns.NsHandle) error) error {
	target, err := vnetns.GetFromPath(path)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("network namespace %s: %w", path, errdefs.ErrNotFound)
		}
		return fmt.Errorf("network namespace %s: %w", path, err)
	}
	defer target.Close()
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		orig, err := vnetns.Get()
		if err != nil {
			errc <- err
			return // the thread stays locked and dies with the goroutine
		}
		defer orig.Close()
		if err := vnetns.Set(target); err != nil {
			errc <- fmt.Errorf("enter network namespace %s: %w", path, err)
			return
		}
		err = f(target)
		if vnetns.Set(orig) == nil {
			runtime.UnlockOSThread()
		}
		errc <- err
	}()
	return <-errc
}

func start(attr *syscall.SysProcAttr) (*NS, error) {
	r, w, err := os.Pipe()
	if err != nil {
		return nil, err
	}
	defer r.Close()
	cmd := &exec.Cmd{
		Path:        "/proc/self/exe",
		Args:        []string{holderName},
		Env:         []string{},
		Stdin:       r,
		SysProcAttr: attr,
	}
	if err := cmd.Start(); err != nil {
		w.Close()
		return nil, fmt.Errorf("start the network namespace holder: %w", err)
	}
	n := &NS{cmd: cmd, stdin: w, done: make(chan struct{})}
	go func() {
		cmd.Wait()
		close(n.done)
	}()
	return n, nil
}

// Pid is the holder's pid: what hooks get as the container's.
func (n *NS) Pid() int { return n.cmd.Process.Pid }

// Path is the namespace's path through the holder, valid while it lives.
func (n *NS) Path() string { return fmt.Sprintf("/proc/%d/ns/net", n.Pid()) }

// closeGrace is how long the holder has to exit after its stdin closes before it is killed.
const closeGrace = 5 * time.Second

// Close ends the holder and waits for it. The namespace goes once nothing else holds it.
// Safe to call twice.
func (n *NS) Close() error {
	n.stdin.Close()
	select {
	case <-n.done:
		return nil
	case <-time.After(closeGrace):
	}
	n.cmd.Process.Kill()
	<-n.done
	return errors.New("the network namespace holder did not exit when told to; killed")
}
