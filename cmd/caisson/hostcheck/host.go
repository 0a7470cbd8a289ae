package hostcheck

import (
	"context"
	"debug/elf"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"

	"github.com/containerd/containerd/v2/core/mount"
	"golang.org/x/sys/unix"

	"github.com/caisson-containers/caisson/guest/vmlinux"
	"github.com/caisson-containers/caisson/shim/config"
)

func guestArtifacts(c config.Config) []Result {
	var out []Result
	for _, f := range []struct{ item, path string }{{"guest-kernel", c.Guest.Kernel}, {"guest-initrd", c.Guest.Initramfs}} {
		st, err := os.Stat(f.path)
		switch {
		case err != nil:
			out = append(out, Result{f.item, Fail, fmt.Sprintf("%v: run `make guest` or set guest.* in the config", err)})
		case st.Size() == 0:
			out = append(out, Result{f.item, Fail, f.path + " is empty"})
		case f.item == "guest-kernel":
			format, err := kernelFormat(f.path)
			if err != nil {
				out = append(out, Result{f.item, Fail, fmt.Sprintf("%s: %v", f.path, err)})
				break
			}
			out = append(out, Result{f.item, OK, fmt.Sprintf("%s (%.1f MiB, %s)", f.path, float64(st.Size())/(1<<20), format)})
		default:
			out = append(out, Result{f.item, OK, fmt.Sprintf("%s (%.1f MiB)", f.path, float64(st.Size())/(1<<20))})
		}
	}
	return out
}

// kernelFormat says how QEMU would boot the kernel at path, or why it cannot: an ELF
// only through its PVH entry note (QEMU refuses one without it, and only when a VM
// starts), a bzImage through the firmware, slower (docs/guest.md).
func kernelFormat(path string) (string, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", err
	}
	defer f.Close()
	head := make([]byte, max(len(elf.ELFMAG), vmlinux.SniffSize))
	if _, err := io.ReadFull(f, head); err != nil {
		return "", fmt.Errorf("too short for a kernel: %w", err)
	}
	switch {
	case string(head[:4]) == elf.ELFMAG:
		entry, err := vmlinux.PVHEntry(f)
		if err != nil {
			return "", err
		}
		return fmt.Sprintf("ELF, PVH direct boot at %#x", entry), nil
	case vmlinux.IsBzImage(head):
		return "bzImage: boots through the firmware and decompresses itself, ~0.4 s slower under TCG and a copy of it in every QEMU; `make guest` builds the vmlinux", nil
	}
	return "", errors.New("neither an ELF kernel nor a bzImage")
}

// hostFeatures probes what the snapshotter and pod networking need on the host:
// containerd's differ loop-mounts EROFS layers and an ext4 writable image under
// an overlay to unpack images, and pods get a tap device each.
func hostFeatures(ctx context.Context) []Result {
	dir, err := os.MkdirTemp("", "caisson-check-")
	if err != nil {
		return []Result{{"host-probes", Fail, err.Error()}}
	}
	defer os.RemoveAll(dir)
	return []Result{
		probe("loop", func() (string, error) { return probeLoop(dir) }),
		probe("erofs", func() (string, error) { return probeErofs(ctx, dir) }),
		probe("overlay", func() (string, error) { return probeOverlay(dir) }),
		probe("tun", probeTap),
	}
}

func probe(item string, f func() (string, error)) Result {
	detail, err := f()
	if err != nil {
		if errors.Is(err, unix.EPERM) || errors.Is(err, unix.EACCES) {
			err = fmt.Errorf("%w (run as root)", err)
		}
		return Result{item, Fail, err.Error()}
	}
	return Result{item, OK, detail}
}

func probeLoop(dir string) (string, error) {
	f := filepath.Join(dir, "loop.img")
	if err := os.WriteFile(f, make([]byte, 1<<20), 0o600); err != nil {
		return "", err
	}
	dev, err := mount.AttachLoopDevice(f)
	if err != nil {
		return "", fmt.Errorf("attach a loop device: %w", err)
	}
	if err := mount.DetachLoopDevice(dev); err != nil {
		return "", fmt.Errorf("detach %s: %w", dev, err)
	}
	return "attached and detached " + dev, nil
}

func probeErofs(ctx context.Context, dir string) (string, error) {
	src, img, mnt := filepath.Join(dir, "erofs-src"), filepath.Join(dir, "probe.erofs"), filepath.Join(dir, "erofs-mnt")
	for _, d := range []string{src, mnt} {
		if err := os.Mkdir(d, 0o755); err != nil {
			return "", err
		}
	}
	if err := os.WriteFile(filepath.Join(src, "hello"), []byte("caisson"), 0o644); err != nil {
		return "", err
	}
	if out, err := exec.CommandContext(ctx, "mkfs.erofs", img, src).CombinedOutput(); err != nil {
		return "", fmt.Errorf("mkfs.erofs: %v: %s", err, strings.TrimSpace(string(out)))
	}
	m := mount.Mount{Type: "erofs", Source: img, Options: []string{"ro", "loop"}}
	if err := m.Mount(mnt); err != nil {
		return "", fmt.Errorf("mount an EROFS image: %w", err)
	}
	defer mount.UnmountAll(mnt, 0)
	b, err := os.ReadFile(filepath.Join(mnt, "hello"))
	if err != nil || string(b) != "caisson" {
		return "", fmt.Errorf("read back from EROFS: %q, %v", b, err)
	}
	return "mounted an EROFS image through a loop device", nil
}

func probeOverlay(dir string) (string, error) {
	var dirs []string
	for _, d := range []string{"lower", "upper", "work", "merged"} {
		p := filepath.Join(dir, "ovl-"+d)
		if err := os.Mkdir(p, 0o755); err != nil {
			return "", err
		}
		dirs = append(dirs, p)
	}
	m := mount.Mount{Type: "overlay", Source: "overlay",
		Options: []string{"lowerdir=" + dirs[0], "upperdir=" + dirs[1], "workdir=" + dirs[2]}}
	if err := m.Mount(dirs[3]); err != nil {
		return "", fmt.Errorf("mount an overlay: %w", err)
	}
	if err := mount.UnmountAll(dirs[3], 0); err != nil {
		return "", err
	}
	return "mounted an overlay", nil
}

// probeTap creates a non-persistent tap device, which the kernel removes when
// the file descriptor closes.
func probeTap() (string, error) {
	fd, err := unix.Open("/dev/net/tun", unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return "", fmt.Errorf("open /dev/net/tun: %w", err)
	}
	defer unix.Close(fd)
	ifr, err := unix.NewIfreq("caisprobe%d")
	if err != nil {
		return "", err
	}
	ifr.SetUint16(unix.IFF_TAP | unix.IFF_NO_PI)
	if err := unix.IoctlIfreq(fd, unix.TUNSETIFF, ifr); err != nil {
		return "", fmt.Errorf("create a tap device: %w", err)
	}
	return "created tap device " + ifr.Name(), nil
}

func tools() []Result {
	var out []Result
	for _, t := range []struct{ bin, why string }{
		{"mkfs.erofs", "the snapshotter builds layer images with it"},
		{"mkfs.ext4", "writable layers are ext4 images"},
	} {
		if p, err := exec.LookPath(t.bin); err != nil {
			out = append(out, Result{t.bin, Fail, "not found: " + t.why + " (make deps)"})
		} else {
			out = append(out, Result{t.bin, OK, p})
		}
	}
	return out
}

func cgroupVersion() Result {
	var st unix.Statfs_t
	if err := unix.Statfs("/sys/fs/cgroup", &st); err != nil {
		return Result{"cgroup", Fail, err.Error()}
	}
	if st.Type == unix.CGROUP2_SUPER_MAGIC {
		return Result{"cgroup", OK, "v2 (unified)"}
	}
	var u unix.Statfs_t
	if unix.Statfs("/sys/fs/cgroup/unified", &u) == nil && u.Type == unix.CGROUP2_SUPER_MAGIC {
		return Result{"cgroup", OK, "v1 (hybrid, with a v2 hierarchy at /sys/fs/cgroup/unified)"}
	}
	return Result{"cgroup", OK, "v1"}
}

// minFreeBytes is what the state root should have free: a few images' layers
// and writable layers.
const minFreeBytes = 2 << 30

func diskSpace(root string) Result {
	p := root
	for {
		var st unix.Statfs_t
		if err := unix.Statfs(p, &st); err == nil {
			free := st.Bavail * uint64(st.Bsize)
			detail := fmt.Sprintf("%.1f GiB free under %s", float64(free)/(1<<30), root)
			if p != root {
				detail += fmt.Sprintf(" (on %s; not created yet)", p)
			}
			if free < minFreeBytes {
				return Result{"disk", Warn, detail + ": less than 2 GiB"}
			}
			return Result{"disk", OK, detail}
		}
		if p == "/" || p == "." {
			return Result{"disk", Fail, "cannot stat " + root}
		}
		p = filepath.Dir(p)
	}
}
