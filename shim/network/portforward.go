package network

import (
	"context"
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
// (on the tap, /32; the guest gets an on-link route to it). Link-local, so it collides
// with no pod or service network.
const LocalAddress = "169.254.255.1"

// Port-forwarding. containerd's CRI implements PortForward by dialing localhost:PORT
// inside the pod's network namespace on the host, where no pod process listens: they run
// in the guest. enableLocalForward makes such connections reach the guest:
//
//   - the veth gives up its addresses (the guest has them; the namespace's own stack must
//     not think the pod IP is local), and the tap gets LocalAddress/32 and a route to the
//     pod IP;
//   - iptables in the namespace rewrites TCP to 127.0.0.1 into TCP to the pod IP (DNAT in
//     OUTPUT; route_localnet lets a 127.0.0.1 source leave the tap) from LocalAddress
//     (SNAT in POSTROUTING);
//   - on the tap's ingress, before the redirect to the veth, frames addressed to the tap's
//     own MAC go to the namespace's stack (the guest's replies), and ARP is both mirrored
//     to the veth and seen by the stack (so the guest resolves LocalAddress).
func enableLocalForward(h *netlink.Handle, veth, tap netlink.Link, podIP net.IP) error {
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
	local, _ := netlink.ParseAddr(LocalAddress + "/32")
	if err := h.AddrAdd(tap, local); err != nil {
		return fmt.Errorf("address %s on the tap: %w", LocalAddress, err)
	}
	if err := h.RouteReplace(&netlink.Route{LinkIndex: tap.Attrs().Index, Dst: &net.IPNet{IP: podIP, Mask: net.CIDRMask(32, 32)}, Scope: netlink.SCOPE_LINK}); err != nil {
		return fmt.Errorf("route to %s on the tap: %w", podIP, err)
	}
	for _, name := range []string{"all", tap.Attrs().Name} {
		// /proc/sys/net shows the namespace of the thread that opens it.
		if err := os.WriteFile("/proc/sys/net/ipv4/conf/"+name+"/route_localnet", []byte("1"), 0o644); err != nil {
			return fmt.Errorf("route_localnet: %w", err)
		}
	}
	// Ahead of the tap's match-all redirect (priority 3, see connect): the guest's frames
	// to the tap's own MAC go to the stack (priority 1); ARP is copied to the veth and
	// also goes to the stack (priority 2).
	tl := tap.Attrs()
	// u32 matches 32-bit words at offsets from the network header: the destination MAC
	// is the 6 bytes at -14, i.e. the low half of the word at -16 and the word at -12.
	mac := tl.HardwareAddr
	toStack := &netlink.U32{
		FilterAttrs: netlink.FilterAttrs{LinkIndex: tl.Index, Parent: ingressHandle, Priority: 1, Protocol: unix.ETH_P_ALL},
		Sel: &netlink.TcU32Sel{Flags: nl.TC_U32_TERMINAL, Keys: []netlink.TcU32Key{
			{Mask: 0x0000ffff, Val: uint32(mac[0])<<8 | uint32(mac[1]), Off: -16},
			{Mask: 0xffffffff, Val: uint32(mac[2])<<24 | uint32(mac[3])<<16 | uint32(mac[4])<<8 | uint32(mac[5]), Off: -12},
		}},
		// A match without actions is "classified": the frame goes on to the stack (the
		// gact "ok" action would say the same, but kernels without act_gact lack it).
		ClassId: netlink.MakeHandle(1, 1),
	}
	if err := h.FilterAdd(toStack); err != nil {
		return fmt.Errorf("tap filter for its own MAC: %w", err)
	}
	arp := &netlink.U32{
		FilterAttrs: netlink.FilterAttrs{LinkIndex: tl.Index, Parent: ingressHandle, Priority: 2, Protocol: unix.ETH_P_ARP},
		// Mirror (pipe): a copy leaves through the veth, the frame goes on to the stack.
		Actions: []netlink.Action{
			&netlink.MirredAction{ActionAttrs: netlink.ActionAttrs{Action: netlink.TC_ACT_PIPE}, MirredAction: netlink.TCA_EGRESS_MIRROR, Ifindex: veth.Attrs().Index},
		},
	}
	if err := h.FilterAdd(arp); err != nil {
		return fmt.Errorf("tap filter for ARP: %w", err)
	}
	return nil
}

// natLocalhost makes the namespace's TCP connections to 127.0.0.1 go to the pod IP from
// LocalAddress.
func natLocalhost(ctx context.Context, path string, podIP net.IP, tap string) error {
	if err := iptables(ctx, path, "-t", "nat", "-A", "OUTPUT", "-d", "127.0.0.1/32", "-p", "tcp", "-j", "DNAT", "--to-destination", podIP.String()); err != nil {
		return err
	}
	return iptables(ctx, path, "-t", "nat", "-A", "POSTROUTING", "-o", tap, "-s", "127.0.0.1/32", "-j", "SNAT", "--to-source", LocalAddress)
}

// iptables runs iptables in the namespace at path.
func iptables(ctx context.Context, path string, args ...string) error {
	cmd := exec.CommandContext(ctx, "nsenter", append([]string{"--net=" + path, "iptables", "-w"}, args...)...)
	out, err := cmd.CombinedOutput()
	if err != nil {
		return fmt.Errorf("iptables %s: %w: %s", strings.Join(args, " "), err, out)
	}
	return nil
}
