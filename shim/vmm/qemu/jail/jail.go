// Package jail runs a program (QEMU) the way Firecracker's jailer does: as an unprivileged
// user, without capabilities (its bounding set empty too) and with no_new_privs, in a
// mount namespace of its own whose root is a small read-only tmpfs holding only the
// files it was given, each bind-mounted at the path the program knows it by.
//
// Go cannot run code between fork and exec, so Command starts the calling binary again
// (/proc/self/exe) under the name Arg0, in a new mount namespace; this package's init
// function recognises the name, builds the jail, drops privileges and execs the program,
// which keeps the process id (the caller's exec.Cmd sees the program's pid). Every binary
// that runs a jail must therefore import this package, which every binary importing
// shim/vmm/qemu does.
package jail

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"syscall"

	"github.com/containerd/errdefs"
	"golang.org/x/sys/unix"
)

// Arg0 is the name under which the binary builds a jail instead of running its main.
const Arg0 = "caisson-jail"

// specEnv carries the Spec to the jail builder; the program gets an empty environment.
const specEnv = "CAISSON_JAIL_SPEC"

// Kinds of Mount.
const (
	// Bind bind-mounts Source (a file, directory, socket or device node) at Target.
	Bind = "bind"
	// Proc mounts a procfs of the jail's pid namespace at Target, on which the
	// program sees only its own user's processes (hidepid=invisible).
	Proc = "proc"
)

// Mount is one thing the program sees.
type Mount struct {
	Kind string `json:"kind"`
	// Source is the host path of a Bind.
	Source string `json:"source,omitempty"`
	// Target is where the program sees it: an absolute path in the jail.
	Target string `json:"target"`
	// Writable leaves a Bind writable; otherwise it is read-only.
	Writable bool `json:"writable,omitempty"`
}

// Spec is a jail and the program it runs.
type Spec struct {
	// Root is an empty host directory: the jail's root is a tmpfs mounted on it in the
	// jail's mount namespace only, so nothing of the jail is visible on the host.
	Root   string  `json:"root"`
	Mounts []Mount `json:"mounts"`
	// Symlinks are made in the jail: path -> target (/lib -> usr/lib, /dev/fd -> ...).
	Symlinks map[string]string `json:"symlinks,omitempty"`
	UID      uint32            `json:"uid"`
	GID      uint32            `json:"gid"`
	// Groups are the program's supplementary groups (the group of /dev/kvm).
	Groups []uint32 `json:"groups,omitempty"`
	// Dir is the program's working directory, in the jail.
	Dir string `json:"dir"`
	// Argv is the program and its arguments; Argv[0] is an absolute path in the jail.
	Argv []string `json:"argv"`
	// Parent is the pid whose death kills the program (the caller sets Pdeathsig; a
	// change of user clears it, so the jail sets it again).
	Parent int `json:"parent"`
}

// LookupUser resolves whom a jail runs as: a user name (with its primary group, from the
// host's user database) or "UID:GID". Root is refused.
func LookupUser(name string) (uid, gid uint32, err error) {
	var u, g uint64
	if us, gs, ok := strings.Cut(name, ":"); ok {
		var err1, err2 error
		u, err1 = strconv.ParseUint(us, 10, 32)
		g, err2 = strconv.ParseUint(gs, 10, 32)
		if err1 != nil || err2 != nil {
			return 0, 0, fmt.Errorf("jail user %q: want a user name or UID:GID: %w", name, errdefs.ErrInvalidArgument)
		}
	} else {
		usr, err := user.Lookup(name)
		if err != nil {
			return 0, 0, fmt.Errorf("jail user %q: %v (make deps creates caisson-qemu): %w", name, err, errdefs.ErrNotFound)
		}
		u, _ = strconv.ParseUint(usr.Uid, 10, 32)
		g, _ = strconv.ParseUint(usr.Gid, 10, 32)
	}
	if u == 0 || g == 0 {
		return 0, 0, fmt.Errorf("jail user %q: is root, whom the jail is to keep QEMU from being: %w", name, errdefs.ErrInvalidArgument)
	}
	return uint32(u), uint32(g), nil
}

// Validate checks what the jail builder would otherwise fail on later.
func (s Spec) Validate() error {
	switch {
	case !filepath.IsAbs(s.Root):
		return fmt.Errorf("jail root %q: not an absolute path: %w", s.Root, errdefs.ErrInvalidArgument)
	case s.UID == 0 || s.GID == 0:
		return fmt.Errorf("jail uid %d gid %d: the jail is for an unprivileged user, not root: %w", s.UID, s.GID, errdefs.ErrInvalidArgument)
	case len(s.Argv) == 0 || !filepath.IsAbs(s.Argv[0]):
		return fmt.Errorf("jail program %q: want an absolute path: %w", s.Argv, errdefs.ErrInvalidArgument)
	}
	for _, m := range s.Mounts {
		if !filepath.IsAbs(m.Target) || filepath.Clean(m.Target) == "/" {
			return fmt.Errorf("jail mount target %q: want an absolute path below /: %w", m.Target, errdefs.ErrInvalidArgument)
		}
		if m.Kind != Bind && m.Kind != Proc {
			return fmt.Errorf("jail mount %q: kind %q: %w", m.Target, m.Kind, errdefs.ErrInvalidArgument)
		}
	}
	return nil
}

// Command returns the command that runs s.Argv in the jail. The caller adds its
// descriptors, output and SysProcAttr fields (Setpgid, Pdeathsig) and starts it.
func Command(s Spec) (*exec.Cmd, error) {
	if err := s.Validate(); err != nil {
		return nil, err
	}
	b, err := json.Marshal(s)
	if err != nil {
		return nil, err
	}
	cmd := &exec.Cmd{
		Path: "/proc/self/exe",
		Args: []string{Arg0},
		Env:  []string{specEnv + "=" + string(b)},
		// A mount namespace of its own (mounts made in it stay in it); a pid namespace
		// (every jailed program runs as the same user: in its own pid namespace it
		// cannot name, signal or ptrace another); a network namespace with nothing but
		// a loopback that is down (descriptors it is given, a tap, a unix socket, still
		// work; the host's network, its abstract unix sockets included, is out of
		// reach); IPC and UTS namespaces.
		SysProcAttr: &syscall.SysProcAttr{Cloneflags: syscall.CLONE_NEWNS | syscall.CLONE_NEWPID |
			syscall.CLONE_NEWNET | syscall.CLONE_NEWIPC | syscall.CLONE_NEWUTS},
	}
	return cmd, nil
}

func init() {
	if len(os.Args) == 0 || os.Args[0] != Arg0 {
		return
	}
	err := enter()
	fmt.Fprintf(os.Stderr, "caisson jail: %v\n", err)
	os.Exit(125)
}

// enter builds the jail described by the environment and execs its program; it returns
// only on error.
func enter() error {
	runtime.LockOSThread()
	var s Spec
	if err := json.Unmarshal([]byte(os.Getenv(specEnv)), &s); err != nil {
		return fmt.Errorf("spec: %w", err)
	}
	if err := s.Validate(); err != nil {
		return err
	}
	// Nothing mounted here reaches the host's namespace, and nothing unmounted there
	// needs to reach here: the old root goes below.
	if err := unix.Mount("", "/", "", unix.MS_REC|unix.MS_PRIVATE, ""); err != nil {
		return fmt.Errorf("make / private: %w", err)
	}
	if err := unix.Mount("tmpfs", s.Root, "tmpfs", unix.MS_NOSUID|unix.MS_NODEV|unix.MS_NOEXEC, "mode=0755,size=1m,nr_inodes=4096"); err != nil {
		return fmt.Errorf("jail root %s: %w", s.Root, err)
	}
	for _, m := range s.Mounts {
		if err := mount(s.Root, m); err != nil {
			return err
		}
	}
	for link, target := range s.Symlinks {
		p := filepath.Join(s.Root, link)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			return err
		}
		if err := os.Symlink(target, p); err != nil {
			return fmt.Errorf("symlink %s: %w", link, err)
		}
	}
	old := filepath.Join(s.Root, ".old")
	if err := os.Mkdir(old, 0o700); err != nil {
		return err
	}
	if err := unix.PivotRoot(s.Root, old); err != nil {
		return fmt.Errorf("pivot_root: %w", err)
	}
	if err := unix.Chdir("/"); err != nil {
		return err
	}
	if err := unix.Unmount("/.old", unix.MNT_DETACH); err != nil {
		return fmt.Errorf("detach the host's root: %w", err)
	}
	if err := os.Remove("/.old"); err != nil {
		return err
	}
	if err := unix.Mount("", "/", "", unix.MS_REMOUNT|unix.MS_RDONLY|unix.MS_NOSUID|unix.MS_NODEV|unix.MS_NOEXEC, ""); err != nil {
		return fmt.Errorf("jail root read-only: %w", err)
	}
	// No capability can come back: empty the bounding set while we may.
	for c := 0; ; c++ {
		if err := unix.Prctl(unix.PR_CAPBSET_DROP, uintptr(c), 0, 0, 0); err != nil {
			if errors.Is(err, unix.EINVAL) {
				break // past the last capability
			}
			return fmt.Errorf("drop capability %d: %w", c, err)
		}
	}
	groups := make([]int, len(s.Groups))
	for i, g := range s.Groups {
		groups[i] = int(g)
	}
	if err := syscall.Setgroups(groups); err != nil {
		return fmt.Errorf("setgroups: %w", err)
	}
	if err := syscall.Setresgid(int(s.GID), int(s.GID), int(s.GID)); err != nil {
		return fmt.Errorf("setresgid %d: %w", s.GID, err)
	}
	// From uid 0 to another in all three ids: the permitted, effective and ambient
	// capabilities are cleared.
	if err := syscall.Setresuid(int(s.UID), int(s.UID), int(s.UID)); err != nil {
		return fmt.Errorf("setresuid %d: %w", s.UID, err)
	}
	if err := unix.Prctl(unix.PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0); err != nil {
		return fmt.Errorf("no_new_privs: %w", err)
	}
	// The change of user cleared the parent-death signal the caller asked for.
	if err := unix.Prctl(unix.PR_SET_PDEATHSIG, uintptr(unix.SIGKILL), 0, 0, 0); err != nil {
		return fmt.Errorf("pdeathsig: %w", err)
	}
	// In its own pid namespace the program's parent is out of sight (getppid is 0): a
	// parent that died between the change of user and here, a few system calls, goes
	// unnoticed. With a visible parent, check.
	if ppid := os.Getppid(); ppid != 0 && s.Parent != 0 && ppid != s.Parent {
		return fmt.Errorf("parent %d gone", s.Parent)
	}
	if s.Dir != "" {
		if err := unix.Chdir(s.Dir); err != nil {
			return fmt.Errorf("chdir %s: %w", s.Dir, err)
		}
	}
	return fmt.Errorf("exec %s: %w", s.Argv[0], unix.Exec(s.Argv[0], s.Argv, []string{}))
}

// mount makes m under root.
func mount(root string, m Mount) error {
	target := filepath.Join(root, m.Target)
	switch m.Kind {
	case Proc:
		if err := os.MkdirAll(target, 0o755); err != nil {
			return err
		}
		if err := unix.Mount("proc", target, "proc", unix.MS_NOSUID|unix.MS_NODEV|unix.MS_NOEXEC, "hidepid=invisible"); err != nil {
			return fmt.Errorf("proc at %s: %w", m.Target, err)
		}
		return nil
	}
	st, err := os.Stat(m.Source)
	if err != nil {
		return fmt.Errorf("bind %s: %w", m.Source, err)
	}
	if st.IsDir() {
		err = os.MkdirAll(target, 0o755)
	} else if err = os.MkdirAll(filepath.Dir(target), 0o755); err == nil {
		var f *os.File
		if f, err = os.OpenFile(target, os.O_CREATE|os.O_WRONLY, 0o644); err == nil {
			f.Close()
		}
	}
	if err != nil {
		return fmt.Errorf("bind target %s: %w", m.Target, err)
	}
	if err := unix.Mount(m.Source, target, "", unix.MS_BIND, ""); err != nil {
		return fmt.Errorf("bind %s at %s: %w", m.Source, m.Target, err)
	}
	flags := uintptr(unix.MS_REMOUNT | unix.MS_BIND | unix.MS_NOSUID)
	if st.Mode()&os.ModeDevice == 0 {
		flags |= unix.MS_NODEV
	}
	if !m.Writable {
		flags |= unix.MS_RDONLY
	}
	if err := unix.Mount("", target, "", flags, ""); err != nil {
		return fmt.Errorf("remount %s: %w", m.Target, err)
	}
	return nil
}
