package container

import (
	"fmt"

	"github.com/containerd/errdefs"
	"github.com/moby/sys/devices"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"
)

// BlockDevice is a disk the shim attached to the VM for entry Index of a spec's
// linux.devices (a host block device), found in the guest at Node.
type BlockDevice struct {
	Index int
	Node  string
}

// UseBlockDevices gives each device's spec entry, whose numbers are the host's, the
// numbers of its guest disk, and so every device cgroup rule that names the entry's
// host numbers exactly. The entry keeps its path, file mode, uid and gid, which
// libcontainer gives the node it creates in the container.
func UseBlockDevices(spec *specs.Spec, devs []BlockDevice) error {
	if len(devs) == 0 {
		return nil
	}
	if spec.Linux == nil {
		return fmt.Errorf("block devices for a spec without linux.devices: %w", errdefs.ErrInvalidArgument)
	}
	type num struct{ major, minor int64 }
	guest := map[num][]num{} // host numbers → guest disks'
	for _, d := range devs {
		if d.Index < 0 || d.Index >= len(spec.Linux.Devices) {
			return fmt.Errorf("block device %d: the spec has %d devices: %w", d.Index, len(spec.Linux.Devices), errdefs.ErrInvalidArgument)
		}
		e := &spec.Linux.Devices[d.Index]
		if e.Type != "b" {
			return fmt.Errorf("device %s is of type %q, not a block device: %w", e.Path, e.Type, errdefs.ErrInvalidArgument)
		}
		var st unix.Stat_t
		if err := unix.Stat(d.Node, &st); err != nil {
			return fmt.Errorf("device %s: guest disk %s: %w", e.Path, d.Node, err)
		}
		if st.Mode&unix.S_IFMT != unix.S_IFBLK {
			return fmt.Errorf("device %s: guest disk %s is not a block device: %w", e.Path, d.Node, errdefs.ErrInvalidArgument)
		}
		n := num{int64(unix.Major(st.Rdev)), int64(unix.Minor(st.Rdev))}
		h := num{e.Major, e.Minor}
		guest[h] = append(guest[h], n)
		e.Major, e.Minor = n.major, n.minor
	}
	if spec.Linux.Resources == nil {
		return nil
	}
	// One pass over the original rules: a guest disk's numbers may be another host
	// device's, which must not be rewritten twice.
	var rules []specs.LinuxDeviceCgroup
	for _, r := range spec.Linux.Resources.Devices {
		if r.Type != "b" || r.Major == nil || r.Minor == nil || len(guest[num{*r.Major, *r.Minor}]) == 0 {
			rules = append(rules, r)
			continue
		}
		for _, n := range guest[num{*r.Major, *r.Minor}] {
			r.Major, r.Minor = &n.major, &n.minor
			rules = append(rules, r)
		}
	}
	spec.Linux.Resources.Devices = rules
	return nil
}

// AddGuestDevices adds the device nodes of the guest's /dev to the spec, as
// containerd's WithHostDevices adds the host's for a privileged container, except
// at paths the spec already has an entry for.
func AddGuestDevices(spec *specs.Spec) error {
	devs, err := devices.HostDevices()
	if err != nil {
		return fmt.Errorf("list the guest's devices: %w", err)
	}
	if spec.Linux == nil {
		spec.Linux = &specs.Linux{}
	}
	have := map[string]bool{}
	for _, d := range spec.Linux.Devices {
		have[d.Path] = true
	}
	for _, d := range devs {
		if have[d.Path] {
			continue
		}
		fm, uid, gid := d.FileMode, d.Uid, d.Gid
		spec.Linux.Devices = append(spec.Linux.Devices, specs.LinuxDevice{
			Path: d.Path, Type: string(d.Type), Major: d.Major, Minor: d.Minor, FileMode: &fm, UID: &uid, GID: &gid,
		})
	}
	return nil
}
