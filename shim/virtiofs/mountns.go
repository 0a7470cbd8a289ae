package virtiofs

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// The shares live in virtiofsd's mount namespace only, never in the host's: a host
// path that is shared stays free of host mounts, so the kubelet (or critest) can
// unmount and remove it while the pod runs, as it can with runc, whose container
// mounts are also in a namespace of their own; removing the pod's state from the host
// can never reach a shared path (the host sees only empty placeholders); and the
// shares vanish with virtiofsd, whatever happens to the shim.
//
// virtiofsd (-o sandbox=namespace) unshares its mount namespace, forks, and its child
// pivots into the shared directory. A share is a detached copy of the host path's
// mount tree (open_tree), attached with move_mount on its placeholder from a thread
// that has joined that namespace.

// sandbox returns virtiofsd's sandboxed child, once it has pivoted into the shared
// directory (its root is then the shared directory itself).
func (d *Daemon) sandbox() (int, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.sandboxPid != 0 {
		return d.sandboxPid, nil
	}
	var want unix.Stat_t
	if err := unix.Stat(d.cfg.Dir, &want); err != nil {
		return 0, err
	}
	pid := d.cmd.Process.Pid
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/task/%d/children", pid, pid))
		for _, f := range strings.Fields(string(b)) {
			child, err := strconv.Atoi(f)
			if err != nil {
				continue
			}
			var root unix.Stat_t
			if unix.Stat(fmt.Sprintf("/proc/%d/root", child), &root) == nil && root.Dev == want.Dev && root.Ino == want.Ino {
				d.sandboxPid = child
				return child, nil
			}
		}
		select {
		case <-d.done:
			return 0, fmt.Errorf("virtiofsd exited: %w", d.err)
		default:
		}
		if time.Now().After(deadline) {
			return 0, errors.New("virtiofsd's sandbox did not appear")
		}
	}
}

// inMountNamespace runs fn on a thread that has joined pid's mount namespace, with
// its working directory at dir (opened before, as dir is in that namespace only). The
// thread is never used again: it ends with its goroutine.
func inMountNamespace(pid int, dir *os.File, fn func() error) error {
	ns, err := os.Open(fmt.Sprintf("/proc/%d/ns/mnt", pid))
	if err != nil {
		return err
	}
	defer ns.Close()
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread() // and never unlocked
		if err := unix.Unshare(unix.CLONE_FS); err != nil {
			errc <- fmt.Errorf("unshare the thread's filesystem attributes: %w", err)
			return
		}
		if err := unix.Setns(int(ns.Fd()), unix.CLONE_NEWNS); err != nil {
			errc <- fmt.Errorf("join virtiofsd's mount namespace: %w", err)
			return
		}
		if err := unix.Fchdir(int(dir.Fd())); err != nil {
			errc <- err
			return
		}
		errc <- fn()
	}()
	return <-errc
}

// attach mounts tree, a detached copy of src's mounts (open_tree), restricted by
// access, on the placeholder name in virtiofsd's namespace.
func (d *Daemon) attach(tree int, src, name string, access Access) error {
	pid, err := d.sandbox()
	if err != nil {
		return err
	}
	if err := restrict(tree, access); err != nil {
		return fmt.Errorf("make the share of %s read-only: %w", src, err)
	}
	root, err := os.Open(fmt.Sprintf("/proc/%d/root", pid))
	if err != nil {
		return err
	}
	defer root.Close()
	return inMountNamespace(pid, root, func() error {
		if err := unix.MoveMount(tree, "", unix.AT_FDCWD, name, unix.MOVE_MOUNT_F_EMPTY_PATH); err != nil {
			return fmt.Errorf("mount the share of %s: %w", src, err)
		}
		return nil
	})
}

// detach unmounts name (with what is below it) in virtiofsd's namespace; nothing to
// do once virtiofsd is gone, its namespace with it.
func (d *Daemon) detach(name string) error {
	d.mu.Lock()
	pid := d.sandboxPid
	d.mu.Unlock()
	if pid == 0 {
		return nil
	}
	root, err := os.Open(fmt.Sprintf("/proc/%d/root", pid))
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	defer root.Close()
	err = inMountNamespace(pid, root, func() error { return unix.Unmount(name, unix.MNT_DETACH) })
	if err == unix.EINVAL || err == unix.ENOENT || errors.Is(err, os.ErrNotExist) {
		return nil
	}
	return err
}

// restrict makes the detached tree as read-only as access says. The guest could
// ignore a read-only mount of its own: the host's is read-only too, so virtiofsd
// cannot write through it.
func restrict(tree int, access Access) error {
	var flags uint = unix.AT_EMPTY_PATH
	switch access {
	case ReadWrite:
		return nil
	case RecursiveReadOnly:
		flags |= unix.AT_RECURSIVE
	}
	return unix.MountSetattr(tree, "", flags, &unix.MountAttr{Attr_set: unix.MOUNT_ATTR_RDONLY})
}

// Path is where the host reaches the share name, through virtiofsd's namespace (the
// host's own placeholder is empty).
func (d *Daemon) Path(name string) (string, error) {
	pid, err := d.sandbox()
	if err != nil {
		return "", err
	}
	return filepath.Join(fmt.Sprintf("/proc/%d/root", pid), name), nil
}
