package network

import (
	"bufio"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/caisson-containers/caisson/internal/testutil"
)

func TestForwardIPs(t *testing.T) {
	for _, tc := range []struct {
		name     string
		cidrs    []string
		ip4, ip6 string
	}{
		{"none", nil, "", ""},
		{"ipv4 only", []string{"10.1.2.3/24"}, "10.1.2.3", ""},
		{"ipv6 only", []string{"fd7a::5/64"}, "", "fd7a::5"},
		{"dual stack, first of each", []string{"fd7a::5/64", "10.1.2.3/24", "10.1.2.4/24", "2001:db8::9/64"}, "10.1.2.3", "fd7a::5"},
		{"link-local skipped", []string{"fe80::1/64", "169.254.3.4/16", "fd7a::5/64"}, "", "fd7a::5"},
		{"garbage skipped", []string{"nonsense", "10.1.2.3/24"}, "10.1.2.3", ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ip4, ip6 := forwardIPs(tc.cidrs)
			if s := ipString(ip4); s != tc.ip4 {
				t.Errorf("ipv4 %q, want %q", s, tc.ip4)
			}
			if s := ipString(ip6); s != tc.ip6 {
				t.Errorf("ipv6 %q, want %q", s, tc.ip6)
			}
		})
	}
}

func ipString(ip net.IP) string {
	if ip == nil {
		return ""
	}
	return ip.String()
}

func TestNATRules(t *testing.T) {
	ip4, ip6 := net.ParseIP("10.1.2.3"), net.ParseIP("fd7a::5")
	want4 := []natRule{
		{"iptables", strings.Fields("-t nat -A OUTPUT -d 127.0.0.1/32 -p tcp -j DNAT --to-destination 10.1.2.3")},
		{"iptables", strings.Fields("-t nat -A POSTROUTING -o tap0_caisson -s 127.0.0.1/32 -j SNAT --to-source " + LocalAddress)},
	}
	want6 := []natRule{
		{"ip6tables", strings.Fields("-t nat -A OUTPUT -d ::1/128 -p tcp -j DNAT --to-destination fd7a::5")},
		{"ip6tables", strings.Fields("-t nat -A POSTROUTING -o tap0_caisson -s ::1/128 -j SNAT --to-source " + LocalAddress6)},
	}
	for _, tc := range []struct {
		name     string
		ip4, ip6 net.IP
		want     []natRule
	}{
		{"ipv4", ip4, nil, want4},
		{"ipv6", nil, ip6, want6},
		{"dual stack", ip4, ip6, append(append([]natRule{}, want4...), want6...)},
		{"neither", nil, nil, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := natRules("tap0_caisson", tc.ip4, tc.ip6); !reflect.DeepEqual(got, tc.want) {
				t.Errorf("rules\n  %v\nwant\n  %v", got, tc.want)
			}
		})
	}
}

// TestLocalForward drives the port-forward path of a dual-stack pod without a VM: a
// "guest" namespace with its own tap, wired to Setup's tap by copying frames (what QEMU
// does), has the pod's MAC and addresses and serves TCP on both families. Inside the pod
// namespace, connections to 127.0.0.1 and to ::1 (what containerd's PortForward dials)
// reach that server, from LocalAddress and LocalAddress6.
func TestLocalForward(t *testing.T) {
	testutil.RequireBinary(t, "iptables")
	testutil.RequireBinary(t, "ip6tables")
	testutil.RequireBinary(t, "nsenter")
	podAddrs := []string{"10.250.7.2/24", "fd7a:ca15:7::2/64"}
	path, _, mac := podNetNSWith(t, podAddrs, []string{"10.250.7.1", "fd7a:ca15:7::1"})
	n, err := Setup(path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { n.Close() })
	i := n.Interfaces[0]
	if i.forward4.String() != "10.250.7.2" || i.forward6.String() != "fd7a:ca15:7::2" {
		t.Fatalf("forwarded to %s and %s, want the pod's two addresses", i.forward4, i.forward6)
	}

	guest, gtap := guestNetNS(t, mac, podAddrs, n.Routes)
	wire(t, i.Tap, gtap)

	var l net.Listener
	must(t, inNetNS(guest, func(*netlink.Handle) error {
		var err error
		l, err = net.Listen("tcp", ":8080") // both families
		return err
	}))
	t.Cleanup(func() { l.Close() })
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			fmt.Fprintf(c, "from %s\n", c.RemoteAddr().(*net.TCPAddr).IP)
			c.Close()
		}
	}()

	// The guest resolves the local addresses itself (ARP, neighbour discovery): a
	// connection to a closed port there is refused, not unreachable.
	for _, dial := range []string{LocalAddress + ":1", "[" + LocalAddress6 + "%eth0]:1"} {
		err := inNetNS(guest, func(*netlink.Handle) error {
			c, err := net.DialTimeout("tcp", dial, 10*time.Second)
			if err == nil {
				c.Close()
			}
			return err
		})
		if !errors.Is(err, unix.ECONNREFUSED) {
			t.Fatalf("guest to %s: %v, want connection refused", dial, err)
		}
	}

	for _, tc := range []struct{ dial, from string }{
		{"127.0.0.1:8080", LocalAddress},
		{"[::1]:8080", LocalAddress6},
	} {
		var line string
		err := inNetNS(path, func(*netlink.Handle) error {
			c, err := net.DialTimeout("tcp", tc.dial, 10*time.Second)
			if err != nil {
				return err
			}
			defer c.Close()
			c.SetDeadline(time.Now().Add(10 * time.Second))
			line, err = bufio.NewReader(c).ReadString('\n')
			return err
		})
		if err != nil {
			t.Fatalf("dial %s in the pod namespace: %v", tc.dial, err)
		}
		if want := "from " + tc.from + "\n"; line != want {
			t.Errorf("%s: the guest's server said %q, want %q", tc.dial, line, want)
		}
	}
}

// guestNetNS makes a namespace that stands for the guest: a tap with the pod's MAC,
// addresses and routes (as the agent sets them), and no duplicate address detection.
func guestNetNS(t *testing.T, mac net.HardwareAddr, addrs []string, routes []Route) (string, *os.File) {
	t.Helper()
	name, _ := newNetNS(t)
	path := filepath.Join("/var/run/netns", name)
	var tap *os.File
	err := inNetNS(path, func(h *netlink.Handle) error {
		lo, err := h.LinkByName("lo")
		if err != nil {
			return err
		}
		if err := h.LinkSetUp(lo); err != nil {
			return err
		}
		tt := &netlink.Tuntap{LinkAttrs: netlink.LinkAttrs{Name: "eth0"}, Mode: netlink.TUNTAP_MODE_TAP, Flags: netlink.TUNTAP_NO_PI, Queues: 1, NonPersist: true}
		if err := h.LinkAdd(tt); err != nil {
			return err
		}
		tap = tt.Fds[0]
		l, err := h.LinkByName("eth0")
		if err != nil {
			return err
		}
		if err := h.LinkSetHardwareAddr(l, mac); err != nil {
			return err
		}
		if err := h.LinkSetUp(l); err != nil {
			return err
		}
		for _, a := range addrs {
			addr, _ := netlink.ParseAddr(a)
			addr.Flags = unix.IFA_F_NODAD
			if err := h.AddrAdd(l, addr); err != nil {
				return err
			}
		}
		for _, r := range routes {
			nr := &netlink.Route{LinkIndex: l.Attrs().Index, Gw: net.ParseIP(r.Gateway)}
			if r.Destination != "" {
				_, nr.Dst, _ = net.ParseCIDR(r.Destination)
			}
			if err := h.RouteAdd(nr); err != nil {
				return fmt.Errorf("route %+v: %w", r, err)
			}
		}
		return nil
	})
	if tap != nil {
		t.Cleanup(func() { tap.Close() })
	}
	if err != nil {
		t.Fatal(err)
	}
	return path, tap
}

// wire copies frames between two taps both ways until the test ends.
func wire(t *testing.T, a, b *os.File) {
	t.Helper()
	done := make(chan struct{})
	copyFrames := func(from, to *os.File) {
		buf := make([]byte, 65536)
		for {
			from.SetReadDeadline(time.Now().Add(100 * time.Millisecond))
			n, err := from.Read(buf)
			select {
			case <-done:
				return
			default:
			}
			if errors.Is(err, os.ErrDeadlineExceeded) {
				continue
			}
			if err != nil {
				t.Errorf("read a frame: %v", err)
				return
			}
			to.Write(buf[:n]) // a dropped frame is the network's right
		}
	}
	stopped := make(chan struct{}, 2)
	go func() { copyFrames(a, b); stopped <- struct{}{} }()
	go func() { copyFrames(b, a); stopped <- struct{}{} }()
	t.Cleanup(func() { close(done); <-stopped; <-stopped })
}
