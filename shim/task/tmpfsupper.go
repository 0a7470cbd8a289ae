package task

import (
	"slices"

	"github.com/opencontainers/runtime-spec/specs-go"

	"github.com/caisson-containers/caisson/internal/rootfs"
)

// writesUnread reports whether no one can read what the container writes to its rootfs,
// so that its writable layer can be a tmpfs in the guest (rootfs.Plan.WithTmpfsUpper)
// and its snapshot's writable image is neither formatted nor attached: one disk, one
// mkfs on the host and one ext4 mount in the guest less.
//
//   - A CRI pod's pause container: its sandbox snapshot is never committed or diffed, and
//     goes with the pod.
//   - A container whose rootfs is read-only (CRI's readOnlyRootFilesystem, ctr and
//     nerdctl's --read-only) and stays so, on a writable image no one has created yet.
//     runc makes the rootfs read-only once it has created the spec's mount points in it,
//     and without CAP_SYS_ADMIN in its bounding set no process of the container can
//     make it writable again: those mount points are all its writable layer would ever
//     hold. An image that exists already (a snapshot activated before, by the mount
//     manager or a task of the container before this one) may hold content, which
//     stays where the container sees it.
func writesUnread(spec *specs.Spec, plan *rootfs.Plan) bool {
	if spec.Annotations[annotationContainerType] == containerTypeSandbox {
		return true
	}
	return spec.Root != nil && spec.Root.Readonly && !mayRemountRoot(spec) && writableImageUnmade(plan)
}

// mayRemountRoot reports whether a process of the container may hold CAP_SYS_ADMIN, and
// so remount its read-only rootfs read-write. A spec without capabilities is taken as
// one that may: what a runtime grants then is its own default, not the spec's.
func mayRemountRoot(spec *specs.Spec) bool {
	if spec.Process == nil || spec.Process.Capabilities == nil {
		return true
	}
	return slices.Contains(spec.Process.Capabilities.Bounding, "CAP_SYS_ADMIN")
}

// writableImageUnmade reports whether plan's writable layer is an image still to be
// formatted (rootfs.Unformatted); one it cannot tell about keeps its disk.
func writableImageUnmade(plan *rootfs.Plan) bool {
	if plan == nil || plan.Upper == nil {
		return false
	}
	unmade, err := rootfs.Unformatted(plan.Devices[plan.Upper.Device])
	return err == nil && unmade
}
