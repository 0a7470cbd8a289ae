package qemu

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"

	"github.com/containerd/errdefs"

	"github.com/caisson-containers/caisson/shim/vmm"
	"github.com/caisson-containers/caisson/shim/vmm/qemu/jail"
	"github.com/caisson-containers/caisson/shim/vmm/qemu/qmp"
)

// A jailed QEMU (Config.Jail) runs as an unprivileged user without capabilities in a
// mount namespace of its own (package jail) where it sees /usr and the loader's cache
// read-only (its libraries and firmware), a few device nodes (null, zero, random,
// urandom; /dev/kvm with KVM), a procfs showing only its user's processes, the kernel
// and initramfs read-only, and the VM's state dir (its sockets), which it owns. A
// template VM's dir is writable too (see Jail).
//
// Everything else reaches it as a descriptor the shim opened: taps, the template's saved
// state, the console pipe as before; virtio-blk images through fd sets (-add-fd on the
// command line, QMP add-fd with SCM_RIGHTS for hot-plug, then filename=/dev/fdset/N, which
// QEMU dups instead of opening a path); virtio-pmem images and a template's RAM through
// /proc/self/fd/N, since memory-backend-file takes a path only (the kernel checks the
// file's mode on that open, so the shim grants the jail's user access with an ACL entry);
// the virtio-fs daemon's socket as a connected descriptor (chardev fd=N).

// Jail runs QEMU jailed as UID and GID. The state dir is chowned to them. A template's
// dir is bind-mounted writable and chowned too: QEMU 7.2 opens a template's RAM file
// read-write even for VMs that map it privately, so a jailed QEMU of any VM made from a
// template can write the template's memory (docs/security.md).
type Jail struct {
	// User, if set, names the user (jail.LookupUser) whose UID and GID New fills in.
	User     string
	UID, GID uint32
}

// jailRootName is the directory in the state dir the jail's root is mounted on (in the
// jail's namespace only).
const jailRootName = "jail"

// jailed says whether QEMU runs jailed.
func (v *VM) jailed() bool { return v.qcfg.Jail != nil }

// prepareJail gives the jail's user the state dir (and a template's dir) and makes the
// jail root's mount point.
func (v *VM) prepareJail() error {
	j := v.qcfg.Jail
	if j.UID == 0 || j.GID == 0 {
		return fmt.Errorf("jail user %d:%d: not root: %w", j.UID, j.GID, errdefs.ErrInvalidArgument)
	}
	if err := os.Chown(v.cfg.StateDir, int(j.UID), int(j.GID)); err != nil {
		return err
	}
	if err := os.Chmod(v.cfg.StateDir, 0o700); err != nil {
		return err
	}
	if err := os.Mkdir(v.jailRoot(), 0o700); err != nil && !os.IsExist(err) {
		return err
	}
	if t := v.cfg.Template; t != nil {
		if err := os.Chown(t.Dir, int(j.UID), int(j.GID)); err != nil {
			return err
		}
		if err := grantAccess(filepath.Join(t.Dir, vmm.TemplateMemory), j.UID, true); err != nil && !os.IsNotExist(err) {
			return err
		}
	}
	return nil
}

func (v *VM) jailRoot() string { return filepath.Join(v.cfg.StateDir, jailRootName) }

// jailCommand is QEMU's command in its jail.
func (v *VM) jailCommand(bin string, args []string, accel string) (*exec.Cmd, error) {
	j := v.qcfg.Jail
	s := jail.Spec{
		Root:     v.jailRoot(),
		Symlinks: map[string]string{"/dev/fd": "/proc/self/fd"},
		UID:      j.UID,
		GID:      j.GID,
		Dir:      v.cfg.StateDir,
		Argv:     append([]string{bin}, args...),
		Parent:   os.Getpid(),
	}
	ro := func(p string) { s.Mounts = append(s.Mounts, jail.Mount{Kind: jail.Bind, Source: p, Target: p}) }
	ro("/usr")
	if _, err := os.Stat("/etc/ld.so.cache"); err == nil {
		ro("/etc/ld.so.cache")
	}
	// A merged /usr has /lib -> usr/lib and so on; elsewhere they are directories.
	for _, p := range []string{"/bin", "/sbin", "/lib", "/lib64"} {
		if target, err := os.Readlink(p); err == nil {
			s.Symlinks[p] = target
		} else if st, err := os.Stat(p); err == nil && st.IsDir() {
			ro(p)
		}
	}
	if !strings.HasPrefix(bin, "/usr/") {
		ro(bin)
	}
	for _, d := range []string{"/dev/null", "/dev/zero", "/dev/random", "/dev/urandom"} {
		ro(d)
	}
	if accel == "kvm" {
		ro("/dev/kvm")
		var st syscall.Stat_t
		if err := syscall.Stat("/dev/kvm", &st); err == nil && st.Gid != 0 {
			s.Groups = append(s.Groups, st.Gid)
		}
	}
	s.Mounts = append(s.Mounts, jail.Mount{Kind: jail.Proc, Target: "/proc"})
	ro(v.cfg.Kernel)
	if v.cfg.Initramfs != "" {
		ro(v.cfg.Initramfs)
	}
	s.Mounts = append(s.Mounts, jail.Mount{Kind: jail.Bind, Source: v.cfg.StateDir, Target: v.cfg.StateDir, Writable: true})
	if t := v.cfg.Template; t != nil {
		s.Mounts = append(s.Mounts, jail.Mount{Kind: jail.Bind, Source: t.Dir, Target: t.Dir, Writable: true})
	}
	return jail.Command(s)
}

// openDisk opens a disk's file for a jailed QEMU, in the mode the device uses it, and
// lets the jail's user open it again through /proc/self/fd where QEMU needs a path (PMEM).
func (v *VM) openDisk(d vmm.Disk) (*os.File, error) {
	flag := os.O_RDONLY
	if !d.ReadOnly {
		flag = os.O_RDWR
	}
	f, err := os.OpenFile(d.Path, flag|syscall.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("disk %q: %w", d.ID, err)
	}
	if d.Kind == vmm.PMEM {
		if err := grantAccess(d.Path, v.qcfg.Jail.UID, !d.ReadOnly); err != nil {
			f.Close()
			return nil, fmt.Errorf("disk %q: %w", d.ID, err)
		}
	}
	return f, nil
}

// jailedPath is the path a jailed QEMU opens a disk by: its fd set (Block) or its
// descriptor (PMEM).
func jailedPath(d vmm.Disk, fdset, fd int) string {
	if d.Kind == vmm.PMEM {
		return fmt.Sprintf("/proc/self/fd/%d", fd)
	}
	return fmt.Sprintf("/dev/fdset/%d", fdset)
}

// openedAs makes the backend open path (a jailed QEMU's /dev/fdset/N or /proc/self/fd/N)
// instead of the disk's host path, which chose its driver (fileDriver).
func (b backend) openedAs(path string) {
	if f, ok := b.args["file"].(map[string]any); ok {
		f["filename"] = path
	} else {
		b.args["mem-path"] = path
	}
}

// addFD hands f to QEMU in a new fd set and returns the set's id and QEMU's descriptor.
func addFD(ctx context.Context, c *qmp.Client, f *os.File) (fdset, fd int, err error) {
	var r struct {
		FDSet int `json:"fdset-id"`
		FD    int `json:"fd"`
	}
	if err := c.ExecuteWithFile(ctx, "add-fd", nil, &r, f); err != nil {
		return 0, 0, err
	}
	return r.FDSet, r.FD, nil
}

// removeFD closes QEMU's descriptors of an fd set once nothing uses them.
func removeFD(ctx context.Context, c *qmp.Client, fdset int) error {
	return c.Execute(ctx, "remove-fd", map[string]any{"fdset-id": fdset}, nil)
}

// dialSharedFS connects to the virtio-fs daemon's socket for QEMU: for a jailed QEMU,
// which cannot reach the socket's path, and for a hot-plugged device (AttachSharedFS).
func dialSharedFS(path string) (*os.File, error) {
	fd, err := syscall.Socket(syscall.AF_UNIX, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, err
	}
	if err := syscall.Connect(fd, &syscall.SockaddrUnix{Name: path}); err != nil {
		syscall.Close(fd)
		return nil, fmt.Errorf("virtio-fs socket %s: %w", path, err)
	}
	return os.NewFile(uintptr(fd), path), nil
}
