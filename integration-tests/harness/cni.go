package harness

import (
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/vishvananda/netlink"

	"github.com/caisson-containers/caisson/internal/testutil"
)

// CNI is a CNI bridge network for the test's pods: a conflist in a private conf
// dir, the plugins `make deps` built, host-local IPAM keeping its leases in the
// test's directory, and a bridge whose gateway address is on the host (so the
// host reaches pods at their IPs). Cleanup deletes the bridge and puts back the
// host's IP forwarding sysctls, which the bridge plugin turns on (see Forwarding).
type CNI struct {
	ConfDir string
	BinDir  string
	// Bridge is the bridge's name on the host.
	Bridge string
	// Subnet is the pods' subnet, Gateway the bridge's address in it.
	Subnet  *net.IPNet
	Gateway net.IP
}

// NewCNI writes the network's configuration under dir. The subnet and bridge name
// are random, so tests of other checkouts on the same host do not collide.
func NewCNI(t testing.TB, dir string) *CNI {
	t.Helper()
	bin := filepath.Join(testutil.RepoRoot(t), "_output", "tools", "cni")
	for _, p := range []string{"bridge", "host-local", "loopback"} {
		if _, err := os.Stat(filepath.Join(bin, p)); err != nil {
			t.Skipf("needs the CNI plugin %s in %s (run `make deps`)", p, bin)
		}
	}
	// Saved before anything of the network exists, put back after the bridge is gone
	// (cleanups run last first), and checked: every test that networks pods shows
	// that it leaves the host's forwarding as it found it.
	hadPortmap := portmapChains()
	t.Cleanup(func() {
		// Registered first, so it runs after the pods and the bridge are gone.
		if !hadPortmap {
			if err := removePortmapChains(); err != nil {
				t.Errorf("remove the portmap plugin's iptables chains: %v", err)
			}
		}
	})
	saved := Forwarding()
	t.Cleanup(func() {
		if err := saved.Restore(); err != nil {
			t.Errorf("restore the host's IP forwarding: %v", err)
		} else if diff := saved.Diff(Forwarding()); diff != "" {
			t.Errorf("the host's IP forwarding changed: %s", diff)
		}
	})
	c := &CNI{ConfDir: filepath.Join(dir, "cni", "net.d"), BinDir: bin}
	a, b := 100+rand.IntN(100), rand.IntN(256)
	_, c.Subnet, _ = net.ParseCIDR(fmt.Sprintf("10.%d.%d.0/24", a, b))
	c.Gateway = net.IPv4(10, byte(a), byte(b), 1).To4()
	c.Bridge = fmt.Sprintf("cbr%06x", rand.IntN(1<<24))
	conf := map[string]any{
		"cniVersion": "1.0.0",
		"name":       "caisson-test",
		"plugins": []any{map[string]any{
			"type":        "bridge",
			"bridge":      c.Bridge,
			"isGateway":   true,
			"ipMasq":      false,
			"hairpinMode": true,
			"ipam": map[string]any{
				"type":    "host-local",
				"ranges":  [][]map[string]string{{{"subnet": c.Subnet.String(), "gateway": c.Gateway.String()}}},
				"routes":  []map[string]string{{"dst": "0.0.0.0/0"}},
				"dataDir": filepath.Join(dir, "cni", "ipam"),
			},
		}},
	}
	// The kubelet's usual chain: hostPort mappings (CRI port_mappings) by the portmap
	// plugin, which does nothing for a pod without them.
	if _, err := os.Stat(filepath.Join(bin, "portmap")); err == nil {
		conf["plugins"] = append(conf["plugins"].([]any), map[string]any{
			"type":         "portmap",
			"capabilities": map[string]bool{"portMappings": true},
		})
	}
	b2, _ := json.MarshalIndent(conf, "", "  ")
	if err := os.MkdirAll(c.ConfDir, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(c.ConfDir, "10-caisson-test.conflist"), b2, 0o644); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if l, err := netlink.LinkByName(c.Bridge); err == nil {
			if err := netlink.LinkDel(l); err != nil {
				t.Errorf("delete bridge %s: %v", c.Bridge, err)
			}
		}
	})
	return c
}

// Veths are the host ends of veths on the bridge: one per pod that is still connected.
func (c *CNI) Veths() []string {
	br, err := netlink.LinkByName(c.Bridge)
	if err != nil {
		return nil
	}
	links, _ := netlink.LinkList()
	var v []string
	for _, l := range links {
		if l.Attrs().MasterIndex == br.Attrs().Index {
			v = append(v, l.Attrs().Name)
		}
	}
	return v
}

// Sysctl is one sysctl's value, by its /proc/sys path.
type Sysctl struct{ Path, Value string }

// Sysctls are sysctl values in the order they must be written back.
type Sysctls []Sysctl

// Forwarding reads the host's IP forwarding sysctls. The bridge plugin turns on
// net.ipv4.ip_forward, and net.ipv6.conf.all.forwarding for an IPv6 range, for a
// gateway bridge (ip.EnableForward) and never turns them off; writing either also
// sets every interface's own forwarding switch, so those are read too. Order: each
// family's global switches first, then its interfaces, so that writing them back in
// this order leaves each interface's value last.
func Forwarding() Sysctls {
	var out Sysctls
	read := func(p string) {
		if b, err := os.ReadFile(p); err == nil {
			out = append(out, Sysctl{p, strings.TrimSpace(string(b))})
		}
	}
	read("/proc/sys/net/ipv4/ip_forward")
	for _, fam := range []string{"ipv4", "ipv6"} {
		conf := "/proc/sys/net/" + fam + "/conf/"
		read(conf + "all/forwarding")
		read(conf + "default/forwarding")
		ifaces, _ := filepath.Glob(conf + "*/forwarding")
		for _, p := range ifaces {
			if name := filepath.Base(filepath.Dir(p)); name != "all" && name != "default" {
				read(p)
			}
		}
	}
	return out
}

// Restore writes back each value that differs now; interfaces gone since are skipped.
func (s Sysctls) Restore() error {
	var errs []error
	for _, c := range s {
		b, err := os.ReadFile(c.Path)
		if errors.Is(err, os.ErrNotExist) {
			continue
		}
		if err == nil && strings.TrimSpace(string(b)) == c.Value {
			continue
		}
		if err := os.WriteFile(c.Path, []byte(c.Value+"\n"), 0o644); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// Diff lists the sysctls of s whose value in now differs ("" if none); sysctls of
// interfaces that exist in only one of them are not compared.
func (s Sysctls) Diff(now Sysctls) string {
	m := map[string]string{}
	for _, c := range now {
		m[c.Path] = c.Value
	}
	var d []string
	for _, c := range s {
		if v, ok := m[c.Path]; ok && v != c.Value {
			d = append(d, fmt.Sprintf("%s %s, was %s", strings.TrimPrefix(c.Path, "/proc/sys/"), v, c.Value))
		}
	}
	return strings.Join(d, "; ")
}

// The portmap plugin's top-level nat chains, and the jumps to them it adds to the
// built-in chains. portmap never removes them (every pod with a hostPort shares
// them); an environment that brought them removes them once its pods are gone and
// no rule of another's is in them.
var portmapJumps = [][]string{
	{"PREROUTING", "-m", "addrtype", "--dst-type", "LOCAL", "-j", "CNI-HOSTPORT-DNAT"},
	{"OUTPUT", "-m", "addrtype", "--dst-type", "LOCAL", "-j", "CNI-HOSTPORT-DNAT"},
	{"POSTROUTING", "-m", "comment", "--comment", "CNI portfwd requiring masquerade", "-j", "CNI-HOSTPORT-MASQ"},
}

func portmapChains() bool {
	return exec.Command("iptables", "-w", "-t", "nat", "-S", "CNI-HOSTPORT-DNAT").Run() == nil
}

func removePortmapChains() error {
	out, err := exec.Command("iptables", "-w", "-t", "nat", "-S", "CNI-HOSTPORT-DNAT").Output()
	if err != nil {
		return nil // never created
	}
	if strings.Contains(string(out), "-A CNI-HOSTPORT-DNAT") {
		return nil // another environment's pods still map ports
	}
	for _, j := range portmapJumps {
		exec.Command("iptables", append([]string{"-w", "-t", "nat", "-D"}, j...)...).Run()
	}
	var errs []error
	for _, chain := range []string{"CNI-HOSTPORT-DNAT", "CNI-HOSTPORT-MASQ", "CNI-HOSTPORT-SETMARK"} {
		for _, op := range []string{"-F", "-X"} {
			if out, err := exec.Command("iptables", "-w", "-t", "nat", op, chain).CombinedOutput(); err != nil && op == "-X" {
				errs = append(errs, fmt.Errorf("iptables -X %s: %v: %s", chain, err, out))
			}
		}
	}
	return errors.Join(errs...)
}
