package boot

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"golang.org/x/sys/unix"

	"github.com/caisson-containers/caisson/guest/agent/modprobe"
	"github.com/caisson-containers/caisson/guest/initramfs/moddep"
)

// ModulesStorageID is the storage id under which the shim has the agent mount the
// kernel's modules image (an EROFS of /lib/modules, one directory per kernel release,
// built beside the kernel). The shim's shim/pod/modules.go uses the same id.
const ModulesStorageID = "kernel-modules"

// SetModprobe makes the kernel run the guest's modprobe (the agent, see package modprobe)
// when it needs a module: request_module runs the path in /proc/sys/kernel/modprobe, in
// the guest's own root, where no container can replace it.
//
// The link to the agent is made here, not carried by the initramfs: before the agent
// runs, the kernel's own requests then fail at once, as in a guest without modprobe.
// With the link in the image, the kernel ran the agent as modprobe twice during its
// initcalls (the crypto KDF self-test asks for "crypto-hmac(sha256)" and its "-all",
// both built in), each a start of the Go runtime under TCG, and waited for the
// initramfs to be unpacked first: 0.15-0.4 s of every boot before /init.
func SetModprobe() error {
	if err := linkModprobe(modprobe.Path, "/init"); err != nil {
		return err
	}
	if err := os.WriteFile("/proc/sys/kernel/modprobe", []byte(modprobe.Path), 0); err != nil {
		return fmt.Errorf("set the kernel's modprobe: %w", err)
	}
	return nil
}

// linkModprobe makes path a symbolic link to the agent at init, unless it is one
// already.
func linkModprobe(path, init string) error {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return fmt.Errorf("modprobe link: %w", err)
	}
	err := os.Symlink(init, path)
	if errors.Is(err, os.ErrExist) {
		if to, rerr := os.Readlink(path); rerr == nil && to == init {
			return nil
		}
	}
	if err != nil {
		return fmt.Errorf("modprobe link: %w", err)
	}
	return nil
}

// UseModulesImage puts the modules image mounted at mnt in place of the initramfs's
// module tree: its directory for the running kernel is bind-mounted on
// /lib/modules/$(uname -r), where modprobe finds every module of the kernel; and the device
// nodes that load a module when opened (modules.devname: /dev/net/tun, /dev/fuse, ...)
// are made in /dev, as kmod's static-nodes does for systemd.
func UseModulesImage(ctx context.Context, mnt string) error {
	dir, err := modprobe.Dir()
	if err != nil {
		return err
	}
	src := filepath.Join(mnt, filepath.Base(dir))
	if _, err := os.Stat(filepath.Join(src, moddep.FileName)); err != nil {
		releases, _ := filepath.Glob(filepath.Join(mnt, "*", moddep.FileName))
		for i, r := range releases {
			releases[i] = filepath.Base(filepath.Dir(r))
		}
		return fmt.Errorf("the modules image has no modules for kernel %s (it has %v): %w", filepath.Base(dir), releases, errdefs.ErrNotFound)
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	if err := unix.Mount(src, dir, "", unix.MS_BIND|unix.MS_RDONLY, ""); err != nil {
		return fmt.Errorf("bind the modules image on %s: %w", dir, err)
	}
	// A bind mount keeps the source's flags only once remounted read-only.
	if err := unix.Mount("", dir, "", unix.MS_REMOUNT|unix.MS_BIND|unix.MS_RDONLY|unix.MS_NOSUID|unix.MS_NODEV, ""); err != nil {
		_ = unix.Unmount(dir, unix.MNT_DETACH)
		return fmt.Errorf("remount %s read-only: %w", dir, err)
	}
	n, err := staticNodes(filepath.Join(dir, moddep.DevnameFileName), "/dev")
	if err != nil {
		log.G(ctx).WithError(err).Warn("device nodes of on-demand modules")
	}
	log.G(ctx).WithFields(log.Fields{"dir": dir, "nodes": n}).Debug("kernel modules image in place")
	return nil
}

// staticNodes makes under dev the nodes a modules.devname lists that are not there yet.
func staticNodes(devname, dev string) (int, error) {
	f, err := os.Open(devname)
	if errors.Is(err, os.ErrNotExist) {
		return 0, nil
	}
	if err != nil {
		return 0, err
	}
	defer f.Close()
	nodes, err := moddep.ParseDevnames(f)
	if err != nil {
		return 0, err
	}
	made := 0
	var errs []error
	for _, d := range nodes {
		p := filepath.Join(dev, d.Name)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			errs = append(errs, err)
			continue
		}
		mode := uint32(unix.S_IFCHR | 0o600)
		if d.Type == 'b' {
			mode = unix.S_IFBLK | 0o600
		}
		if d.Name == "net/tun" || d.Name == "fuse" {
			mode |= 0o066 // as udev makes them: anyone may open them (the kernel checks the rest)
		}
		err := unix.Mknod(p, mode, int(unix.Mkdev(d.Major, d.Minor)))
		if err == nil {
			err = unix.Chmod(p, mode&0o777) // not the umask's
		}
		switch {
		case err == nil:
			made++
		case !errors.Is(err, unix.EEXIST):
			errs = append(errs, fmt.Errorf("mknod %s: %w", p, err))
		}
	}
	return made, errors.Join(errs...)
}
