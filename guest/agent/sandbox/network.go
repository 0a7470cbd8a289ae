package sandbox

import (
	"context"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/containerd/errdefs"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// Interface is a NIC of the pod, found by MAC address.
type Interface struct {
	Name      string
	MAC       string
	MTU       int
	Addresses []string // CIDR
}

// Route is a route of the pod's network namespace.
type Route struct {
	Destination string // CIDR; "" for the default route
	Gateway     string
	Device      string
	Source      string
}

// setNetwork moves each interface from the agent's network namespace into the pod's
// (if it is not there already), names it, sets its MTU and exactly the given addresses
// (IPv6 ones without duplicate address detection), brings it up, and replaces the routes
// of the pod's namespace with routes (either family; netlink tells a route's family by
// its destination, gateway or source).
func setNetwork(ctx context.Context, podNetns string, ifaces []Interface, routes []Route) error {
	ns, err := netns.GetFromPath(podNetns)
	if err != nil {
		return fmt.Errorf("pod network namespace: %w", err)
	}
	defer ns.Close()
	h, err := netlink.NewHandleAt(ns, unix.NETLINK_ROUTE)
	if err != nil {
		return err
	}
	defer h.Close()
	for _, iface := range ifaces {
		if err := setInterface(ctx, h, ns, iface); err != nil {
			return fmt.Errorf("interface %s (%s): %w", iface.Name, iface.MAC, err)
		}
	}
	return setRoutes(h, routes)
}

func linkByMAC(h *netlink.Handle, mac net.HardwareAddr) (netlink.Link, error) {
	links, err := h.LinkList()
	if err != nil {
		return nil, err
	}
	for _, l := range links {
		if l.Attrs().HardwareAddr.String() == mac.String() {
			return l, nil
		}
	}
	return nil, nil
}

// nicTimeout bounds the wait for a NIC that is not there yet (hot-plugged just before).
const nicTimeout = 10 * time.Second

func setInterface(ctx context.Context, h *netlink.Handle, ns netns.NsHandle, iface Interface) error {
	mac, err := net.ParseMAC(iface.MAC)
	if err != nil {
		return fmt.Errorf("mac %q: %v: %w", iface.MAC, err, errdefs.ErrInvalidArgument)
	}
	link, err := linkByMAC(h, mac)
	if err != nil {
		return err
	}
	if link == nil {
		// Still in the agent's (the VM's root) namespace: move it into the pod's.
		root, err := netlink.NewHandle(unix.NETLINK_ROUTE)
		if err != nil {
			return err
		}
		defer root.Close()
		ctx, cancel := context.WithTimeout(ctx, nicTimeout)
		defer cancel()
		var l netlink.Link
		for {
			if l, err = linkByMAC(root, mac); err != nil || l != nil {
				break
			}
			select {
			case <-ctx.Done():
				return fmt.Errorf("no interface has MAC %s: %w", mac, errdefs.ErrNotFound)
			case <-time.After(20 * time.Millisecond):
			}
		}
		if err != nil {
			return err
		}
		if err := root.LinkSetNsFd(l, int(ns)); err != nil {
			return fmt.Errorf("move into the pod's namespace: %w", err)
		}
		if link, err = linkByMAC(h, mac); err != nil || link == nil {
			return fmt.Errorf("interface vanished after moving it: %v: %w", err, errdefs.ErrNotFound)
		}
	}
	if iface.Name != "" && link.Attrs().Name != iface.Name {
		if err := h.LinkSetDown(link); err != nil {
			return err
		}
		if err := h.LinkSetName(link, iface.Name); err != nil {
			return fmt.Errorf("rename: %w", err)
		}
	}
	if iface.MTU > 0 && link.Attrs().MTU != iface.MTU {
		if err := h.LinkSetMTU(link, iface.MTU); err != nil {
			return fmt.Errorf("mtu %d: %w", iface.MTU, err)
		}
	}
	want := map[string]*netlink.Addr{}
	for _, a := range iface.Addresses {
		addr, err := netlink.ParseAddr(a)
		if err != nil {
			return fmt.Errorf("address %q: %v: %w", a, err, errdefs.ErrInvalidArgument)
		}
		if addr.IP.To4() == nil {
			// CNI gave the address to the veth after duplicate address detection, and the
			// guest NIC stands in for the veth: detecting again would leave the address
			// tentative (unusable as a source, deaf to neighbour solicitations) for a
			// second or more after the pod starts.
			addr.Flags |= unix.IFA_F_NODAD
		}
		want[addr.IPNet.String()] = addr
	}
	have, err := h.AddrList(link, netlink.FAMILY_ALL)
	if err != nil {
		return err
	}
	for _, a := range have {
		if a.IP.IsLinkLocalUnicast() {
			continue
		}
		if _, ok := want[a.IPNet.String()]; !ok {
			if err := h.AddrDel(link, &a); err != nil {
				return fmt.Errorf("remove address %s: %w", a.IPNet, err)
			}
		}
	}
	for _, a := range want {
		if err := h.AddrReplace(link, a); err != nil {
			return fmt.Errorf("address %s: %w", a.IPNet, err)
		}
	}
	if err := h.LinkSetUp(link); err != nil {
		return fmt.Errorf("bring up: %w", err)
	}
	return nil
}

func setRoutes(h *netlink.Handle, routes []Route) error {
	var want []netlink.Route
	for _, r := range routes {
		nr := netlink.Route{}
		if r.Destination != "" {
			_, dst, err := net.ParseCIDR(r.Destination)
			if err != nil {
				return fmt.Errorf("route destination %q: %v: %w", r.Destination, err, errdefs.ErrInvalidArgument)
			}
			nr.Dst = dst
		}
		if r.Gateway != "" {
			if nr.Gw = net.ParseIP(r.Gateway); nr.Gw == nil {
				return fmt.Errorf("route gateway %q: %w", r.Gateway, errdefs.ErrInvalidArgument)
			}
		}
		if r.Source != "" {
			if nr.Src = net.ParseIP(r.Source); nr.Src == nil {
				return fmt.Errorf("route source %q: %w", r.Source, errdefs.ErrInvalidArgument)
			}
		}
		if r.Device != "" {
			l, err := h.LinkByName(r.Device)
			if err != nil {
				return fmt.Errorf("route device %q: %v: %w", r.Device, err, errdefs.ErrNotFound)
			}
			nr.LinkIndex = l.Attrs().Index
		}
		if nr.Dst == nil && nr.Gw == nil && nr.LinkIndex == 0 {
			return fmt.Errorf("route has no destination, gateway or device: %w", errdefs.ErrInvalidArgument)
		}
		if nr.Dst == nil && nr.Gw != nil && nr.Gw.To4() == nil {
			nr.Family = netlink.FAMILY_V6
		}
		want = append(want, nr)
	}
	// Remove the routes someone set before (not the kernel's own, for local subnets).
	have, err := h.RouteList(nil, netlink.FAMILY_ALL)
	if err != nil {
		return err
	}
	for _, r := range have {
		if r.Protocol == unix.RTPROT_KERNEL || r.Table != unix.RT_TABLE_MAIN {
			continue
		}
		if r.Dst != nil && r.Dst.IP.IsLinkLocalUnicast() || r.Dst != nil && r.Dst.IP.IsMulticast() {
			continue
		}
		if err := h.RouteDel(&r); err != nil {
			return fmt.Errorf("remove route %s: %w", r, err)
		}
	}
	for i := range want {
		if err := h.RouteReplace(&want[i]); err != nil {
			return fmt.Errorf("route %s: %w", want[i], err)
		}
	}
	return nil
}

// setSysctls writes network-namespace sysctls (net.*) in the pod's network namespace.
func setSysctls(podNetns string, sysctls map[string]string) error {
	if len(sysctls) == 0 {
		return nil
	}
	return inNetns(podNetns, func() error {
		for k, v := range sysctls {
			if !strings.HasPrefix(k, "net.") {
				return fmt.Errorf("pod sysctl %q is not a network namespace one: %w", k, errdefs.ErrInvalidArgument)
			}
			p := filepath.Join("/proc/sys", strings.ReplaceAll(k, ".", "/"))
			if err := os.WriteFile(p, []byte(v), 0); err != nil {
				return fmt.Errorf("sysctl %s=%s: %w", k, v, err)
			}
		}
		return nil
	})
}
