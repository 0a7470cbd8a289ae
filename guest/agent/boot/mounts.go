// Package boot holds what the agent does as the guest's PID 1 before it serves the shim
// and after it stops: the base mounts, kernel modules, the console, and power-off.
package boot

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strings"

	"github.com/containerd/log"
	"golang.org/x/sys/unix"
)

type baseMount struct {
	source, target, fstype string
	flags                  uintptr
	data                   string
}

// The guest's own mounts, in order.
var baseMounts = []baseMount{
	{"proc", "/proc", "proc", unix.MS_NOSUID | unix.MS_NODEV | unix.MS_NOEXEC, ""},
	{"sysfs", "/sys", "sysfs", unix.MS_NOSUID | unix.MS_NODEV | unix.MS_NOEXEC, ""},
	{"devtmpfs", "/dev", "devtmpfs", unix.MS_NOSUID, "mode=0755"},
	{"devpts", "/dev/pts", "devpts", unix.MS_NOSUID | unix.MS_NOEXEC, "newinstance,ptmxmode=0666,mode=0620"},
	{"shm", "/dev/shm", "tmpfs", unix.MS_NOSUID | unix.MS_NODEV, "mode=1777"},
	{"cgroup2", "/sys/fs/cgroup", "cgroup2", unix.MS_NOSUID | unix.MS_NODEV | unix.MS_NOEXEC, "nsdelegate"},
	{"tmpfs", "/run", "tmpfs", unix.MS_NOSUID | unix.MS_NODEV, "mode=0755"},
	{"tmpfs", "/tmp", "tmpfs", unix.MS_NOSUID | unix.MS_NODEV, "mode=1777"},
}

// MountBase mounts proc, sys, dev (devtmpfs, pts, shm), the cgroup2 hierarchy and tmpfs
// on /run and /tmp. EnableControllers, next, makes the hierarchy usable.
func MountBase(ctx context.Context) error {
	for _, m := range baseMounts {
		if err := os.MkdirAll(m.target, 0o755); err != nil {
			return err
		}
		if err := unix.Mount(m.source, m.target, m.fstype, m.flags, m.data); err != nil {
			if errors.Is(err, unix.EBUSY) {
				continue // already mounted (devtmpfs may be, with CONFIG_DEVTMPFS_MOUNT)
			}
			return fmt.Errorf("mount %s on %s: %w", m.fstype, m.target, err)
		}
	}
	if err := os.Symlink("/proc/self/fd", "/dev/fd"); err != nil && !errors.Is(err, os.ErrExist) {
		return err
	}
	if err := os.Symlink("pts/ptmx", "/dev/ptmx"); err != nil && !errors.Is(err, os.ErrExist) {
		// devtmpfs has a ptmx node of its own; the pts one is the newinstance's.
		if rmErr := os.Remove("/dev/ptmx"); rmErr == nil {
			err = os.Symlink("pts/ptmx", "/dev/ptmx")
		}
		if err != nil {
			return err
		}
	}
	return nil
}

// EnableControllers writes every available controller of the cgroup dir into its
// cgroup.subtree_control, so that cgroups below it can use them.
func EnableControllers(ctx context.Context, dir string) error {
	avail, err := os.ReadFile(dir + "/cgroup.controllers")
	if err != nil {
		return err
	}
	var enable []string
	for _, c := range strings.Fields(string(avail)) {
		enable = append(enable, "+"+c)
	}
	if len(enable) == 0 {
		return nil
	}
	if err := os.WriteFile(dir+"/cgroup.subtree_control", []byte(strings.Join(enable, " ")), 0); err != nil {
		return fmt.Errorf("enable cgroup controllers %v: %w", enable, err)
	}
	log.G(ctx).WithField("controllers", enable).Debug("cgroup controllers enabled")
	return nil
}
