package storage

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/containerd/errdefs"
	"github.com/containerd/log"

	"github.com/caisson-containers/caisson/guest/agent/uevent"
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
	// Poll is how often to look again for a device that is not there yet, or (with
	// Uevents) that is there but not live yet.
	Poll time.Duration
	// Uevents makes Find wait for the kernel's block device events between looks instead
	// of polling: a hot-plugged disk is found as soon as the kernel announces it, and the
	// guest's vCPU is not spent walking sysfs while it probes the disk. Find still looks
	// every UeventFallback (default 1 s) without an event, in case one was missed.
	Uevents        bool
	UeventFallback time.Duration
}

// DefaultFinder looks in /sys and /dev, waking on the kernel's events.
var DefaultFinder = Finder{Sys: "/sys", Dev: "/dev", Poll: 20 * time.Millisecond, Uevents: true}

// defaultUeventFallback is how often a Finder with Uevents looks without an event.
const defaultUeventFallback = time.Second

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
	var events *uevent.Listener
	if f.Uevents {
		// Listening before the first look: a disk added in between is not missed.
		var err error
		if events, err = uevent.Listen(); err != nil {
			log.G(ctx).WithError(err).Warn("waiting for disks by polling sysfs")
		}
		defer func() {
			if events != nil {
				events.Close()
			}
		}()
	}
	for {
		name, err := f.lookup(d)
		found := err == nil
		if found {
			node := filepath.Join(f.Dev, name)
			if f.ready(name, node) {
				return node, nil
			}
		} else if !errors.Is(err, errdefs.ErrNotFound) {
			return "", err
		}
		if events != nil && !found {
			err = f.waitBlockEvent(ctx, events)
			if err != nil && ctx.Err() == nil {
				log.G(ctx).WithError(err).Warn("waiting for disks by polling sysfs")
				events.Close()
				events = nil
				err = f.wait(ctx)
			}
		} else {
			err = f.wait(ctx)
		}
		if err != nil {
			return "", fmt.Errorf("device %s did not appear: %w", d, errdefs.ErrNotFound)
		}
	}
}

// wait waits for Poll; it fails when ctx is done.
func (f Finder) wait(ctx context.Context) error {
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-time.After(f.Poll):
		return nil
	}
}

// waitBlockEvent waits for the kernel to add or change a block device, or for
// UeventFallback; it fails when ctx is done. Events that were lost count as one.
func (f Finder) waitBlockEvent(ctx context.Context, events *uevent.Listener) error {
	fallback := f.UeventFallback
	if fallback <= 0 {
		fallback = defaultUeventFallback
	}
	wctx, cancel := context.WithTimeout(ctx, fallback)
	defer cancel()
	for {
		ev, err := events.Next(wctx)
		switch {
		case err == nil:
			if ev.Subsystem == "block" && (ev.Action == "add" || ev.Action == "change") {
				return nil
			}
		case errors.Is(err, uevent.ErrLost):
			return nil
		case ctx.Err() != nil:
			return ctx.Err()
		case errors.Is(err, context.DeadlineExceeded):
			return nil // UeventFallback: look anyway
		default:
			return err
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
		entries, err := readDirUnsorted(dir)
		if err != nil {
			return "", errdefs.ErrNotFound
		}
		next := ""
		for _, e := range entries {
			if e.IsDir() && isPCIAddr(e.Name()) && strings.HasSuffix(e.Name(), ":"+slot) {
				next = dir + "/" + e.Name()
				break
			}
		}
		if next == "" {
			return "", errdefs.ErrNotFound
		}
		dir = next
	}
	if found := blockUnder(dir, 0); found != "" {
		return found, nil
	}
	return "", errdefs.ErrNotFound
}

// blockUnder returns the first block device below a PCI device's sysfs directory: vdX
// for virtio-blk (virtioN/block/vdX), pmemN for virtio-pmem, a few buses deeper
// (virtioN/ndbusN/regionN/namespaceN.0/block/pmemN). It reads only subdirectories
// (symlinks such as driver and subsystem are not followed), none of the attribute
// directories every device has, and stops at the depth of the deepest of those paths.
func blockUnder(dir string, depth int) string {
	entries, err := readDirUnsorted(dir)
	if err != nil {
		return ""
	}
	for _, e := range entries {
		if !e.IsDir() || notDeviceDir[e.Name()] {
			continue
		}
		sub := dir + "/" + e.Name()
		if e.Name() == "block" {
			if names, err := readDirUnsorted(sub); err == nil && len(names) > 0 {
				return names[0].Name()
			}
			continue
		}
		if depth < maxDeviceDepth {
			if found := blockUnder(sub, depth+1); found != "" {
				return found
			}
		}
	}
	return ""
}

// maxDeviceDepth is how many directories blockUnder goes down before a block directory:
// four for virtio-pmem's virtioN/ndbusN/regionN/namespaceN.N.
const maxDeviceDepth = 4

// notDeviceDir are a device's attribute directories, which hold no devices.
var notDeviceDir = map[string]bool{"power": true, "msi_irqs": true, "firmware_node": true, "wakeup": true, "dax": true}

// readDirUnsorted is os.ReadDir without its sort: a sysfs directory's order is stable,
// and which of a device's block devices comes first does not matter (it has one).
func readDirUnsorted(dir string) ([]os.DirEntry, error) {
	f, err := os.Open(dir)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	return f.ReadDir(-1)
}
