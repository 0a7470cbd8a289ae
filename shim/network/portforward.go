package network

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"strings"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netlink/nl"
	"golang.org/x/sys/unix"
)

// LocalAddress is the address the pod's host network namespace uses to reach the guest
// over IPv4 (on the tap, /32; the guest gets an on-link route to it). Link-local, so it
// collides with no pod or service network.
const LocalAddress = "169.254.255.1"

// LocalAddress6 is LocalAddress's IPv6 twin (on the tap, /128). Link-local, so the guest
// needs no route to it, and its interface identifier has no ff:fe in the middle, so it is
// no interface's EUI-64 address.
const LocalAddress6 = "fe80::ca15:50:1"

// loopbackTable is the routing table, in the pod's host network namespace, that holds
// the local route to ::1 on the tap, and the rule that sends what arrives on the tap to
// it (see enableLocalForward).
const loopbackTable = 0xca15

// Port-forwarding. containerd's CRI implements PortForward by dialing localhost:PORT
// inside the pod's network namespace on the host (127.0.0.1 first, then ::1), where no
// pod process listens: they run in the guest. enableLocalForward makes such connections
// reach the guest, for each family the pod has an address of:
//
//   - the veth gives up its addresses (the guest has them; the namespace's own stack must
//     not think the pod IPs are local), and the tap gets LocalAddress/32 and
//     LocalAddress6/128 and a route to each pod IP;
//   - iptables and ip6tables in the namespace rewrite TCP to 127.0.0.1 and ::1 into TCP
//     to the pod IP (DNAT in OUTPUT) from the local address (SNAT in POSTROUTING);
//   - IPv4: route_localnet lets a 127.0.0.1 source leave the tap. IPv6 sends a ::1
//     source out as it is, but on the way back the guest's reply, un-NATed in
//     PREROUTING, is addressed to ::1 and arrives on the tap, and the kernel looks
//     loopback destinations up strictly (only a route on the receiving device matches:
//     rt6_need_strict), so it would answer "unreachable". A rule sends what arrives on the
//     tap to loopbackTable, which has a local route to ::1 on the tap;
//   - on the tap's ingress, before the redirect to the veth, frames addressed to the tap's
//     own MAC go to the namespace's stack (the guest's replies), and ARP and IPv6
//     neighbour discovery are both mirrored to the veth and seen by the stack (so the
//     guest resolves the local addresses, and the stack the pod IPs).
func enableLocalForward(h *netlink.Handle, veth, tap netlink.Link, ip4, ip6 net.IP) error {
	addrs, err := h.AddrList(veth, netlink.FAMILY_ALL)
	if err != nil {
		return err
	}
	for _, a := range addrs {
		if a.IP.IsLinkLocalUnicast() {
			continue
		}
		if err := h.AddrDel(veth, &a); err != nil {
			return fmt.Errorf("move %s off %s: %w", a.IPNet, veth.Attrs().Name, err)
		}
	}
	tl := tap.Attrs()
	// Ahead of the tap's match-all redirect (see connect): the guest's frames to the tap's
	// own MAC go to the stack; ARP and neighbour discovery are copied to the veth and also
	// go to the stack.
	if err := toStack(h, tl); err != nil {
		return err
	}
	if ip4 != nil {
		if err := forward4(h, veth, tap, ip4); err != nil {
			return err
		}
	}
	if ip6 != nil {
		if err := forward6(h, veth, tap, ip6); err != nil {
			return err
		}
	}
	return nil
}

// forward4 is enableLocalForward's IPv4 half.
func forward4(h *netlink.Handle, veth, tap netlink.Link, podIP net.IP) error {
	local, _ := netlink.ParseAddr(LocalAddress + "/32")
	if err := h.AddrAdd(tap, local); err != nil {
		return fmt.Errorf("address %s on the tap: %w", LocalAddress, err)
	}
	if err := h.RouteReplace(&netlink.Route{LinkIndex: tap.Attrs().Index, Dst: hostNet(podIP), Scope: netlink.SCOPE_LINK}); err != nil {
		return fmt.Errorf("route to %s on the tap: %w", podIP, err)
	}
	for _, name := range []string{"all", tap.Attrs().Name} {
		// /proc/sys/net shows the namespace of the thread that opens it.
		if err := os.WriteFile("/proc/sys/net/ipv4/conf/"+name+"/route_localnet", []byte("1"), 0o644); err != nil {
			return fmt.Errorf("route_localnet: %w", err)
		}
	}
	arp := &netlink.U32{
		FilterAttrs: netlink.FilterAttrs{LinkIndex: tap.Attrs().Index, Parent: ingressHandle, Priority: prioARP, Protocol: unix.ETH_P_ARP},
		Actions:     []netlink.Action{mirrorTo(veth)},
	}
	if err := h.FilterAdd(arp); err != nil {
		return fmt.Errorf("tap filter for ARP: %w", err)
	}
	return nil
}

// forward6 is enableLocalForward's IPv6 half.
func forward6(h *netlink.Handle, veth, tap netlink.Link, podIP net.IP) error {
	tl := tap.Attrs()
	// No duplicate address detection: while tentative the address would not answer
	// neighbour solicitations, and nobody else can have it (only this tap's guest sees it).
	local := &netlink.Addr{IPNet: hostNet(net.ParseIP(LocalAddress6)), Flags: unix.IFA_F_NODAD}
	if err := h.AddrAdd(tap, local); err != nil {
		return fmt.Errorf("address %s on the tap: %w", LocalAddress6, err)
	}
	if err := h.RouteReplace(&netlink.Route{LinkIndex: tl.Index, Dst: hostNet(podIP)}); err != nil {
		return fmt.Errorf("route to %s on the tap: %w", podIP, err)
	}
	lo := &netlink.Route{LinkIndex: tl.Index, Dst: hostNet(net.IPv6loopback), Type: unix.RTN_LOCAL, Table: loopbackTable}
	if err := h.RouteReplace(lo); err != nil {
		return fmt.Errorf("local route to ::1 on the tap: %w", err)
	}
	rule := netlink.NewRule()
	rule.Family = netlink.FAMILY_V6
	rule.IifName = tl.Name
	rule.Table = loopbackTable
	if err := h.RuleAdd(rule); err != nil && !errors.Is(err, unix.EEXIST) {
		return fmt.Errorf("rule iif %s lookup %d: %w", tl.Name, loopbackTable, err)
	}
	// Neighbour discovery is the ICMPv6 with hop limit 255 (RFC 4861: solicitations,
	// advertisements, router messages and redirects, and nothing else): the byte at 6 of
	// the IPv6 header is the next header (58), the byte at 7 the hop limit.
	nd := &netlink.U32{
		FilterAttrs: netlink.FilterAttrs{LinkIndex: tl.Index, Parent: ingressHandle, Priority: prioND, Protocol: unix.ETH_P_IPV6},
		Sel: &netlink.TcU32Sel{Flags: nl.TC_U32_TERMINAL, Keys: []netlink.TcU32Key{
			{Mask: 0x0000ffff, Val: unix.IPPROTO_ICMPV6<<8 | 255, Off: 4},
		}},
		Actions: []netlink.Action{mirrorTo(veth)},
	}
	if err := h.FilterAdd(nd); err != nil {
		return fmt.Errorf("tap filter for neighbour discovery: %w", err)
	}
	return nil
}

// toStack lets the frames the guest sends to the tap's own MAC reach the namespace's
// stack instead of the veth.
func toStack(h *netlink.Handle, tl *netlink.LinkAttrs) error {
	// u32 matches 32-bit words at offsets from the network header: the destination MAC
	// is the 6 bytes at -14, i.e. the low half of the word at -16 and the word at -12.
	mac := tl.HardwareAddr
	f := &netlink.U32{
		FilterAttrs: netlink.FilterAttrs{LinkIndex: tl.Index, Parent: ingressHandle, Priority: prioToStack, Protocol: unix.ETH_P_ALL},
		Sel: &netlink.TcU32Sel{Flags: nl.TC_U32_TERMINAL, Keys: []netlink.TcU32Key{
			{Mask: 0x0000ffff, Val: uint32(mac[0])<<8 | uint32(mac[1]), Off: -16},
			{Mask: 0xffffffff, Val: uint32(mac[2])<<24 | uint32(mac[3])<<16 | uint32(mac[4])<<8 | uint32(mac[5]), Off: -12},
		}},
		// A match without actions is "classified": the frame goes on to the stack (the
		// gact "ok" action would say the same, but kernels without act_gact lack it).
		ClassId: netlink.MakeHandle(1, 1),
	}
	if err := h.FilterAdd(f); err != nil {
		return fmt.Errorf("tap filter for its own MAC: %w", err)
	}
	return nil
}

// mirrorTo copies a frame out through l; the frame itself goes on to the stack (pipe).
func mirrorTo(l netlink.Link) netlink.Action {
	return &netlink.MirredAction{ActionAttrs: netlink.ActionAttrs{Action: netlink.TC_ACT_PIPE}, MirredAction: netlink.TCA_EGRESS_MIRROR, Ifindex: l.Attrs().Index}
}

// hostNet is ip as a one-address network.
func hostNet(ip net.IP) *net.IPNet {
	if ip4 := ip.To4(); ip4 != nil {
		return &net.IPNet{IP: ip4, Mask: net.CIDRMask(32, 32)}
	}
	return &net.IPNet{IP: ip, Mask: net.CIDRMask(128, 128)}
}

// natLocalhost makes the namespace's TCP connections to localhost (127.0.0.1 for ip4,
// ::1 for ip6) go to the pod IP of the same family from the local address. A nil IP
// leaves its family alone.
func natLocalhost(ctx context.Context, path, tap string, ip4, ip6 net.IP) error {
	for _, r := range natRules(tap, ip4, ip6) {
		if err := r.run(ctx, path); err != nil {
			return err
		}
	}
	return nil
}

// natRule is one iptables (or ip6tables) command line.
type natRule struct {
	cmd  string
	args []string
}

// natRules are the commands natLocalhost runs.
func natRules(tap string, ip4, ip6 net.IP) []natRule {
	var rules []natRule
	add := func(cmd, loopback string, podIP net.IP, local string) {
		rules = append(rules,
			natRule{cmd, []string{"-t", "nat", "-A", "OUTPUT", "-d", loopback, "-p", "tcp", "-j", "DNAT", "--to-destination", podIP.String()}},
			natRule{cmd, []string{"-t", "nat", "-A", "POSTROUTING", "-o", tap, "-s", loopback, "-j", "SNAT", "--to-source", local}})
	}
	if ip4 != nil {
		add("iptables", "127.0.0.1/32", ip4, LocalAddress)
	}
	if ip6 != nil {
		add("ip6tables", "::1/128", ip6, LocalAddress6)
	}
	return rules
}

// run runs the rule's command in the namespace at path.
func (r natRule) run(ctx context.Context, path string) error {
	cmd := exec.CommandContext(ctx, "nsenter", append([]string{"--net=" + path, r.cmd, "-w"}, r.args...)...)
	out, err := cmd.CombinedOutput()
	if err != nil {
		return fmt.Errorf("%s %s: %w: %s", r.cmd, strings.Join(r.args, " "), err, out)
	}
	return nil
}
