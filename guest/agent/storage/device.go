package storage

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/containerd/errdefs"
)

// Device names a disk the shim attached, by where it sits on the PCI bus or by its
// virtio-blk serial.
type Device struct {
	// PCIPath is the device's path from the root bus: one "SS.F" (slot.function, hex)
	// per hop, separated by "/". "08.0/00.0" is the device in slot 0 behind the root
	// port in slot 8 of bus 0 (where the shim cold-plugs a disk); "1c.0/01.0" the device
	// in slot 1 of the PCI bridge in slot 1c of bus 0 (where it hot-plugs one). Bus
	// numbers are not part of it: the guest assigns them.
	PCIPath string
	// Serial is a virtio-blk disk's serial number (QEMU's serial= property).
	Serial string
	// Tag is a virtio-fs device's tag (storage VirtioFS only).
	Tag string
}

func (d Device) String() string {
	if d.Tag != "" {
		return "virtiofs " + d.Tag
	}
	if d.PCIPath != "" {
		return "pci " + d.PCIPath
	}
	return "serial " + d.Serial
}

// Finder locates the block devices of attached disks in sysfs.
type Finder struct {
	// Sys is where sysfs is mounted; Dev where devtmpfs is.
	Sys, Dev string
	// Poll is how often to look again for a device that is not there yet.
	Poll time.Duration
}

// DefaultFinder looks in /sys and /dev.
var DefaultFinder = Finder{Sys: "/sys", Dev: "/dev", Poll: 20 * time.Millisecond}

// Find waits, until ctx is done, for the block device of d to appear (hot-plugged disks
// take a moment) and returns its node, such as /dev/vda or /dev/pmem0.
func (f Finder) Find(ctx context.Context, d Device) (string, error) {
	if (d.PCIPath == "") == (d.Serial == "") {
		return "", fmt.Errorf("a device needs exactly one of a PCI path and a serial: %w", errdefs.ErrInvalidArgument)
	}
	if d.PCIPath != "" {
		if _, err := parsePCIPath(d.PCIPath); err != nil {
			return "", err
		}
	}
	for {
		name, err := f.lookup(d)
		if err == nil {
			node := filepath.Join(f.Dev, name)
			if f.ready(name, node) {
				return node, nil
			}
		} else if !errors.Is(err, errdefs.ErrNotFound) {
			return "", err
		}
		select {
		case <-ctx.Done():
			return "", fmt.Errorf("device %s did not appear: %w", d, errdefs.ErrNotFound)
		case <-time.After(f.Poll):
		}
	}
}

// ready reports whether a found disk can be used: the kernel creates its node and
// sysfs entry a moment before the disk is live, and opening it in that window fails
// with ENXIO (which a mount then reports as "no such device or address").
func (f Finder) ready(name, node string) bool {
	size, err := os.ReadFile(filepath.Join(f.Sys, "block", name, "size"))
	if err != nil || strings.TrimSpace(string(size)) == "0" {
		return false
	}
	fd, err := os.OpenFile(node, os.O_RDONLY, 0)
	if err != nil {
		return false
	}
	fd.Close()
	return true
}

func (f Finder) lookup(d Device) (string, error) {
	if d.Serial != "" {
		return f.bySerial(d.Serial)
	}
	return f.byPCIPath(d.PCIPath)
}

func (f Finder) bySerial(serial string) (string, error) {
	entries, err := os.ReadDir(filepath.Join(f.Sys, "block"))
	if err != nil {
		return "", err
	}
	for _, e := range entries {
		b, err := os.ReadFile(filepath.Join(f.Sys, "block", e.Name(), "serial"))
		if err == nil && strings.TrimSpace(string(b)) == serial {
			return e.Name(), nil
		}
	}
	return "", errdefs.ErrNotFound
}

// isPCISlot reports whether s is a lower-case slot and function, SS.F. (Plain code, not
// a regexp: a regexp compiled at package init would run again in every container's
// `runc init`, which is this binary.)
func isPCISlot(s string) bool {
	return len(s) == 4 && isHex(s[:2]) && s[2] == '.' && s[3] >= '0' && s[3] <= '7'
}

// isPCIAddr reports whether s is a lower-case PCI address, DDDD:BB:SS.F.
func isPCIAddr(s string) bool {
	return len(s) == 12 && isHex(s[:4]) && s[4] == ':' && isHex(s[5:7]) && s[7] == ':' && isPCISlot(s[8:])
}

func isHex(s string) bool {
	for i := 0; i < len(s); i++ {
		if c := s[i]; (c < '0' || c > '9') && (c < 'a' || c > 'f') {
			return false
		}
	}
	return true
}

func parsePCIPath(p string) ([]string, error) {
	parts := strings.Split(strings.ToLower(p), "/")
	for _, s := range parts {
		if !isPCISlot(s) {
			return nil, fmt.Errorf("PCI path %q: want SS.F[/SS.F...], bad hop %q: %w", p, s, errdefs.ErrInvalidArgument)
		}
	}
	return parts, nil
}

// byPCIPath walks from the first device of the path through each bridge to the last one,
// then finds the block device under it (vdX for virtio-blk; pmemN, two buses deeper,
// for virtio-pmem).
func (f Finder) byPCIPath(p string) (string, error) {
	parts, _ := parsePCIPath(p)
	dir, err := filepath.EvalSymlinks(filepath.Join(f.Sys, "bus", "pci", "devices", "0000:00:"+parts[0]))
	if err != nil {
		return "", errdefs.ErrNotFound
	}
	for _, slot := range parts[1:] {
		entries, err := os.ReadDir(dir)
		if err != nil {
			return "", errdefs.ErrNotFound
		}
		next := ""
		for _, e := range entries {
			if e.IsDir() && isPCIAddr(e.Name()) && strings.HasSuffix(e.Name(), ":"+slot) {
				next = filepath.Join(dir, e.Name())
				break
			}
		}
		if next == "" {
			return "", errdefs.ErrNotFound
		}
		dir = next
	}
	var found string
	_ = filepath.WalkDir(dir, func(path string, d fs.DirEntry, err error) error {
		if err != nil || found != "" {
			return fs.SkipDir
		}
		if d.IsDir() && d.Name() == "block" && path != dir {
			if entries, err := os.ReadDir(path); err == nil && len(entries) > 0 {
				found = entries[0].Name()
			}
			return fs.SkipDir
		}
		return nil
	})
	if found == "" {
		return "", errdefs.ErrNotFound
	}
	return found, nil
}
