package sandbox

import (
	"fmt"
	"os"
	"path/filepath"
	"runtime"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// podNamespaces are the namespaces every container of the pod shares, created and pinned
// by the agent (bind mounts of their /proc files) so that they outlive any container.
var podNamespaces = []struct {
	name string // in /proc/PID/ns and in OCI specs
	oci  string
	flag int
}{
	{"net", "network", unix.CLONE_NEWNET},
	{"ipc", "ipc", unix.CLONE_NEWIPC},
	{"uts", "uts", unix.CLONE_NEWUTS},
}

// pinNamespaces creates new network, IPC and UTS namespaces, brings the network one's
// loopback up, sets the UTS one's hostname, and bind-mounts each onto dir/NAME.
func pinNamespaces(dir, hostname string) error {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	errc := make(chan error, 1)
	go func() {
		// The thread enters the new namespaces and is never unlocked: the Go runtime
		// ends it with the goroutine instead of reusing it.
		runtime.LockOSThread()
		errc <- func() error {
			flags := 0
			for _, ns := range podNamespaces {
				flags |= ns.flag
			}
			if err := unix.Unshare(flags); err != nil {
				return fmt.Errorf("unshare pod namespaces: %w", err)
			}
			if hostname != "" {
				if err := unix.Sethostname([]byte(hostname)); err != nil {
					return fmt.Errorf("set hostname: %w", err)
				}
			}
			// The loopback is up from the namespace's start: a template's agent,
			// which prepares the namespaces, saves it up, and a pod's sandbox then
			// does not bring it up again (under TCG, the kernel's and netlink's code
			// for it is tens of ms of a pod's start).
			if err := loopbackUp(); err != nil {
				return err
			}
			tid := unix.Gettid()
			for _, ns := range podNamespaces {
				target := filepath.Join(dir, ns.name)
				if err := os.WriteFile(target, nil, 0o600); err != nil {
					return err
				}
				src := fmt.Sprintf("/proc/%d/task/%d/ns/%s", os.Getpid(), tid, ns.name)
				if err := unix.Mount(src, target, "", unix.MS_BIND, ""); err != nil {
					return fmt.Errorf("pin %s namespace: %w", ns.name, err)
				}
			}
			return nil
		}()
	}()
	if err := <-errc; err != nil {
		unpinNamespaces(dir)
		return err
	}
	return nil
}

// loopbackUp brings lo up in the calling thread's network namespace (netlink's package
// functions open their socket in the caller's namespace).
func loopbackUp() error {
	lo, err := netlink.LinkByName("lo")
	if err != nil {
		return fmt.Errorf("bring lo up: %w", err)
	}
	if err := netlink.LinkSetUp(lo); err != nil {
		return fmt.Errorf("bring lo up: %w", err)
	}
	return nil
}

func unpinNamespaces(dir string) {
	for _, ns := range podNamespaces {
		target := filepath.Join(dir, ns.name)
		_ = unix.Unmount(target, unix.MNT_DETACH)
		_ = os.Remove(target)
	}
}

// inNetns runs fn on a thread that is in the network namespace at path. The thread is
// discarded afterwards.
func inNetns(path string, fn func() error) error {
	return inNamespace(path, unix.CLONE_NEWNET, fn)
}

// inNamespace runs fn on a thread that is in the namespace of type nstype (a CLONE_NEW*
// flag) at path. The thread is discarded afterwards.
func inNamespace(path string, nstype int, fn func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread() // never unlocked: the thread dies with the goroutine
		f, err := os.Open(path)
		if err != nil {
			errc <- err
			return
		}
		defer f.Close()
		if err := unix.Setns(int(f.Fd()), nstype); err != nil {
			errc <- fmt.Errorf("enter namespace %s: %w", path, err)
			return
		}
		errc <- fn()
	}()
	return <-errc
}

// setHostname sets the host name of the UTS namespace pinned at path; "" leaves it.
func setHostname(path, hostname string) error {
	if hostname == "" {
		return nil
	}
	return inNamespace(path, unix.CLONE_NEWUTS, func() error {
		if err := unix.Sethostname([]byte(hostname)); err != nil {
			return fmt.Errorf("set hostname: %w", err)
		}
		return nil
	})
}
