// Package network connects a pod's network namespace, as CNI left it, to the pod's VM.
//
// CNI gives the pod a veth (usually eth0) with addresses and routes inside a network
// namespace on the host. Setup adds a tap device next to it in the same namespace and
// redirects every frame between the two with tc mirred (an ingress qdisc on each, a
// u32 match-all filter whose action is "mirred egress redirect" to the other): what the
// bridge sends to the veth reaches the tap, so QEMU and the guest; what the guest sends
// leaves through the veth. This is Kata Containers' default ("tcfilter") model. The
// guest NIC gets the veth's MAC, so neighbours on the bridge see the same station, and
// the agent gives it the veth's addresses, routes and MTU (Interfaces, Routes).
//
// For the CRI's port-forward, which dials localhost inside the namespace, the first veth's
// addresses move to the guest only, and TCP to 127.0.0.1 and ::1 is sent to the pod IP of
// the same family through the tap (portforward.go).
//
// The tap is not persistent: it lives while its file descriptor is open, which QEMU
// holds, so it vanishes with QEMU even if the shim is killed. Close removes the filters
// and qdiscs and closes the shim's descriptor.
package network

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"

	"github.com/containerd/errdefs"
	"github.com/vishvananda/netlink"
	vnetns "github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/caisson-containers/caisson/shim/netns"
)

// TapName is the tap device's name in the pod's network namespace, one per veth:
// the first veth's tap is "tap0_caisson".
const tapFormat = "tap%d_caisson"

// Interface is one pod NIC as the guest should see it.
type Interface struct {
	// Name is the veth's name in the pod namespace (the guest NIC is renamed to it).
	Name string
	MAC  net.HardwareAddr
	MTU  int
	// Addresses in CIDR notation.
	Addresses []string
	// Tap is the tap's descriptor, for the VMM (QEMU's -netdev tap,fd=N).
	Tap *os.File
	// TapName is the tap's name in the pod namespace.
	TapName string

	vethIndex, tapIndex int
	// forward4 and forward6 are the pod IPs localhost connections in the namespace are
	// sent to (127.0.0.1 and ::1); nil for a family the pod has no address of.
	forward4, forward6 net.IP
}

// forwardIPs are the first IPv4 and the first global IPv6 address of cidrs.
func forwardIPs(cidrs []string) (ip4, ip6 net.IP) {
	for _, c := range cidrs {
		ip, _, err := net.ParseCIDR(c)
		if err != nil || ip.IsLinkLocalUnicast() || ip.IsLoopback() || ip.IsMulticast() || ip.IsUnspecified() {
			continue
		}
		if v4 := ip.To4(); v4 != nil {
			if ip4 == nil {
				ip4 = v4
			}
		} else if ip6 == nil {
			ip6 = ip
		}
	}
	return ip4, ip6
}

// Route is a route of the pod namespace, for the guest.
type Route struct {
	Destination string // CIDR, "" for the default route
	Gateway     string
	Device      string
	Source      string
}

// Network is a pod namespace connected to taps.
type Network struct {
	NetNS      string
	Interfaces []Interface
	Routes     []Route
}

// Setup connects every veth of the network namespace at path to a new tap. On error
// nothing it created remains. A namespace without a veth yields a Network without
// interfaces (the guest then has loopback only).
func Setup(path string) (_ *Network, retErr error) {
	n := &Network{NetNS: path}
	defer func() {
		if retErr != nil {
			n.Close()
		}
	}()
	err := inNetNS(path, func(h *netlink.Handle) error {
		links, err := h.LinkList()
		if err != nil {
			return fmt.Errorf("list links: %w", err)
		}
		for _, l := range links {
			if l.Type() != "veth" {
				continue
			}
			// Routes first: connect moves the addresses off the veth, and routes with them.
			routes, err := h.RouteList(l, netlink.FAMILY_ALL)
			if err != nil {
				return fmt.Errorf("routes of %s: %w", l.Attrs().Name, err)
			}
			for _, r := range routes {
				if r.Protocol == unix.RTPROT_KERNEL || r.Table != unix.RT_TABLE_MAIN {
					continue // the guest's kernel adds its own for the addresses
				}
				if r.Dst != nil && (r.Dst.IP.IsLinkLocalUnicast() || r.Dst.IP.IsMulticast()) {
					continue
				}
				gr := Route{Device: l.Attrs().Name}
				if r.Dst != nil {
					if ones, _ := r.Dst.Mask.Size(); ones > 0 || !r.Dst.IP.IsUnspecified() {
						gr.Destination = r.Dst.String() // else the default route ("")
					}
				}
				if r.Gw != nil {
					gr.Gateway = r.Gw.String()
				}
				if r.Src != nil {
					gr.Source = r.Src.String()
				}
				n.Routes = append(n.Routes, gr)
			}
			iface, err := connect(h, l, len(n.Interfaces))
			if err != nil {
				return fmt.Errorf("connect %s to a tap: %w", l.Attrs().Name, err)
			}
			n.Interfaces = append(n.Interfaces, iface)
			if iface.forward4 != nil {
				n.Routes = append(n.Routes, Route{Destination: LocalAddress + "/32", Device: iface.Name})
			}
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	for _, i := range n.Interfaces {
		if i.forward4 != nil || i.forward6 != nil {
			if err := natLocalhost(context.Background(), path, i.TapName, i.forward4, i.forward6); err != nil {
				return nil, fmt.Errorf("port-forward path: %w", err)
			}
		}
	}
	return n, nil
}

// Veths are the names of the veths in the network namespace at path: the links Setup
// connects to taps.
func Veths(path string) ([]string, error) {
	var names []string
	err := inNetNS(path, func(h *netlink.Handle) error {
		links, err := h.LinkList()
		if err != nil {
			return fmt.Errorf("list links: %w", err)
		}
		for _, l := range links {
			if l.Type() == "veth" {
				names = append(names, l.Attrs().Name)
			}
		}
		return nil
	})
	return names, err
}

// connect creates the idx-th tap beside veth l and redirects each to the other.
func connect(h *netlink.Handle, l netlink.Link, idx int) (_ Interface, retErr error) {
	a := l.Attrs()
	iface := Interface{Name: a.Name, MAC: a.HardwareAddr, MTU: a.MTU, vethIndex: a.Index}
	addrs, err := h.AddrList(l, netlink.FAMILY_ALL)
	if err != nil {
		return iface, fmt.Errorf("addresses: %w", err)
	}
	for _, ad := range addrs {
		if ad.IP.IsLinkLocalUnicast() {
			continue
		}
		iface.Addresses = append(iface.Addresses, ad.IPNet.String())
	}
	tap := &netlink.Tuntap{
		LinkAttrs:  netlink.LinkAttrs{Name: fmt.Sprintf(tapFormat, idx), MTU: a.MTU},
		Mode:       netlink.TUNTAP_MODE_TAP,
		Flags:      netlink.TUNTAP_NO_PI,
		Queues:     1,
		NonPersist: true,
	}
	// /dev/net/tun creates the device in the namespace of the thread that opens it,
	// which inNetNS has set.
	if err := h.LinkAdd(tap); err != nil {
		return iface, fmt.Errorf("create tap: %w", err)
	}
	iface.Tap, iface.TapName = tap.Fds[0], tap.Name
	for _, f := range tap.Fds[1:] {
		f.Close()
	}
	defer func() {
		if retErr != nil {
			iface.Tap.Close() // a non-persistent tap goes with its last descriptor
		}
	}()
	tl, err := h.LinkByName(tap.Name)
	if err != nil {
		return iface, err
	}
	iface.tapIndex = tl.Attrs().Index
	if err := h.LinkSetMTU(tl, a.MTU); err != nil {
		return iface, fmt.Errorf("tap mtu: %w", err)
	}
	if err := h.LinkSetUp(tl); err != nil {
		return iface, fmt.Errorf("bring tap up: %w", err)
	}
	if err := redirect(h, a.Index, iface.tapIndex); err != nil {
		return iface, fmt.Errorf("redirect %s to %s: %w", a.Name, tap.Name, err)
	}
	if err := redirect(h, iface.tapIndex, a.Index); err != nil {
		unredirect(h, a.Index)
		return iface, fmt.Errorf("redirect %s to %s: %w", tap.Name, a.Name, err)
	}
	if idx == 0 {
		if ip4, ip6 := forwardIPs(iface.Addresses); ip4 != nil || ip6 != nil {
			if err := enableLocalForward(h, l, tl, ip4, ip6); err != nil {
				unredirect(h, a.Index)
				unredirect(h, iface.tapIndex)
				return iface, fmt.Errorf("port-forward path: %w", err)
			}
			iface.forward4, iface.forward6 = ip4, ip6
		}
	}
	return iface, nil
}

var ingressHandle = netlink.MakeHandle(0xffff, 0)

// Priorities of the ingress filters: the lowest number is tried first. The match-all
// redirect comes last; the port-forward path's exceptions on the tap come before it
// (portforward.go).
const (
	prioToStack  = 1 // the guest's frames to the tap's own MAC
	prioARP      = 2 // ARP: mirrored to the veth and seen by the stack
	prioND       = 3 // IPv6 neighbour discovery: the same
	prioRedirect = 4 // everything else: to the other device
)

// redirect sends every frame arriving at link from out through link to.
func redirect(h *netlink.Handle, from, to int) error {
	q := &netlink.Ingress{QdiscAttrs: netlink.QdiscAttrs{LinkIndex: from, Handle: ingressHandle, Parent: netlink.HANDLE_INGRESS}}
	if err := h.QdiscAdd(q); err != nil {
		return fmt.Errorf("ingress qdisc: %w", err)
	}
	f := &netlink.U32{
		FilterAttrs: netlink.FilterAttrs{LinkIndex: from, Parent: ingressHandle, Priority: prioRedirect, Protocol: unix.ETH_P_ALL},
		Actions: []netlink.Action{&netlink.MirredAction{
			ActionAttrs:  netlink.ActionAttrs{Action: netlink.TC_ACT_STOLEN},
			MirredAction: netlink.TCA_EGRESS_REDIR,
			Ifindex:      to,
		}},
	}
	if err := h.FilterAdd(f); err != nil {
		h.QdiscDel(q)
		return fmt.Errorf("mirred filter: %w", err)
	}
	return nil
}

// unredirect removes link's ingress qdisc and with it its filters.
func unredirect(h *netlink.Handle, link int) error {
	err := h.QdiscDel(&netlink.Ingress{QdiscAttrs: netlink.QdiscAttrs{LinkIndex: link, Handle: ingressHandle, Parent: netlink.HANDLE_INGRESS}})
	if errors.Is(err, unix.ENOENT) || errors.Is(err, unix.EINVAL) || errors.Is(err, unix.ENODEV) {
		return nil
	}
	return err
}

// CloseTaps closes the shim's tap descriptors, once the VMM holds its own.
func (n *Network) CloseTaps() {
	for i := range n.Interfaces {
		if n.Interfaces[i].Tap != nil {
			n.Interfaces[i].Tap.Close()
			n.Interfaces[i].Tap = nil
		}
	}
}

// Close removes the redirections and closes the shim's tap descriptors; the taps
// themselves go when the VMM, which holds the other descriptors, exits. A namespace
// that is already gone (the CRI removed it) has nothing left to clean. Safe to call twice.
func (n *Network) Close() error {
	var errs []error
	if len(n.Interfaces) > 0 {
		err := inNetNS(n.NetNS, func(h *netlink.Handle) error {
			for _, i := range n.Interfaces {
				if err := unredirect(h, i.vethIndex); err != nil {
					errs = append(errs, fmt.Errorf("%s: %w", i.Name, err))
				}
				if err := unredirect(h, i.tapIndex); err != nil {
					errs = append(errs, fmt.Errorf("%s: %w", i.TapName, err))
				}
			}
			return nil
		})
		if err != nil && !errdefs.IsNotFound(err) {
			errs = append(errs, err)
		}
	}
	n.CloseTaps()
	n.Interfaces = nil
	return errors.Join(errs...)
}

// inNetNS runs f with a netlink handle in the namespace at path, on a thread that is in
// that namespace (so that /dev/net/tun creates taps there).
func inNetNS(path string, f func(*netlink.Handle) error) error {
	return netns.Do(path, func(target vnetns.NsHandle) error {
		h, err := netlink.NewHandleAt(target)
		if err != nil {
			return err
		}
		defer h.Close()
		return f(h)
	})
}
