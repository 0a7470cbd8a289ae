package network

import (
	"fmt"
	"math/rand/v2"
	"net"
	"path/filepath"
	"runtime"
	"testing"
	"time"

	"github.com/containerd/errdefs"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/caisson-containers/caisson/internal/testutil"
)

// podNetNS makes a network namespace like CNI's: a veth "eth0" with an address and a
// default route inside, its peer on the host. It is removed when the test ends.
func podNetNS(t *testing.T) (path string, peer netlink.Link, mac net.HardwareAddr) {
	return podNetNSWith(t, []string{"10.250.7.2/24"}, []string{"10.250.7.1"})
}

// podNetNSWith is podNetNS with the given addresses on eth0 and a default route through
// each gateway.
func podNetNSWith(t *testing.T, addrs, gateways []string) (path string, peer netlink.Link, mac net.HardwareAddr) {
	t.Helper()
	testutil.RequireRoot(t)
	name, ns := newNetNS(t)

	veth := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "h" + name, MTU: 1400}, PeerName: "p" + name}
	if err := netlink.LinkAdd(veth); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { netlink.LinkDel(veth) })
	pl, err := netlink.LinkByName("p" + name)
	if err != nil {
		t.Fatal(err)
	}
	if err := netlink.LinkSetNsFd(pl, int(ns)); err != nil {
		t.Fatal(err)
	}
	h, err := netlink.NewHandleAt(ns)
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	in, err := h.LinkByName("p" + name)
	if err != nil {
		t.Fatal(err)
	}
	lo, err := h.LinkByName("lo")
	must(t, err)
	must(t, h.LinkSetUp(lo)) // CNI's loopback plugin does
	must(t, h.LinkSetName(in, "eth0"))
	must(t, h.LinkSetUp(in))
	for _, a := range addrs {
		addr, err := netlink.ParseAddr(a)
		must(t, err)
		addr.Flags = unix.IFA_F_NODAD // as CNI leaves them: past duplicate address detection
		must(t, h.AddrAdd(in, addr))
	}
	for _, gw := range gateways {
		must(t, h.RouteAdd(&netlink.Route{LinkIndex: in.Attrs().Index, Gw: net.ParseIP(gw)}))
	}
	host, err := netlink.LinkByName("h" + name)
	if err != nil {
		t.Fatal(err)
	}
	must(t, netlink.LinkSetUp(host))
	return filepath.Join("/var/run/netns", name), host, in.Attrs().HardwareAddr
}

// newNetNS creates a network namespace, removed when the test ends.
func newNetNS(t *testing.T) (name string, ns netns.NsHandle) {
	t.Helper()
	name = fmt.Sprintf("cnt%06x", rand.IntN(1<<24))
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	orig, err := netns.Get()
	if err != nil {
		t.Fatal(err)
	}
	defer orig.Close()
	ns, err = netns.NewNamed(name) // switches this thread into it
	if err != nil {
		t.Fatal(err)
	}
	if err := netns.Set(orig); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ns.Close(); netns.DeleteNamed(name) })
	return name, ns
}

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

// TestSetupConnectsVethAndTap: Setup reports the veth's MAC, MTU, address and default
// route; a frame written to the tap (what the guest sends) leaves through the veth to its
// host peer; Close removes the redirections, and the tap goes with its descriptor.
func TestSetupConnectsVethAndTap(t *testing.T) {
	path, host, mac := podNetNS(t)
	if v, err := Veths(path); err != nil || len(v) != 1 || v[0] != "eth0" {
		t.Fatalf("Veths = %v, %v; want [eth0]", v, err)
	}
	n, err := Setup(path)
	if err != nil {
		t.Fatal(err)
	}
	defer n.Close()
	if len(n.Interfaces) != 1 {
		t.Fatalf("%d interfaces, want eth0 only", len(n.Interfaces))
	}
	i := n.Interfaces[0]
	if i.Name != "eth0" || i.MAC.String() != mac.String() || i.MTU != 1400 || len(i.Addresses) != 1 || i.Addresses[0] != "10.250.7.2/24" {
		t.Fatalf("interface %+v, want eth0 %s mtu 1400 10.250.7.2/24", i, mac)
	}
	if len(n.Routes) != 2 || n.Routes[0].Destination != "" || n.Routes[0].Gateway != "10.250.7.1" || n.Routes[0].Device != "eth0" ||
		n.Routes[1].Destination != LocalAddress+"/32" || n.Routes[1].Device != "eth0" {
		t.Fatalf("routes %+v, want the default via 10.250.7.1 dev eth0 and %s on-link", n.Routes, LocalAddress)
	}

	// A broadcast frame from the "guest" (written to the tap) reaches the host peer.
	before := rxPackets(t, host)
	frame := make([]byte, 60)
	copy(frame[0:6], []byte{0xff, 0xff, 0xff, 0xff, 0xff, 0xff})
	copy(frame[6:12], mac)
	frame[12], frame[13] = 0x88, 0xb5 // local experimental ethertype
	for range 3 {
		if _, err := i.Tap.Write(frame); err != nil {
			t.Fatalf("write to the tap: %v", err)
		}
	}
	deadline := time.Now().Add(10 * time.Second)
	for rxPackets(t, host) < before+3 {
		if time.Now().After(deadline) {
			t.Fatalf("the host peer received %d frames of the 3 written to the tap", rxPackets(t, host)-before)
		}
		time.Sleep(20 * time.Millisecond)
	}

	tapName := i.TapName
	must(t, n.Close())
	err = inNetNS(path, func(h *netlink.Handle) error {
		for _, name := range []string{"eth0"} {
			l, err := h.LinkByName(name)
			if err != nil {
				return err
			}
			qs, err := h.QdiscList(l)
			if err != nil {
				return err
			}
			for _, q := range qs {
				if q.Type() == "ingress" {
					return fmt.Errorf("%s still has an ingress qdisc after Close", name)
				}
			}
		}
		if _, err := h.LinkByName(tapName); err == nil {
			return fmt.Errorf("%s still exists after Close closed its descriptor", tapName)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

func rxPackets(t *testing.T, l netlink.Link) uint64 {
	t.Helper()
	l, err := netlink.LinkByIndex(l.Attrs().Index)
	if err != nil {
		t.Fatal(err)
	}
	return l.Attrs().Statistics.RxPackets
}

// TestSetupWithoutVeth: a namespace with loopback only gives no interfaces; a path that is
// not a namespace is NotFound.
func TestSetupWithoutVeth(t *testing.T) {
	testutil.RequireRoot(t)
	name, _ := newNetNS(t)
	n, err := Setup(filepath.Join("/var/run/netns", name))
	if err != nil {
		t.Fatal(err)
	}
	if len(n.Interfaces) != 0 {
		t.Fatalf("%d interfaces in a namespace without a veth", len(n.Interfaces))
	}
	must(t, n.Close())
	if _, err := Setup(filepath.Join(t.TempDir(), "none")); !errdefs.IsNotFound(err) {
		t.Fatalf("Setup of a missing namespace: %v, want NotFound", err)
	}
}
