package task

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/containerd/errdefs"
	"github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"

	"github.com/caisson-containers/caisson/shim/pod"
)

// devicePlan is what becomes of a spec's linux.devices in the VM.
type devicePlan struct {
	// blocks are the host block devices to attach to the VM, by their index in the
	// guest spec's linux.devices (the agent gives those entries the guest disks'
	// major:minor).
	blocks []pod.BlockDevice
	// guestDevices: the spec had the host's devices (a privileged container); the
	// agent adds the guest's own instead.
	guestDevices bool
}

// guestChar are the character devices the guest kernel has under the same numbers as
// the host's (Linux's static assignments, Documentation/admin-guide/devices.txt) and
// that are virtual: the guest's own does in the VM what the host's does on the host.
// Any other host character device is hardware or a host service the VM cannot reach.
var guestChar = map[[2]int64]string{
	{1, 3}: "null", {1, 5}: "zero", {1, 7}: "full", {1, 8}: "random", {1, 9}: "urandom", {1, 11}: "kmsg",
	{5, 0}: "tty", {5, 1}: "console", {5, 2}: "ptmx",
	{10, 200}: "net/tun", {10, 229}: "fuse",
}

// deviceHost looks devices up on the host: in sysfs (SysDev is /sys/dev) and by the
// path of their node.
type deviceHost struct {
	SysDev string
}

var hostDevices = deviceHost{SysDev: "/sys/dev"}

// name is the host's name of a device, from /sys/dev/{block,char}/MAJ:MIN/uevent's
// DEVNAME (as Kata finds a container's block device); ErrNotFound if the host has no
// such device.
func (h deviceHost) name(class string, major, minor int64) (string, error) {
	b, err := os.ReadFile(filepath.Join(h.SysDev, class, fmt.Sprintf("%d:%d", major, minor), "uevent"))
	if errors.Is(err, os.ErrNotExist) {
		return "", errdefs.ErrNotFound
	} else if err != nil {
		return "", err
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "DEVNAME="); ok && v != "" {
			return "/dev/" + v, nil
		}
	}
	return "", fmt.Errorf("%s device %d:%d has no DEVNAME in sysfs: %w", class, major, minor, errdefs.ErrNotFound)
}

// isHostNode reports whether d's path is the host's node of d: an entry of the host's
// own devices (containerd's WithHostDevices) rather than a device given a container path.
func isHostNode(d specs.LinuxDevice) bool {
	var st unix.Stat_t
	if err := unix.Lstat(d.Path, &st); err != nil {
		return false
	}
	var typ string
	switch st.Mode & unix.S_IFMT {
	case unix.S_IFBLK:
		typ = "b"
	case unix.S_IFCHR:
		typ = "c"
	default:
		return false
	}
	t := d.Type
	if t == "u" {
		t = "c"
	}
	return t == typ && int64(unix.Major(st.Rdev)) == d.Major && int64(unix.Minor(st.Rdev)) == d.Minor
}

// guestDevices rewrites g's linux.devices, whose numbers are the host's, for the VM:
//   - a block device is attached to the VM (virtio-blk, read-only unless the device
//     cgroup rules let the container write it), and the agent creates its guest disk
//     at the entry's path;
//   - a character device the guest has under the same numbers (guestChar) stays;
//     any other is refused, naming it: the VM cannot reach the host's;
//   - a spec with the host's devices and every device allowed (a privileged
//     container: containerd's WithHostDevices and WithAllDevicesAllowed) loses the
//     host's entries, and the agent gives the container the guest's devices instead.
//     A device the CRI asked for at the same path as its host node comes twice in such
//     a spec (the CRI adds the pod's devices before the host's): its first entry stays.
func (h deviceHost) guestDevices(g *specs.Spec) (devicePlan, error) {
	var plan devicePlan
	if g.Linux == nil || len(g.Linux.Devices) == 0 {
		return plan, nil
	}
	var rules []specs.LinuxDeviceCgroup
	if g.Linux.Resources != nil {
		rules = g.Linux.Resources.Devices
	}
	type key struct {
		path, typ    string
		major, minor int64
	}
	keyOf := func(d specs.LinuxDevice) key { return key{d.Path, d.Type, d.Major, d.Minor} }
	host := make([]bool, len(g.Linux.Devices))
	count := map[key]int{}
	for i, d := range g.Linux.Devices {
		host[i] = isHostNode(d)
		plan.guestDevices = plan.guestDevices || host[i]
		count[keyOf(d)]++
	}
	plan.guestDevices = plan.guestDevices && allowsAll(rules)

	var devs []specs.LinuxDevice
	kept := map[key]bool{}
	for i, d := range g.Linux.Devices {
		k := keyOf(d)
		if plan.guestDevices && host[i] && (count[k] < 2 || kept[k]) {
			continue
		}
		kept[k] = true
		switch d.Type {
		case "b":
			node, err := h.name("block", d.Major, d.Minor)
			if errors.Is(err, errdefs.ErrNotFound) {
				return plan, fmt.Errorf("device %s (block %d:%d): the host has no such block device: %w", d.Path, d.Major, d.Minor, errdefs.ErrNotFound)
			} else if err != nil {
				return plan, fmt.Errorf("device %s (block %d:%d): %w", d.Path, d.Major, d.Minor, err)
			}
			// A disk without media (a loop device with no file) would never appear in the
			// guest, whose agent waits for a disk with a size.
			if size, err := os.ReadFile(filepath.Join(h.SysDev, "block", fmt.Sprintf("%d:%d", d.Major, d.Minor), "size")); err == nil && strings.TrimSpace(string(size)) == "0" {
				return plan, fmt.Errorf("device %s (block %d:%d, the host's %s) has no media (0 bytes): %w", d.Path, d.Major, d.Minor, node, errdefs.ErrFailedPrecondition)
			}
			plan.blocks = append(plan.blocks, pod.BlockDevice{Index: len(devs), Path: node, ReadOnly: !allows(rules, d, 'w')})
		case "c", "u":
			if _, ok := guestChar[[2]int64{d.Major, d.Minor}]; !ok {
				what := fmt.Sprintf("%s (char %d:%d", d.Path, d.Major, d.Minor)
				if node, err := h.name("char", d.Major, d.Minor); err == nil && node != d.Path {
					what += ", the host's " + node
				}
				return plan, fmt.Errorf("device %s) cannot be passed into a VM: only block devices and the virtual character devices the guest kernel has too (null, zero, full, random, urandom, kmsg, tty, console, ptmx, net/tun, fuse) can: %w",
					what, errdefs.ErrInvalidArgument)
			}
		case "p":
			// A FIFO is made anew in the container, with runc as in the VM.
		default:
			return plan, fmt.Errorf("device %s: unknown type %q: %w", d.Path, d.Type, errdefs.ErrInvalidArgument)
		}
		devs = append(devs, d)
	}
	g.Linux.Devices = devs
	return plan, nil
}

// allowsAll reports whether the device cgroup rules end with every device allowed
// (containerd's WithAllDevicesAllowed, for privileged containers).
func allowsAll(rules []specs.LinuxDeviceCgroup) bool {
	all := false
	for _, r := range rules {
		if (r.Type == "" || r.Type == "a") && r.Major == nil && r.Minor == nil {
			all = r.Allow && hasAccess(r.Access, 'r') && hasAccess(r.Access, 'w') && hasAccess(r.Access, 'm')
		}
	}
	return all
}

// allows reports whether the rules give access a (r, w or m) to device d: the last
// rule that matches d and names a decides, as in runc's device cgroup emulation. Without
// rules every device is allowed.
func allows(rules []specs.LinuxDeviceCgroup, d specs.LinuxDevice, a byte) bool {
	ok := len(rules) == 0
	for _, r := range rules {
		if r.Type != "" && r.Type != "a" && r.Type != d.Type {
			continue
		}
		if (r.Major != nil && *r.Major != -1 && *r.Major != d.Major) || (r.Minor != nil && *r.Minor != -1 && *r.Minor != d.Minor) {
			continue
		}
		if hasAccess(r.Access, a) {
			ok = r.Allow
		}
	}
	return ok
}

// hasAccess: an empty access string means all of r, w and m.
func hasAccess(access string, a byte) bool {
	return access == "" || strings.IndexByte(access, a) >= 0
}
