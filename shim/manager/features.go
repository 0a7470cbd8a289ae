package manager

import (
	"fmt"
	"slices"

	"github.com/containerd/typeurl/v2"
	"github.com/opencontainers/runc/libcontainer/configs"
	"github.com/opencontainers/runc/libcontainer/specconv"
	"github.com/opencontainers/runtime-spec/specs-go"
	"github.com/opencontainers/runtime-spec/specs-go/features"
	"google.golang.org/protobuf/types/known/anypb"
)

// features is what `runc features` would say of the guest's runtime: the agent runs
// containers with runc's libcontainer, so its mount options, namespaces and hooks are
// libcontainer's. containerd's CRI reads MountOptions to allow recursive read-only
// mounts ("rro"), which the shim also enforces on the host side of a shared volume
// (shim/virtiofs). Not offered: user namespaces (the CRI needs idmapped mounts with
// them, and a volume reaches the guest through virtio-fs, which has none), and
// AppArmor, SELinux and Intel RDT (the guest kernel has none of them).
func runtimeFeatures() *features.Features {
	return &features.Features{
		OCIVersionMin: "1.0.0",
		OCIVersionMax: specs.Version,
		Hooks:         configs.KnownHookNames(),
		MountOptions:  specconv.KnownMountOptions(),
		Linux: &features.Linux{
			Namespaces: slices.DeleteFunc(specconv.KnownNamespaces(), func(ns string) bool { return ns == "user" }),
		},
	}
}

// marshalFeatures wraps runtimeFeatures for RuntimeInfo.Features, under the type URL
// containerd registers for it (core/runtime/typeurl.go).
func marshalFeatures() (*anypb.Any, error) {
	a, err := typeurl.MarshalAnyToProto(runtimeFeatures())
	if err != nil {
		return nil, fmt.Errorf("marshal runtime features: %w", err)
	}
	return a, nil
}
