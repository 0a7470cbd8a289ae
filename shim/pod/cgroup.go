package pod

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
	"github.com/opencontainers/cgroups"
	"github.com/opencontainers/cgroups/manager"
	"github.com/opencontainers/cgroups/systemd"

	"github.com/caisson-containers/caisson/shim/config"
)

// A pod's host processes, its QEMU and its virtiofsd, run in one cgroup with memory and
// CPU limits, so that the kernel bounds what a runaway VM (a guest driving QEMU's heap,
// TCG's translation cache, virtiofsd's buffers) takes from the host:
//
//   - a CRI pod's: the cgroup the CRI gave its sandbox container, below the pod's cgroup
//     parent, where the kubelet accounts for the pod (and its own pod-level limit, the
//     pod's limits plus the RuntimeClass overhead, applies above ours);
//   - a lone container's (ctr, nerdctl): the cgroupsPath its client gave it (ctr's
//     /NAMESPACE/ID, nerdctl's), or, with none, one of Caisson's own, DefaultCgroupParent
//     (or caisson.slice on a host run by systemd) and the pod's state directory's name.
//
// A path is a cgroupfs path ("/kubepods/burstable/pod.../ID") or a systemd one
// ("kubepods-burstable-pod....slice:cri-containerd:ID"), converted and applied as runc
// applies a container's (github.com/opencontainers/cgroups, runc's own cgroup code): on
// cgroup v1 and v2, the systemd ones through a transient scope. containerd's runc shim
// leaves the container's cgroup to runc; this shim is its own runc.
//
// The path is recorded in the pod's state directory (cgroupRecord) before the cgroup is
// made, so that the cleanup of a dead shim (`shim delete`, RemoveCgroup) finds it.

// DefaultCgroupParent is the cgroupfs parent of the cgroups the shim makes for pods
// whose task names none. It is left in place, as containerd's /NAMESPACE parents are.
const DefaultCgroupParent = "/caisson"

// defaultSlice is the same on a host run by systemd: caisson.slice:caisson:NAME makes
// the scope caisson-NAME.scope in caisson.slice.
const defaultSlice = "caisson.slice"

// VMOverheadMiB is what a pod's processes may take on the host besides the guest's RAM
// and TCG's translation cache: QEMU's own heap, device state and I/O buffers, the page
// cache of the disks it reads (reclaimable: the limit makes the kernel reclaim it, not
// kill), and the pod's virtiofsd. An idle pod's QEMU takes about 285 MiB PSS with 512 MiB
// of guest RAM, most of it the guest's pages and TCG's cache (contrib/kubernetes).
const VMOverheadMiB = 256

// defaultTCGCacheMiB is QEMU's own translation cache size, when tb-size is not given.
const defaultTCGCacheMiB = 1024

// cpuPeriod is the CFS period of the CPU limit (the kernel's default), in µs.
const cpuPeriod = 100000

// cgroupRecord is the file in the pod's state directory holding its cgroup's path.
const cgroupRecord = "cgroup"

// cgroupLimits are the limits of a pod's cgroup, from the VM's size in cfg (after the
// pod's annotations, and grown by the CRI's sandbox resources: shim/task's podConfig):
//
//   - memory: the guest's RAM (hypervisor.memory_mib), plus TCG's translation cache
//     (tcg_translation_cache_mib, QEMU's 1 GiB if 0; unless accelerator = kvm), plus
//     VMOverheadMiB. Swap is not limited (the hosts Caisson runs on have none, as the
//     kubelet wants);
//   - CPU: a CFS quota of vcpus + 1 CPUs: one thread per vCPU, and one for QEMU's main
//     loop, its I/O and virtiofsd.
func cgroupLimits(cfg config.Config) *cgroups.Resources {
	mib := int64(cfg.Hypervisor.MemoryMiB) + VMOverheadMiB
	if cfg.Hypervisor.Accelerator != "kvm" {
		tb := cfg.Hypervisor.TCGTranslationCacheMiB
		if tb <= 0 {
			tb = defaultTCGCacheMiB
		}
		mib += int64(tb)
	}
	vcpus := max(cfg.Hypervisor.VCPUs, 1)
	return &cgroups.Resources{
		Memory:    mib << 20,
		CpuQuota:  int64(vcpus+1) * cpuPeriod,
		CpuPeriod: cpuPeriod,
		// QEMU needs /dev/kvm, /dev/net/tun and the vhost devices: device rules are the
		// host's, not a container's.
		SkipDevices: true,
	}
}

// defaultCgroupPath is the cgroup of a pod whose task names none: one of Caisson's own,
// named for the pod's state directory (unique per namespace and pod).
func defaultCgroupPath(stateDir string) string {
	return ownCgroupPath(filepath.Base(stateDir))
}

// warmCgroupPath is the cgroup of the warm VM whose state directory is the pool slot
// dir: one of Caisson's own, named warm-SLOT (slots have random names, unique per host).
func warmCgroupPath(dir string) string {
	return ownCgroupPath("warm-" + filepath.Base(dir))
}

// ownCgroupPath is the cgroup called name below Caisson's parent.
func ownCgroupPath(name string) string {
	if systemd.IsRunningSystemd() {
		return defaultSlice + ":caisson:" + name
	}
	return DefaultCgroupParent + "/" + name
}

// cgroupConfig is path as runc's cgroup code takes it (runc's specconv does the same):
// "slice:prefix:name" for the systemd driver, a cgroupfs path otherwise.
func cgroupConfig(path string, res *cgroups.Resources) (*cgroups.Cgroup, error) {
	if res == nil {
		res = &cgroups.Resources{SkipDevices: true}
	}
	if !strings.Contains(path, ":") {
		if path == "" {
			return nil, fmt.Errorf("empty cgroup path: %w", errdefs.ErrInvalidArgument)
		}
		return &cgroups.Cgroup{Path: path, Resources: res}, nil
	}
	parts := strings.Split(path, ":")
	if len(parts) != 3 || parts[2] == "" {
		return nil, fmt.Errorf("cgroup path %q: a systemd cgroup path is slice:prefix:name: %w", path, errdefs.ErrInvalidArgument)
	}
	if parts[0] != "" {
		if _, err := systemd.ExpandSlice(parts[0]); err != nil {
			return nil, fmt.Errorf("cgroup path %q: %w: %w", path, errdefs.ErrInvalidArgument, err)
		}
	}
	return &cgroups.Cgroup{Parent: parts[0], ScopePrefix: parts[1], Name: parts[2], Systemd: true, Resources: res}, nil
}

// newCgroupManager is runc's cgroup manager for path: cgroupfs or systemd, v1 or v2.
func newCgroupManager(path string, res *cgroups.Resources) (cgroups.Manager, error) {
	c, err := cgroupConfig(path, res)
	if err != nil {
		return nil, err
	}
	m, err := manager.New(c)
	if err != nil {
		if c.Systemd && !systemd.IsRunningSystemd() {
			return nil, fmt.Errorf("cgroup path %q is a systemd one, and systemd does not run on this host: %w", path, errdefs.ErrFailedPrecondition)
		}
		return nil, fmt.Errorf("cgroup %q: %w", path, err)
	}
	return m, nil
}

// cgroupDir is the directory of m's cgroup that tells which processes it holds: the
// memory controller's on v1 (the library's Exists and GetAllPids look at the devices
// controller's, which SkipDevices leaves alone).
func cgroupDir(m cgroups.Manager) string {
	if cgroups.IsCgroup2UnifiedMode() {
		return m.Path("")
	}
	return m.Path("memory")
}

// Cgroup is the cgroup a pod's host processes (the VMM, virtiofsd) run in.
type Cgroup interface {
	// Add moves pid, with all its threads, into the cgroup; processes it forks later
	// are born there.
	Add(pid int) error
	// Remove removes the cgroup once the pod's processes, ended by the caller, have
	// left it.
	Remove(ctx context.Context) error
}

// CgroupFunc makes the cgroup of a pod that Start starts with cfg and o (o.Cgroup is its
// path, if the task named one), before any of its processes runs.
type CgroupFunc func(cfg config.Config, o Options) (Cgroup, error)

// HostCgroup is the cgroup a pod's processes run in on a host: o.Cgroup or one of the
// shim's own, with the VM's limits (cgroupLimits), recorded in the pod's state
// directory for RemoveCgroup. Making it needs root (or a delegated cgroup tree).
func HostCgroup(cfg config.Config, o Options) (Cgroup, error) {
	c, err := newCgroup(cfg, o)
	if err != nil {
		return nil, err // not a typed nil in the interface
	}
	return c, nil
}

// NoCgroup leaves a pod's processes in the shim's own cgroup, without the VM's limits:
// for a pod on a VMM with no process of its own to bound (a test's fake), started by a
// user who may not make cgroups.
func NoCgroup(config.Config, Options) (Cgroup, error) { return noCgroup{}, nil }

type noCgroup struct{}

func (noCgroup) Add(int) error                { return nil }
func (noCgroup) Remove(context.Context) error { return nil }

// vmCgroup is the cgroup of a pod's processes on the host.
type vmCgroup struct {
	path    string
	limits  *cgroups.Resources
	m       cgroups.Manager
	applied bool // made, limited and holding a process
}

// newCgroup prepares the pod's cgroup (o.Cgroup, or the shim's own) and records its
// path in the pod's state directory. The cgroup itself is made by the first add: a
// systemd scope cannot be made empty. One that exists already must hold no process:
// limits meant for a VM must not land on whatever runs there (runc refuses a busy
// cgroup the same way).
func newCgroup(cfg config.Config, o Options) (*vmCgroup, error) {
	path := o.Cgroup
	if path == "" {
		path = defaultCgroupPath(o.StateDir)
	}
	limits := cgroupLimits(cfg)
	m, err := newCgroupManager(path, limits)
	if err != nil {
		return nil, err
	}
	if dir := cgroupDir(m); cgroups.PathExists(dir) {
		if pids, err := cgroups.GetAllPids(dir); err == nil && len(pids) > 0 {
			return nil, fmt.Errorf("cgroup %q for the pod's VM already holds processes %v: %w", path, pids, errdefs.ErrFailedPrecondition)
		}
	}
	if err := os.WriteFile(filepath.Join(o.StateDir, cgroupRecord), []byte(path), 0o600); err != nil {
		return nil, fmt.Errorf("record the pod's cgroup: %w", err)
	}
	return &vmCgroup{path: path, limits: limits, m: m}, nil
}

// Add moves pid (with all its threads) into the cgroup, making it and setting its
// limits first if need be. Processes pid forks later are born there.
func (c *vmCgroup) Add(pid int) error {
	if c.applied {
		// Not the manager's AddPid: it writes to the devices controller's cgroup too,
		// which SkipDevices did not make.
		for _, dir := range c.m.GetPaths() {
			if !cgroups.PathExists(dir) {
				continue
			}
			if err := cgroups.WriteCgroupProc(dir, pid); err != nil {
				return fmt.Errorf("move process %d into cgroup %q: %w", pid, c.path, err)
			}
		}
		return nil
	}
	if err := c.m.Apply(pid); err != nil {
		return fmt.Errorf("create cgroup %q with process %d: %w", c.path, pid, err)
	}
	c.applied = true
	if err := c.m.Set(c.limits); err != nil {
		return fmt.Errorf("limit cgroup %q: %w", c.path, err)
	}
	return nil
}

// Remove removes the cgroup once the pod's processes, ended by the caller, have left it.
func (c *vmCgroup) Remove(ctx context.Context) error {
	if err := removeCgroup(c.m, c.path, cgroupDrainTimeout); err != nil {
		return err
	}
	log.G(ctx).WithField("cgroup", c.path).Debug("pod cgroup removed")
	return nil
}

// cgroupDrainTimeout bounds the wait for the pod's ended processes to leave its cgroup.
const cgroupDrainTimeout = 10 * time.Second

// removeCgroup removes m's cgroup once no process is in it, waiting at most wait for
// the ones in it to leave.
func removeCgroup(m cgroups.Manager, path string, wait time.Duration) error {
	// The processes were killed and reaped (QEMU) or are exiting (virtiofsd's
	// sandboxed child, which dies with its parent): the kernel removes them
	// from the cgroup a moment later.
	deadline := time.Now().Add(wait)
	for dir := cgroupDir(m); cgroups.PathExists(dir); {
		pids, err := cgroups.GetAllPids(dir)
		if err != nil || len(pids) == 0 {
			break
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("cgroup %q left in place: processes %v still in it: %w", path, pids, errdefs.ErrFailedPrecondition)
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err := m.Destroy(); err != nil {
		return fmt.Errorf("remove cgroup %q: %w", path, err)
	}
	return nil
}

// RemoveCgroup removes the cgroup of the pod whose state directory is stateDir, left
// by a VM whose shim died (`shim delete`), once the VM's processes are gone. Nothing
// recorded: the pod made none.
func RemoveCgroup(ctx context.Context, stateDir string) error {
	path, err := removeRecordedCgroup(stateDir, cgroupDrainTimeout)
	if err == nil && path != "" {
		log.G(ctx).WithField("cgroup", path).Debug("pod cgroup removed")
	}
	return err
}

// ReleaseWarmSlot removes the cgroup of the warm VM whose pool slot is dir, left by a
// warm shim that died, if no process is in it; it does not wait (the pool's sweep runs
// in a container's start, where the dead shim's QEMU has long gone): an error leaves
// the slot, and its cgroup's record, for the next sweep (warm.Release).
func ReleaseWarmSlot(dir string) error {
	_, err := removeRecordedCgroup(dir, 0)
	return err
}

// removeRecordedCgroup removes the cgroup recorded in stateDir ("" if none), waiting at
// most wait for its processes to leave.
func removeRecordedCgroup(stateDir string, wait time.Duration) (string, error) {
	b, err := os.ReadFile(filepath.Join(stateDir, cgroupRecord))
	if errors.Is(err, os.ErrNotExist) {
		return "", nil
	}
	if err != nil {
		return "", err
	}
	path := string(b)
	m, err := newCgroupManager(path, nil)
	if err != nil {
		return path, err
	}
	return path, removeCgroup(m, path, wait)
}
