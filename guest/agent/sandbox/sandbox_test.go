package sandbox

import (
	"context"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/containerd/errdefs"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"github.com/vishvananda/netlink"

	"github.com/caisson-containers/caisson/internal/testutil"
)

func TestCreateNetwork(t *testing.T) {
	testutil.RequireRoot(t)
	ctx := context.Background()
	// One end of a veth pair in the test's network namespace stands for the VM's
	// virtio-net device (this host has no dummy driver).
	name := fmt.Sprintf("cst%d", os.Getpid()%100000)
	mac, _ := net.ParseMAC("02:00:00:c0:ff:ee")
	veth := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: name, HardwareAddr: mac}, PeerName: name + "p"}
	if err := netlink.LinkAdd(veth); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		// Deleting either end deletes the pair; the moved end goes with the pod's namespace.
		if l, err := netlink.LinkByName(name + "p"); err == nil {
			_ = netlink.LinkDel(l)
		}
	})

	s := New(filepath.Join(t.TempDir(), "sandbox"))
	t.Cleanup(func() { s.Destroy(ctx) })
	cfg := Config{
		ID:       "pod",
		Hostname: "pod-host",
		DNS:      DNS{Servers: []string{"10.0.0.53"}, Searches: []string{"svc.local"}},
		Hosts:    []HostEntry{{IP: "10.88.0.5", Names: []string{"pod-host"}}},
		Ifaces:   []Interface{{Name: "eth0", MAC: mac.String(), MTU: 1400, Addresses: []string{"10.88.0.5/16"}}},
		Routes:   []Route{{Gateway: "10.88.0.1", Device: "eth0"}},
		Sysctls:  map[string]string{"net.ipv4.ip_forward": "1"},
	}
	if err := s.Create(ctx, cfg); err != nil {
		t.Fatal(err)
	}
	if err := s.Create(ctx, cfg); !errdefs.IsAlreadyExists(err) {
		t.Errorf("second Create: %v, want AlreadyExists", err)
	}
	if _, err := netlink.LinkByName(name); err == nil {
		t.Error("the NIC is still in the agent's namespace")
	}
	if !loopbackIsUp(t, s.nsPath("net")) {
		t.Error("lo is down in the pod's network namespace")
	}
	h := netlinkIn(t, s.nsPath("net"))
	l, err := h.LinkByName("eth0")
	if err != nil {
		t.Fatal(err)
	}
	if l.Attrs().MTU != 1400 || l.Attrs().HardwareAddr.String() != mac.String() {
		t.Errorf("eth0: mtu %d mac %s", l.Attrs().MTU, l.Attrs().HardwareAddr)
	}
	addrs, _ := h.AddrList(l, netlink.FAMILY_V4)
	if len(addrs) != 1 || addrs[0].IPNet.String() != "10.88.0.5/16" {
		t.Errorf("addresses %v", addrs)
	}
	routes, _ := h.RouteList(l, netlink.FAMILY_V4)
	var gw bool
	for _, r := range routes {
		if (r.Dst == nil || r.Dst.String() == "0.0.0.0/0") && r.Gw.String() == "10.88.0.1" {
			gw = true
		}
	}
	if !gw {
		t.Errorf("no default route via 10.88.0.1: %v", routes)
	}
	var fwd []byte
	if err := inNetns(s.nsPath("net"), func() (err error) {
		fwd, err = os.ReadFile("/proc/sys/net/ipv4/ip_forward")
		return err
	}); err != nil || string(fwd) != "1\n" {
		t.Errorf("ip_forward %q (%v)", fwd, err)
	}

	// A MAC no NIC has is NotFound (after a bounded wait), and the pod is unchanged.
	shortCtx, cancel := context.WithTimeout(ctx, 100*time.Millisecond)
	defer cancel()
	if err := s.SetNetwork(shortCtx, []Interface{{Name: "eth9", MAC: "02:00:00:00:00:09"}}, nil); !errdefs.IsNotFound(err) {
		t.Errorf("unknown MAC: %v, want NotFound", err)
	}

	// New addresses replace the old ones.
	if err := s.SetNetwork(ctx, []Interface{{Name: "eth0", MAC: mac.String(), Addresses: []string{"10.99.0.7/24"}}}, nil); err != nil {
		t.Fatal(err)
	}
	addrs, _ = h.AddrList(l, netlink.FAMILY_V4)
	if len(addrs) != 1 || addrs[0].IPNet.String() != "10.99.0.7/24" {
		t.Errorf("addresses after SetNetwork %v", addrs)
	}

	for name, want := range map[string]string{
		"hosts":       "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n10.88.0.5\tpod-host\n",
		"resolv.conf": "nameserver 10.0.0.53\nsearch svc.local\n",
		"hostname":    "pod-host\n",
	} {
		if b, _ := os.ReadFile(s.filePath(name)); string(b) != want {
			t.Errorf("%s = %q, want %q", name, b, want)
		}
	}

	spec := &specs.Spec{
		Linux: &specs.Linux{Namespaces: []specs.LinuxNamespace{
			{Type: specs.NetworkNamespace, Path: "/var/run/netns/cni-1234"}, {Type: specs.IPCNamespace},
			{Type: specs.UTSNamespace}, {Type: specs.PIDNamespace}, {Type: specs.MountNamespace},
		}},
		Mounts: []specs.Mount{
			{Destination: "/etc/hosts", Type: "bind", Source: "/var/lib/containerd/sandboxes/x/hosts", Options: []string{"rbind", "ro"}},
			{Destination: "/proc", Type: "proc", Source: "proc"},
		},
	}
	if err := s.AdjustSpec(spec); err != nil {
		t.Fatal(err)
	}
	if got := spec.Linux.Namespaces[0].Path; got != s.nsPath("net") {
		t.Errorf("network namespace %q", got)
	}
	if spec.Linux.Namespaces[3].Path != "" || spec.Mounts[0].Source != s.filePath("hosts") {
		t.Errorf("pid namespace %q, hosts mount %q", spec.Linux.Namespaces[3].Path, spec.Mounts[0].Source)
	}
	hostNet := &specs.Spec{
		Process: &specs.Process{ApparmorProfile: "cri-containerd.apparmor.d", SelinuxLabel: "system_u:system_r:container_t"},
		Linux:   &specs.Linux{Namespaces: []specs.LinuxNamespace{{Type: specs.PIDNamespace}, {Type: specs.IPCNamespace}, {Type: specs.MountNamespace}}},
	}
	if err := s.AdjustSpec(hostNet); err != nil {
		t.Fatal(err)
	}
	if len(hostNet.Linux.Namespaces) != 5 || hostNet.Linux.Namespaces[3].Path != s.nsPath("net") || hostNet.Linux.Namespaces[1].Path != s.nsPath("ipc") {
		t.Errorf("a container without network and UTS namespaces: %v", hostNet.Linux.Namespaces)
	}
	// The host's PID and IPC namespaces (hostPID, hostIPC) are refused, naming the field.
	for want, nss := range map[string][]specs.LinuxNamespace{
		"hostPID": {{Type: specs.IPCNamespace}, {Type: specs.MountNamespace}},
		"hostIPC": {{Type: specs.PIDNamespace}, {Type: specs.MountNamespace}},
	} {
		err := s.AdjustSpec(&specs.Spec{Linux: &specs.Linux{Namespaces: nss}})
		if !errdefs.IsInvalidArgument(err) || !strings.Contains(fmt.Sprint(err), want) {
			t.Errorf("%s: %v, want InvalidArgument naming it", want, err)
		}
	}
	if hostNet.Process.ApparmorProfile != "" || hostNet.Process.SelinuxLabel != "" {
		t.Errorf("host security labels kept: %+v", hostNet.Process)
	}
	bad := &specs.Spec{Mounts: []specs.Mount{{Destination: "/data", Type: "bind", Source: "/host/only/dir"}}}
	if err := s.AdjustSpec(bad); !errdefs.IsInvalidArgument(err) {
		t.Errorf("bind of a host directory: %v, want InvalidArgument", err)
	}

	// The CRI's pod PID namespace (the shim's "pod" path) is the first container's;
	// a container with a PID namespace of its own keeps it.
	pidSpec := func(path string) *specs.Spec {
		return &specs.Spec{Linux: &specs.Linux{Namespaces: []specs.LinuxNamespace{{Type: specs.PIDNamespace, Path: path}, {Type: specs.IPCNamespace}}}}
	}
	if err := s.AdjustSpec(pidSpec(PodPIDNamespace)); !errdefs.IsFailedPrecondition(err) {
		t.Errorf("the pod's PID namespace without its holder: %v, want FailedPrecondition", err)
	}
	s.ContainerCreated(4242)
	joined := pidSpec(PodPIDNamespace)
	if err := s.AdjustSpec(joined); err != nil || joined.Linux.Namespaces[0].Path != "/proc/4242/ns/pid" {
		t.Errorf("the pod's PID namespace: %q, %v", joined.Linux.Namespaces[0].Path, err)
	}
	own := pidSpec("")
	if err := s.AdjustSpec(own); err != nil || own.Linux.Namespaces[0].Path != "" {
		t.Errorf("a PID namespace of its own: %q, %v", own.Linux.Namespaces[0].Path, err)
	}
}
