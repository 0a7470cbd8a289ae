package task

import (
	"encoding/json"
	"fmt"
	"net"
	"os"
	"path"
	"path/filepath"
	"slices"
	"strings"

	"github.com/containerd/errdefs"
	"github.com/opencontainers/runtime-spec/specs-go"

	agent "github.com/caisson-containers/caisson/api/agent/v1"
	"github.com/caisson-containers/caisson/shim/config"
	"github.com/caisson-containers/caisson/shim/copies"
	"github.com/caisson-containers/caisson/shim/hooks"
	"github.com/caisson-containers/caisson/shim/pod"
	"github.com/caisson-containers/caisson/shim/virtiofs"
)

// Guest paths the agent's Sandbox.Create provides (api/agent/v1/sandbox.proto).
const (
	guestSandboxDir = "/run/caisson/sandbox"
	// podPIDNamespace is the PID namespace path that joins the pod's first container's.
	podPIDNamespace = "pod"
)

// guestFiles maps the CRI's per-pod host files, by the destination they are
// mounted at, to the sandbox's guest files.
var guestFiles = map[string]string{
	"/etc/hostname":    guestSandboxDir + "/hostname",
	"/etc/hosts":       guestSandboxDir + "/hosts",
	"/etc/resolv.conf": guestSandboxDir + "/resolv.conf",
	"/dev/shm":         guestSandboxDir + "/shm",
}

// readSpec reads the bundle's OCI spec.
func readSpec(bundle string) (*specs.Spec, error) {
	b, err := os.ReadFile(filepath.Join(bundle, "config.json"))
	if err != nil {
		return nil, fmt.Errorf("read OCI spec: %w", err)
	}
	var s specs.Spec
	if err := json.Unmarshal(b, &s); err != nil {
		return nil, fmt.Errorf("decode OCI spec: %v: %w", err, errdefs.ErrInvalidArgument)
	}
	return &s, nil
}

// guestContainer is what a container's host spec becomes in its pod's VM (translate).
type guestContainer struct {
	spec    *specs.Spec // the guest's spec
	binds   hostBinds   // its host bind mounts: copied, or shared
	devices devicePlan  // its linux.devices: attached to the VM, or the guest's own
	// pod is what the spec says of the pod, for the pod's first container: its hostname,
	// the host network namespace its NICs come from ("" for a new one, which the hooks
	// may fill: hooks.go), its name resolution and its VM's cgroup.
	pod pod.Options
}

// translate is the one reading of a container's host spec s for its pod's VM run with
// cfg: the guest spec (guestSpec) and its devices (guestDevices), and what the pod takes
// from it. A spec Caisson cannot run is refused, the error naming the container and why.
func translate(id string, s *specs.Spec, cfg config.Config) (*guestContainer, error) {
	netns, err := podNetNS(s)
	if err != nil {
		return nil, fmt.Errorf("container %s: %w", id, err)
	}
	if err := hooks.Validate(s.Hooks); err != nil {
		return nil, fmt.Errorf("container %s: %w", id, err)
	}
	g := &guestContainer{}
	if g.spec, g.binds, err = guestSpec(s, cfg.Guest.CopiedMountLimitBytes, pod.SharesHostPaths(cfg)); err != nil {
		return nil, fmt.Errorf("container %s: %w", id, err)
	}
	if g.devices, err = hostDevices.guestDevices(g.spec); err != nil {
		return nil, fmt.Errorf("container %s: %w", id, err)
	}
	dns, hosts, err := podNameResolution(s)
	if err != nil {
		return nil, err
	}
	g.pod = pod.Options{Hostname: hostname(id, s), NetNS: netns, DNS: dns, Hosts: hosts, Cgroup: podCgroup(s)}
	return g, nil
}

// hostBinds is what guestSpec decided for the spec's host bind mounts.
type hostBinds struct {
	// copied are the CopiedMounts the agent makes the sources of (copy mode), and
	// sources what the copy watcher needs of them.
	copied  []*agent.CopiedMount
	sources []copies.Source
	// shared are mounts whose host source the pod shares with the guest (virtio-fs):
	// the shim shares each and points the guest spec's mount at it before sending it.
	shared []sharedBind
}

// sharedBind is a guest spec mount whose source is a host path to share.
type sharedBind struct {
	index  int // in the guest spec's Mounts
	source string
	access virtiofs.Access
}

// guestSpec rewrites what in a host spec refers to the host: bind mounts of the
// CRI's pod files become the sandbox's guest files; /dev/termination-log is
// dropped; other host bind mounts are shared (share: virtio-fs, the shim shares
// them before the spec is sent) or else copied (see copies.Tree; at most limit bytes
// each; a writable one, whose writes would never reach the host, is refused);
// namespace paths, which name host objects, are dropped, and so are the hooks,
// which the shim runs on the host (hooks.go).
func guestSpec(s *specs.Spec, limit int64, share bool) (*specs.Spec, hostBinds, error) {
	g := *s
	g.Root = &specs.Root{Path: "rootfs", Readonly: s.Root != nil && s.Root.Readonly}
	g.Hooks = nil
	if s.Linux != nil {
		l := *s.Linux
		l.Namespaces = nil
		for _, ns := range s.Linux.Namespaces {
			if ns.Type == specs.UserNamespace {
				// The runtime's features (shim/manager) offer none, so containerd 2.x's
				// CRI refuses such pods itself; 1.7's asks nothing, and would run CNI in
				// /proc/<task pid>/ns/net, the namespace of QEMU's pid.
				return nil, hostBinds{}, fmt.Errorf("a user namespace (CRI user namespaces, Kubernetes hostUsers: false) "+
					"is not supported by Caisson: the pod's VM is its isolation: %w", errdefs.ErrNotImplemented)
			}
			if ns.Type == specs.PIDNamespace && ns.Path != "" {
				ns.Path = podPIDNamespace
			} else {
				ns.Path = ""
			}
			l.Namespaces = append(l.Namespaces, ns)
		}
		g.Linux = &l
	}
	g.Mounts = nil
	var binds hostBinds
	for _, m := range s.Mounts {
		if !isBind(m) {
			g.Mounts = append(g.Mounts, m)
			continue
		}
		if src, ok := guestFiles[m.Destination]; ok {
			m.Source = src
			g.Mounts = append(g.Mounts, m)
			continue
		}
		if m.Destination == "/dev/termination-log" {
			// The kubelet reads it on the host, which cannot see the guest; the
			// container writes to its own /dev instead.
			continue
		}
		if share {
			binds.shared = append(binds.shared, sharedBind{index: len(g.Mounts), source: m.Source, access: mountAccess(m)})
			g.Mounts = append(g.Mounts, m)
			continue
		}
		if !isReadonly(m) {
			return nil, binds, fmt.Errorf("bind mount of host path %q at %q is writable, and this pod copies host paths into its VM "+
				"(guest.shared_fs = \"copy\", or a pod from a VM template): its writes would never reach the host; "+
				"mount it read-only, or share it (guest.shared_fs = \"virtio-fs\", without hypervisor.template): %w",
				m.Source, m.Destination, errdefs.ErrInvalidArgument)
		}
		files, sig, err := copies.Tree(m.Source, limit)
		if err != nil {
			return nil, binds, fmt.Errorf("bind mount of host path %q at %q cannot be copied into the Caisson VM: %w",
				m.Source, m.Destination, err)
		}
		key := filepath.Clean(m.Source)
		binds.copied = append(binds.copied, &agent.CopiedMount{MountIndex: uint32(len(g.Mounts)), Key: key, Files: files})
		binds.sources = append(binds.sources, copies.Source{Key: key, ReadOnly: true, Sig: sig})
		g.Mounts = append(g.Mounts, m)
	}
	return &g, binds, nil
}

// shareBinds shares the host paths of binds with the pod's guest for container id
// and points g's mounts at them. A read-only (not recursively) share's submounts are
// mounted again, each right after it: in the guest they would appear under the
// container's read-only mount, read-only too, where runc leaves them as they are on
// the host. On error nothing stays shared.
func shareBinds(pd *pod.Pod, id string, g *specs.Spec, binds []sharedBind) (retErr error) {
	defer func() {
		if retErr != nil {
			pd.Unshare(id)
		}
	}()
	below := map[int][]specs.Mount{}
	for n, b := range binds {
		m := &g.Mounts[b.index]
		guest, subs, err := pd.Share(id, n, b.source, b.access)
		if err != nil {
			return fmt.Errorf("bind mount of host path %q at %q: %w", b.source, m.Destination, err)
		}
		m.Source = guest
		for _, sub := range subs {
			below[b.index] = append(below[b.index], submount(*m, sub))
		}
	}
	if len(below) == 0 {
		return nil
	}
	mounts := make([]specs.Mount, 0, len(g.Mounts))
	for i, m := range g.Mounts {
		mounts = append(mounts, m)
		mounts = append(mounts, below[i]...)
	}
	g.Mounts = mounts
	return nil
}

// submount is the mount of sub, below the shared mount m, with m's options but
// for its own read-only flag.
func submount(m specs.Mount, sub virtiofs.Submount) specs.Mount {
	opts := slices.DeleteFunc(slices.Clone(m.Options), func(o string) bool { return o == "ro" || o == "rw" || o == "rro" })
	if sub.ReadOnly {
		opts = append(opts, "ro")
	} else {
		opts = append(opts, "rw")
	}
	return specs.Mount{
		Destination: path.Join(m.Destination, sub.Path),
		Type:        m.Type,
		Source:      path.Join(m.Source, sub.Path),
		Options:     opts,
	}
}

// mountAccess is how a container may use a shared bind mount, from its options.
func mountAccess(m specs.Mount) virtiofs.Access {
	switch {
	case slices.Contains(m.Options, "rro"):
		return virtiofs.RecursiveReadOnly
	case isReadonly(m):
		return virtiofs.ReadOnly
	}
	return virtiofs.ReadWrite
}

// isReadonly reports whether a mount's options, the last of "ro" and "rw" winning, make
// it read-only; "rro" (recursive read-only, which the CRI never combines with "rw")
// does too.
func isReadonly(m specs.Mount) bool {
	ro := false
	for _, o := range m.Options {
		switch o {
		case "ro", "rro":
			ro = true
		case "rw":
			ro = false
		}
	}
	return ro
}

func isBind(m specs.Mount) bool {
	if m.Type == "bind" || m.Type == "rbind" {
		return true
	}
	for _, o := range m.Options {
		if o == "bind" || o == "rbind" {
			return true
		}
	}
	return false
}

// CRI annotations (containerd's pkg/cri/annotations), read without importing the CRI.
const (
	annotationContainerType = "io.kubernetes.cri.container-type"
	containerTypeSandbox    = "sandbox"
	containerTypeContainer  = "container"
	annotationSandboxMemory = "io.kubernetes.cri.sandbox-memory"
	annotationSandboxQuota  = "io.kubernetes.cri.sandbox-cpu-quota"
	annotationSandboxPeriod = "io.kubernetes.cri.sandbox-cpu-period"
	annotationHostname      = "io.kubernetes.cri.sandbox-name"
)

func hostname(id string, s *specs.Spec) string {
	if s.Hostname != "" {
		return s.Hostname
	}
	return id[:min(len(id), 12)]
}

// podNetNS is the host network namespace the pod's NICs come from: the one the spec
// joins (CNI's, for a CRI pod), or "" for a spec that asks for a new one (the shim makes
// it when hooks may fill it: hooks.go). A spec without a network namespace, which shares
// the host's (a CRI pod with hostNetwork: true, `nerdctl run --net host`, `ctr run
// --net-host`), is refused: a VM has its own network stack, and such a container expects to
// bind the host's ports and see its interfaces.
func podNetNS(s *specs.Spec) (string, error) {
	if s.Linux != nil {
		for _, ns := range s.Linux.Namespaces {
			if ns.Type == specs.NetworkNamespace {
				return ns.Path, nil
			}
		}
	}
	if s.Annotations[annotationContainerType] == containerTypeSandbox {
		return "", fmt.Errorf("host-network pods (hostNetwork: true) cannot run in a Caisson VM, which has its own network stack; use another runtime class for them: %w",
			errdefs.ErrInvalidArgument)
	}
	return "", fmt.Errorf("the spec shares the host's network namespace (--net host), but a Caisson container runs in a VM, which cannot share the host's network namespace: give it a network namespace of its own (nerdctl's default bridge network, or --net none), or use another runtime for it: %w",
		errdefs.ErrInvalidArgument)
}

// podNameResolution reads the resolv.conf and hosts files the spec bind-mounts from the
// host (the CRI writes them from the pod's DNSConfig and HostAliases; nerdctl from its
// network), so that the guest's sandbox files, which replace them, say the same. The
// guest always has its own localhost entries. Files that are not mounted give nothing.
func podNameResolution(s *specs.Spec) (*agent.DNS, []*agent.HostEntry, error) {
	var dns *agent.DNS
	var hosts []*agent.HostEntry
	for _, m := range s.Mounts {
		if !isBind(m) || (m.Destination != "/etc/resolv.conf" && m.Destination != "/etc/hosts") {
			continue
		}
		b, err := os.ReadFile(m.Source)
		if err != nil {
			return nil, nil, fmt.Errorf("read the pod's %s: %w", m.Destination, err)
		}
		for _, line := range strings.Split(string(b), "\n") {
			if i := strings.IndexByte(line, '#'); i >= 0 {
				line = line[:i]
			}
			f := strings.Fields(line)
			if len(f) < 2 {
				continue
			}
			if m.Destination == "/etc/hosts" {
				if ip := net.ParseIP(f[0]); ip == nil || ip.IsLoopback() {
					continue
				}
				hosts = append(hosts, &agent.HostEntry{Ip: f[0], Names: f[1:]})
				continue
			}
			if dns == nil {
				dns = &agent.DNS{}
			}
			switch f[0] {
			case "nameserver":
				dns.Servers = append(dns.Servers, f[1])
			case "search":
				dns.Searches = append(dns.Searches, f[1:]...)
			case "options":
				dns.Options = append(dns.Options, f[1:]...)
			}
		}
	}
	return dns, hosts, nil
}

// podCgroup is the cgroup of the pod's VM, for the container that starts the pod: a
// CRI sandbox container's, below the pod's cgroup parent, or a lone container's (ctr's
// /NAMESPACE/ID, nerdctl's); "" lets the shim make one (shim/pod). A CRI pod's other
// containers start no VM: theirs is not the VM's.
func podCgroup(s *specs.Spec) string {
	if s.Linux == nil || s.Annotations[annotationContainerType] == containerTypeContainer {
		return ""
	}
	return s.Linux.CgroupsPath
}
