// Package sandbox makes the VM a pod: the network, IPC and UTS namespaces all its
// containers share (created and pinned by the agent, so they outlive any container), its
// interfaces and routes (netlink), hostname, /etc/hosts and resolv.conf, pod sysctls, a
// shared /dev/shm, the PID namespace when the pod shares one, and the guest clock.
package sandbox

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"
)

// Config is the pod.
type Config struct {
	ID       string
	Hostname string
	DNS      DNS
	Hosts    []HostEntry
	Ifaces   []Interface
	Routes   []Route
	SharePID bool
	Sysctls  map[string]string
}

// DNS is the pod's resolv.conf.
type DNS struct {
	Servers, Searches, Options []string
}

// HostEntry is a line of /etc/hosts.
type HostEntry struct {
	IP    string
	Names []string
}

// Sandbox is the pod. The zero value is unusable; use New.
type Sandbox struct {
	dir string

	mu      sync.Mutex
	created bool
	// prepared: the pod's namespaces are pinned already (Prepare), without a hostname.
	prepared bool
	cfg      Config
	// pidHolder is the init pid of the pod's first container, whose PID namespace the
	// others join when the pod shares one.
	pidHolder int
}

// New returns a sandbox that keeps its files under dir.
func New(dir string) *Sandbox {
	return &Sandbox{dir: dir}
}

// Created reports whether Create has set the pod up.
func (s *Sandbox) Created() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.created
}

func (s *Sandbox) nsPath(name string) string   { return filepath.Join(s.dir, "ns", name) }
func (s *Sandbox) filePath(name string) string { return filepath.Join(s.dir, name) }

// Create sets the pod up. A second call is AlreadyExists.
func (s *Sandbox) Create(ctx context.Context, cfg Config) (retErr error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.created {
		return fmt.Errorf("sandbox %s: %w", s.cfg.ID, errdefs.ErrAlreadyExists)
	}
	if s.prepared {
		if err := setHostname(s.nsPath("uts"), cfg.Hostname); err != nil {
			s.teardown(ctx)
			return err
		}
	} else {
		if err := os.MkdirAll(s.dir, 0o755); err != nil {
			return err
		}
		if err := pinNamespaces(filepath.Join(s.dir, "ns"), cfg.Hostname); err != nil {
			return err
		}
	}
	defer func() {
		if retErr != nil {
			s.teardown(ctx)
		}
	}()
	if err := setNetwork(ctx, s.nsPath("net"), cfg.Ifaces, cfg.Routes); err != nil {
		return err
	}
	if err := setSysctls(s.nsPath("net"), cfg.Sysctls); err != nil {
		return err
	}
	if err := s.writeFiles(cfg); err != nil {
		return err
	}
	shm := s.filePath("shm")
	if err := os.MkdirAll(shm, 0o1777); err != nil {
		return err
	}
	if err := unix.Mount("shm", shm, "tmpfs", unix.MS_NOSUID|unix.MS_NODEV|unix.MS_NOEXEC, "mode=1777,size=65536k"); err != nil {
		return fmt.Errorf("pod /dev/shm: %w", err)
	}
	s.created = true
	s.cfg = cfg
	log.G(ctx).WithFields(log.Fields{"sandbox": cfg.ID, "interfaces": len(cfg.Ifaces), "share_pid": cfg.SharePID}).Info("sandbox created")
	return nil
}

// Prepare creates and pins the pod's network, IPC and UTS namespaces ahead of Create,
// which then only names the UTS one's host. A VM template's agent does, before the
// template is saved: a new network namespace is much of a sandbox's creation (the
// kernel sets up every protocol's per-namespace state, loopback and sysctl tables),
// and every VM made from the template then finds it done. Like the rest of a
// template's memory, the namespace's per-namespace random values (its hash mix) are
// the same in each of those VMs, as the kernel's boot-time secrets already are.
// Prepare does nothing once the sandbox is prepared or created.
func (s *Sandbox) Prepare(ctx context.Context) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.created || s.prepared {
		return nil
	}
	if err := os.MkdirAll(s.dir, 0o755); err != nil {
		return err
	}
	if err := pinNamespaces(filepath.Join(s.dir, "ns"), ""); err != nil {
		return err
	}
	s.prepared = true
	return nil
}

func (s *Sandbox) writeFiles(cfg Config) error {
	var hosts strings.Builder
	hosts.WriteString("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n")
	for _, h := range cfg.Hosts {
		fmt.Fprintf(&hosts, "%s\t%s\n", h.IP, strings.Join(h.Names, " "))
	}
	var resolv strings.Builder
	for _, ns := range cfg.DNS.Servers {
		fmt.Fprintf(&resolv, "nameserver %s\n", ns)
	}
	if len(cfg.DNS.Searches) > 0 {
		fmt.Fprintf(&resolv, "search %s\n", strings.Join(cfg.DNS.Searches, " "))
	}
	if len(cfg.DNS.Options) > 0 {
		fmt.Fprintf(&resolv, "options %s\n", strings.Join(cfg.DNS.Options, " "))
	}
	for name, content := range map[string]string{
		"hosts":       hosts.String(),
		"resolv.conf": resolv.String(),
		"hostname":    cfg.Hostname + "\n",
	} {
		if err := os.WriteFile(s.filePath(name), []byte(content), 0o644); err != nil {
			return err
		}
	}
	return nil
}

// SetNetwork replaces the pod's interface addresses and routes.
func (s *Sandbox) SetNetwork(ctx context.Context, ifaces []Interface, routes []Route) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if !s.created {
		return fmt.Errorf("no sandbox: %w", errdefs.ErrFailedPrecondition)
	}
	return setNetwork(ctx, s.nsPath("net"), ifaces, routes)
}

// SetTime sets the guest's wall clock.
func SetTime(t time.Time) error {
	ts := unix.NsecToTimespec(t.UnixNano())
	if err := unix.ClockSettime(unix.CLOCK_REALTIME, &ts); err != nil {
		return fmt.Errorf("set the clock: %w", err)
	}
	return nil
}

// ContainerCreated tells the sandbox a container's init pid; the first one holds the
// pod's PID namespace when the pod shares one.
func (s *Sandbox) ContainerCreated(pid int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.pidHolder == 0 {
		s.pidHolder = pid
	}
}

// ContainerDeleted tells the sandbox a container's init is gone.
func (s *Sandbox) ContainerDeleted(pid int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.pidHolder == pid {
		s.pidHolder = 0
	}
}

// PodPIDNamespace is the PID namespace path with which the shim asks for the pod's
// PID namespace (the CRI's NamespaceMode_POD, whose host path names the pause
// container's): the one of the pod's first container (api/agent/v1/containers.proto).
const PodPIDNamespace = "pod"

// AdjustSpec rewrites a container's spec from the host's view to the guest's:
//   - a spec that shares the host's PID or IPC namespace (hostPID, hostIPC) is refused:
//     the guest's are not the host's (refuseHostNamespaces);
//   - the network, IPC and UTS namespaces are the pod's (without a sandbox, new ones);
//   - the PID namespace is the pod's first container's when the pod shares one or the
//     spec's PID namespace path is PodPIDNamespace;
//   - other namespace paths (the host's) are dropped: the container gets new ones;
//   - bind mounts of /etc/hosts, /etc/resolv.conf, /etc/hostname and /dev/shm come from
//     the pod's files; any other bind mount whose source is not in the guest is an error
//     (there is no shared filesystem);
//   - the process's AppArmor profile and SELinux labels are dropped (see AdjustProcess).
func (s *Sandbox) AdjustSpec(spec *specs.Spec) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if spec.Process != nil {
		AdjustProcess(spec.Process)
	}
	if spec.Linux != nil {
		spec.Linux.MountLabel = ""
		if s.created {
			if err := refuseHostNamespaces(spec.Linux.Namespaces); err != nil {
				return err
			}
			for _, t := range []specs.LinuxNamespaceType{specs.NetworkNamespace, specs.IPCNamespace, specs.UTSNamespace} {
				if !hasNamespace(spec.Linux.Namespaces, t) {
					spec.Linux.Namespaces = append(spec.Linux.Namespaces, specs.LinuxNamespace{Type: t})
				}
			}
		}
		for i := range spec.Linux.Namespaces {
			ns := &spec.Linux.Namespaces[i]
			joinPod := ns.Type == specs.PIDNamespace && ns.Path == PodPIDNamespace
			ns.Path = ""
			switch ns.Type {
			case specs.NetworkNamespace:
				if s.created {
					ns.Path = s.nsPath("net")
				}
			case specs.IPCNamespace:
				if s.created {
					ns.Path = s.nsPath("ipc")
				}
			case specs.UTSNamespace:
				if s.created {
					ns.Path = s.nsPath("uts")
				}
			case specs.PIDNamespace:
				if !joinPod && !(s.created && s.cfg.SharePID) {
					break // a PID namespace of its own (CRI's NamespaceMode_CONTAINER)
				}
				if s.pidHolder == 0 {
					if joinPod {
						// The CRI's pod PID namespace is the sandbox (pause) container's;
						// without it, a new one would silently isolate this container.
						return fmt.Errorf("the spec joins the pod's PID namespace, but the pod's first container, which holds it, is gone: %w", errdefs.ErrFailedPrecondition)
					}
					break // the first container of a shared-PID pod: it makes the namespace
				}
				ns.Path = fmt.Sprintf("/proc/%d/ns/pid", s.pidHolder)
			}
		}
	}
	podFiles := map[string]string{
		"/etc/hosts":       "hosts",
		"/etc/resolv.conf": "resolv.conf",
		"/etc/hostname":    "hostname",
		"/dev/shm":         "shm",
	}
	for i := range spec.Mounts {
		m := &spec.Mounts[i]
		if !isBind(*m) {
			continue
		}
		if name, ok := podFiles[filepath.Clean(m.Destination)]; ok && s.created {
			m.Source = s.filePath(name)
			continue
		}
		if _, err := os.Stat(m.Source); err != nil {
			return fmt.Errorf("bind mount %s -> %s: the source is not in the VM (no shared filesystem): %w",
				m.Source, m.Destination, errdefs.ErrInvalidArgument)
		}
	}
	return nil
}

// AdjustProcess drops what refers to the host's security modules: the AppArmor profile
// and SELinux label CRI chose name the host's policies, which the guest does not load
// (the VM boundary is the isolation; seccomp, capabilities and namespaces still apply).
func AdjustProcess(p *specs.Process) {
	p.ApparmorProfile = ""
	p.SelinuxLabel = ""
}

// refuseHostNamespaces refuses a spec without a PID or an IPC namespace: it shares the
// host's (a CRI pod with hostPID or hostIPC, `nerdctl run --pid host` or `--ipc host`).
// The VM has its own kernel, so no namespace of the guest is the host's: such a
// container would run, but see the VM's processes or IPC objects where it expects the
// node's (a node agent reading /proc, a process sharing memory with a host daemon).
// The shim refuses the host network namespace the same way (shim/task/spec.go).
func refuseHostNamespaces(nss []specs.LinuxNamespace) error {
	if !hasNamespace(nss, specs.PIDNamespace) {
		return fmt.Errorf("the spec shares the host's PID namespace (hostPID: true, --pid host), but a Caisson container runs in a VM with its own kernel, which cannot see the host's processes; use another runtime class for it: %w",
			errdefs.ErrInvalidArgument)
	}
	if !hasNamespace(nss, specs.IPCNamespace) {
		return fmt.Errorf("the spec shares the host's IPC namespace (hostIPC: true, --ipc host), but a Caisson container runs in a VM with its own kernel, which cannot share the host's IPC objects; use another runtime class for it: %w",
			errdefs.ErrInvalidArgument)
	}
	return nil
}

func hasNamespace(nss []specs.LinuxNamespace, t specs.LinuxNamespaceType) bool {
	for _, ns := range nss {
		if ns.Type == t {
			return true
		}
	}
	return false
}

func isBind(m specs.Mount) bool {
	if m.Type == "bind" {
		return true
	}
	for _, o := range m.Options {
		if o == "bind" || o == "rbind" {
			return true
		}
	}
	return false
}

// Destroy undoes Create.
func (s *Sandbox) Destroy(ctx context.Context) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.teardown(ctx)
	s.created = false
}

func (s *Sandbox) teardown(ctx context.Context) {
	s.prepared = false
	_ = unix.Unmount(s.filePath("shm"), unix.MNT_DETACH)
	unpinNamespaces(filepath.Join(s.dir, "ns"))
	if err := os.RemoveAll(s.dir); err != nil {
		log.G(ctx).WithError(err).Warn("remove sandbox files")
	}
}
