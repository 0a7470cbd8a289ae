package pod

import (
	"context"
	"fmt"
	"strings"

	"github.com/containerd/cgroups/v3"
	"github.com/containerd/cgroups/v3/cgroup1"
	"github.com/containerd/cgroups/v3/cgroup2"
	"github.com/containerd/log"
	"github.com/opencontainers/runtime-spec/specs-go"
)

// joinCgroup puts the VM's QEMU into path, the cgroup the CRI gave the pod's
// sandbox container (below the pod's cgroup parent): the VM is what runs the
// pod, so the kubelet's pod accounting and PodSandboxStats must see it. It
// returns how to remove the cgroup once QEMU has exited.
//
// Only the cgroupfs layout is placed; a systemd driver path ("slice:prefix:name")
// is left alone, with a warning.
func joinCgroup(ctx context.Context, path string, pid int) (func() error, error) {
	if strings.Contains(path, ":") {
		log.G(ctx).WithField("cgroup", path).Warn("systemd cgroup paths are not supported yet: the VM stays in the shim's cgroup")
		return func() error { return nil }, nil
	}
	if cgroups.Mode() == cgroups.Unified {
		m, err := cgroup2.NewManager("/sys/fs/cgroup", path, &cgroup2.Resources{})
		if err != nil {
			return nil, fmt.Errorf("create pod cgroup %s: %w", path, err)
		}
		if err := m.AddProc(uint64(pid)); err != nil {
			m.Delete()
			return nil, fmt.Errorf("move the VM into pod cgroup %s: %w", path, err)
		}
		return m.Delete, nil
	}
	cg, err := cgroup1.New(cgroup1.StaticPath(path), &specs.LinuxResources{})
	if err != nil {
		return nil, fmt.Errorf("create pod cgroup %s: %w", path, err)
	}
	if err := cg.Add(cgroup1.Process{Pid: pid}); err != nil {
		cg.Delete()
		return nil, fmt.Errorf("move the VM into pod cgroup %s: %w", path, err)
	}
	return cg.Delete, nil
}

// RemoveCgroup removes a pod cgroup left by a VM whose shim died (shim delete).
func RemoveCgroup(path string) error {
	if path == "" || strings.Contains(path, ":") {
		return nil
	}
	if cgroups.Mode() == cgroups.Unified {
		m, err := cgroup2.Load(path)
		if err != nil {
			return nil
		}
		return m.Delete()
	}
	cg, err := cgroup1.Load(cgroup1.StaticPath(path))
	if err != nil {
		return nil // not there
	}
	return cg.Delete()
}
