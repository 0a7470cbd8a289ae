package container

import (
	"fmt"
	"path"
	"strconv"

	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"github.com/opencontainers/runc/libcontainer"
	"github.com/opencontainers/runc/libcontainer/capabilities"
	"github.com/opencontainers/runc/libcontainer/configs"
	"github.com/opencontainers/runc/libcontainer/specconv"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"
)

// libcontainerConfig turns the OCI spec of a container into libcontainer's configuration.
// rootfs replaces spec.Root.Path (the shim's bundle path means nothing in the guest);
// cgroupsPath replaces the spec's, which names the host's cgroups.
func libcontainerConfig(id string, spec *specs.Spec, rootfs, cgroupsPath string) (*configs.Config, error) {
	if spec.Process == nil {
		return nil, fmt.Errorf("spec has no process: %w", errdefs.ErrInvalidArgument)
	}
	if err := checkProcess(spec.Process); err != nil {
		return nil, err
	}
	s := *spec
	root := specs.Root{Path: rootfs}
	if spec.Root != nil {
		root.Readonly = spec.Root.Readonly
	}
	s.Root = &root
	if spec.Linux != nil {
		l := *spec.Linux
		l.CgroupsPath = cgroupsPath
		s.Linux = &l
	}
	cfg, err := specconv.CreateLibcontainerConfig(&specconv.CreateOpts{
		CgroupName: id,
		// The guest's root is the initramfs, from which pivot_root cannot move away.
		NoPivotRoot: true,
		Spec:        &s,
	})
	if err != nil {
		return nil, fmt.Errorf("container %s: %v: %w", id, err, errdefs.ErrInvalidArgument)
	}
	return cfg, nil
}

// checkProcess rejects what runc would only notice once the process is half started.
func checkProcess(p *specs.Process) error {
	if len(p.Args) == 0 && p.CommandLine == "" {
		return fmt.Errorf("process has no args: %w", errdefs.ErrInvalidArgument)
	}
	if p.Cwd == "" || !path.IsAbs(p.Cwd) {
		return fmt.Errorf("process cwd %q is not an absolute path: %w", p.Cwd, errdefs.ErrInvalidArgument)
	}
	return checkCapabilities(p.Capabilities)
}

// knownCapabilities are the capability names libcontainer knows, whether or not the
// guest kernel has them.
var knownCapabilities = func() map[string]bool {
	m := map[string]bool{}
	for _, c := range capabilities.KnownCapabilities() {
		m[c] = true
	}
	return m
}()

// checkCapabilities rejects a capability name that no kernel has, such as a typo in a
// pod's securityContext.capabilities.add. libcontainer (like runc, which Kubernetes
// nodes run) would only log a warning in the guest, where nobody reads it, and run
// the container without the capability it asked for. A known capability the guest
// kernel lacks is still left to libcontainer to drop: the CRI's "ALL" lists the
// host's capabilities, which may be newer than the guest kernel.
func checkCapabilities(c *specs.LinuxCapabilities) error {
	if c == nil {
		return nil
	}
	for _, set := range [][]string{c.Bounding, c.Effective, c.Inheritable, c.Permitted, c.Ambient} {
		for _, name := range set {
			if !knownCapabilities[name] {
				return fmt.Errorf("unknown capability %q: %w", name, errdefs.ErrInvalidArgument)
			}
		}
	}
	return nil
}

// libcontainerProcess is libcontainer's process for an OCI process (as runc's own newProcess).
func libcontainerProcess(p *specs.Process, init bool) (*libcontainer.Process, error) {
	if err := checkProcess(p); err != nil {
		return nil, err
	}
	lp := &libcontainer.Process{
		Args:            p.Args,
		Env:             p.Env,
		UID:             int(p.User.UID),
		GID:             int(p.User.GID),
		Cwd:             p.Cwd,
		Label:           p.SelinuxLabel,
		NoNewPrivileges: &p.NoNewPrivileges,
		AppArmorProfile: p.ApparmorProfile,
		Scheduler:       p.Scheduler,
		IOPriority:      p.IOPriority,
		Init:            init,
		// The agent's level, as runc passes its own: without it, runc init's C part
		// (nsexec) writes every debug message to its log pipe, some 30 per container
		// or exec, and the agent parses each as JSON only to drop it. Under TCG that is
		// guest CPU on every create and exec.
		LogLevel: strconv.Itoa(int(log.GetLevel())),
	}
	if p.ConsoleSize != nil {
		lp.ConsoleWidth = uint16(p.ConsoleSize.Width)
		lp.ConsoleHeight = uint16(p.ConsoleSize.Height)
	}
	if c := p.Capabilities; c != nil {
		lp.Capabilities = &configs.Capabilities{
			Bounding: c.Bounding, Effective: c.Effective, Inheritable: c.Inheritable,
			Permitted: c.Permitted, Ambient: c.Ambient,
		}
	}
	for _, g := range p.User.AdditionalGids {
		lp.AdditionalGroups = append(lp.AdditionalGroups, int(g))
	}
	for _, rl := range p.Rlimits {
		t, ok := rlimits[rl.Type]
		if !ok {
			return nil, fmt.Errorf("rlimit %q: %w", rl.Type, errdefs.ErrInvalidArgument)
		}
		lp.Rlimits = append(lp.Rlimits, configs.Rlimit{Type: t, Hard: rl.Hard, Soft: rl.Soft})
	}
	return lp, nil
}

var rlimits = map[string]int{
	"RLIMIT_AS": unix.RLIMIT_AS, "RLIMIT_CORE": unix.RLIMIT_CORE, "RLIMIT_CPU": unix.RLIMIT_CPU,
	"RLIMIT_DATA": unix.RLIMIT_DATA, "RLIMIT_FSIZE": unix.RLIMIT_FSIZE, "RLIMIT_LOCKS": unix.RLIMIT_LOCKS,
	"RLIMIT_MEMLOCK": unix.RLIMIT_MEMLOCK, "RLIMIT_MSGQUEUE": unix.RLIMIT_MSGQUEUE, "RLIMIT_NICE": unix.RLIMIT_NICE,
	"RLIMIT_NOFILE": unix.RLIMIT_NOFILE, "RLIMIT_NPROC": unix.RLIMIT_NPROC, "RLIMIT_RSS": unix.RLIMIT_RSS,
	"RLIMIT_RTPRIO": unix.RLIMIT_RTPRIO, "RLIMIT_RTTIME": unix.RLIMIT_RTTIME, "RLIMIT_SIGPENDING": unix.RLIMIT_SIGPENDING,
	"RLIMIT_STACK": unix.RLIMIT_STACK,
}
