package harness

import (
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"path/filepath"
	"testing"

	"github.com/vishvananda/netlink"

	"github.com/caisson-containers/caisson/internal/testutil"
)

// CNI is a CNI bridge network for the test's pods: a conflist in a private conf
// dir, the plugins `make deps` built, host-local IPAM keeping its leases in the
// test's directory, and a bridge whose gateway address is on the host (so the
// host reaches pods at their IPs). Cleanup deletes the bridge.
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
