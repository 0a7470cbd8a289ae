package integration

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"path/filepath"
	goruntime "runtime"
	"strings"
	"testing"
	"time"

	specs "github.com/opencontainers/runtime-spec/specs-go"
	"github.com/vishvananda/netns"
	runtime "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/caisson-containers/caisson/integration-tests/harness"
)

// ipv6Net is the IPv6 range the test adds to the harness's CNI network.
type ipv6Net struct {
	Subnet  *net.IPNet
	Gateway net.IP
}

// withIPv6 returns harness options whose CNI network has an IPv6 range (random, in
// fd7a::/16) beside its IPv4 one, or instead of it (ipv4 false), with a default route of
// each family. It rewrites the conflist the harness wrote, which keeps the harness's
// bridge and leftover checks. The bridge plugin turns IPv6 forwarding on for the host
// (a gateway); the test puts the host's setting back.
func withIPv6(t *testing.T, ipv4 bool) (harness.Options, *ipv6Net) {
	t.Helper()
	v6 := &ipv6Net{}
	_, v6.Subnet, _ = net.ParseCIDR(fmt.Sprintf("fd7a:ca15:%x:%x::/64", rand.IntN(1<<16), rand.IntN(1<<16)))
	v6.Gateway = make(net.IP, net.IPv6len)
	copy(v6.Gateway, v6.Subnet.IP)
	v6.Gateway[15] = 1

	const forwarding = "/proc/sys/net/ipv6/conf/all/forwarding"
	if was, err := os.ReadFile(forwarding); err == nil {
		t.Cleanup(func() { os.WriteFile(forwarding, was, 0o644) })
	}
	o := harness.Options{ContainerdConfig: func(cfg map[string]any) {
		cni := cfg["plugins"].(map[string]any)["io.containerd.cri.v1.runtime"].(map[string]any)["cni"].(map[string]any)
		files, _ := filepath.Glob(filepath.Join(cni["conf_dir"].(string), "*.conflist"))
		if len(files) != 1 {
			t.Fatalf("CNI configurations %v, want the harness's one", files)
		}
		b, err := os.ReadFile(files[0])
		if err != nil {
			t.Fatal(err)
		}
		var conf map[string]any
		if err := json.Unmarshal(b, &conf); err != nil {
			t.Fatal(err)
		}
		ipam := conf["plugins"].([]any)[0].(map[string]any)["ipam"].(map[string]any)
		r6 := []any{map[string]any{"subnet": v6.Subnet.String(), "gateway": v6.Gateway.String()}}
		d6 := map[string]any{"dst": "::/0"}
		if ipv4 {
			ipam["ranges"] = append(ipam["ranges"].([]any), r6)
			ipam["routes"] = append(ipam["routes"].([]any), d6)
		} else {
			ipam["ranges"] = []any{r6}
			ipam["routes"] = []any{d6}
		}
		if b, err = json.MarshalIndent(conf, "", "  "); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(files[0], b, 0o644); err != nil {
			t.Fatal(err)
		}
	}}
	return o, v6
}

// podIPs are the pod's IPv4 and IPv6 addresses as the CRI reports them ("" for a family
// it has none of).
func podIPs(t *testing.T, c *harness.CRI, pod string) (ip4, ip6 string) {
	t.Helper()
	st, err := c.Runtime.PodSandboxStatus(c.Ctx(t), &runtime.PodSandboxStatusRequest{PodSandboxId: pod})
	if err != nil {
		t.Fatal(err)
	}
	nw := st.GetStatus().GetNetwork()
	all := []string{nw.GetIp()}
	for _, a := range nw.GetAdditionalIps() {
		all = append(all, a.GetIp())
	}
	for _, s := range all {
		ip := net.ParseIP(s)
		switch {
		case ip == nil:
		case ip.To4() != nil && ip4 == "":
			ip4 = s
		case ip.To4() == nil && ip6 == "":
			ip6 = s
		}
	}
	return ip4, ip6
}

// v6only is a pod whose sockets bound to [::] take IPv6 only (net.ipv6.bindv6only): a
// server there is unreachable over IPv4, so what reaches it came over IPv6.
func v6only(cfg *runtime.PodSandboxConfig) {
	cfg.Linux.Sysctls = map[string]string{"net.ipv6.bindv6only": "1"}
}

// TestCRIPodNetworkingDualStack: two dual-stack pods on a CNI bridge with an IPv4 and an
// IPv6 range. The guest NIC has both addresses (the IPv6 one not tentative) and both
// default routes; a server in pod A that takes IPv6 only answers the host at A's IPv6
// address (not at its IPv4 one), pod B over IPv6, and what containerd's PortForward
// dials in the pod's namespace (127.0.0.1 is refused, ::1 answers: the shim's IPv6
// path); a server on both families in pod B answers PortForward (over IPv4) and ::1 in
// B's namespace. After removal nothing is left.
//
// containerd resolves "localhost" with the host's /etc/hosts: where that has no
// "::1 localhost" line (this project's test machines), its PortForward never dials ::1,
// for any runtime, and the test dials ::1 in the namespace itself instead.
func TestCRIPodNetworkingDualStack(t *testing.T) {
	o, v6 := withIPv6(t, true)
	c := harness.StartCRI(t, o)
	image := c.Pull(t, c.BusyboxRef, harness.Handler)

	aCfg := c.PodConfig("net6-a", v6only)
	a := c.RunPod(t, aCfg, harness.Handler)
	bCfg := c.PodConfig("net6-b", nil)
	b := c.RunPod(t, bCfg, harness.Handler)
	a4, a6 := podIPs(t, c, a)
	_, b6 := podIPs(t, c, b)
	if !c.CNI.Subnet.Contains(net.ParseIP(a4)) || !v6.Subnet.Contains(net.ParseIP(a6)) || !v6.Subnet.Contains(net.ParseIP(b6)) || a6 == b6 {
		t.Fatalf("pod a has %q and %q, pod b %q; want addresses in %s and %s", a4, a6, b6, c.CNI.Subnet, v6.Subnet)
	}
	srv := c.StartContainer(t, a, aCfg, harness.ContainerConfig("server6", image, tcpServer(8080, "pong6-from-a")...))
	cli := c.StartContainer(t, b, bCfg, harness.ContainerConfig("client", image, "sleep", "100000"))
	c.StartContainer(t, b, bCfg, harness.ContainerConfig("server46", image, tcpServer(8081, "pong46-from-b")...))

	// The guest NIC: both addresses on eth0, both default routes through the bridge.
	out, _, _ := c.Exec(t, srv, "busybox", "ip", "addr", "show", "eth0")
	if !strings.Contains(out, " "+a4+"/") || !strings.Contains(out, " "+a6+"/64") {
		t.Fatalf("eth0 in pod a's guest lacks %s or %s:\n%s", a4, a6, out)
	}
	if strings.Contains(out, "tentative") {
		t.Errorf("pod a's IPv6 address is still tentative (duplicate address detection in the guest):\n%s", out)
	}
	out, _, _ = c.Exec(t, srv, "busybox", "ip", "-6", "route")
	if !strings.Contains(out, "default via "+v6.Gateway.String()+" dev eth0") {
		t.Fatalf("IPv6 routes in pod a's guest lack the default via %s:\n%s", v6.Gateway, out)
	}
	out, _, _ = c.Exec(t, srv, "cat", "/proc/sys/net/ipv6/bindv6only")
	if strings.TrimSpace(out) != "1" {
		t.Fatalf("net.ipv6.bindv6only in pod a's guest is %q, want 1", out)
	}

	// Host to pod over IPv6, from the bridge's IPv6 address.
	hostTo6 := net.JoinHostPort(a6, "8080")
	got, err := dialLineFrom(v6.Gateway, hostTo6)
	if err != nil || got != "pong6-from-a" {
		t.Fatalf("host to pod a at %s: %q, %v; want pong6-from-a", hostTo6, got, err)
	}
	// The server takes IPv6 only: over IPv4 it is refused.
	if conn, err := net.DialTimeout("tcp", net.JoinHostPort(a4, "8080"), 5*time.Second); err == nil {
		conn.Close()
		t.Fatalf("pod a's IPv6-only server answers at %s", a4)
	}

	// Pod to pod over IPv6.
	out, errOut, code := c.Exec(t, cli, "sh", "-c", fmt.Sprintf("for i in 1 2 3 4 5; do nc %s 8080 </dev/null && exit 0; sleep 1; done; exit 1", a6))
	if code != 0 || strings.TrimSpace(out) != "pong6-from-a" {
		t.Fatalf("pod b to pod a at [%s]:8080: exit %d, %q, %s", a6, code, out, errOut)
	}

	// Port-forward: containerd dials 127.0.0.1 in the pod's namespace, and ::1 if that
	// fails. The IPv6-only server is refused over IPv4 and answers at ::1; the other
	// answers at 127.0.0.1.
	ns := podNetNSPath(t, c, a)
	if _, err := dialLineIn(ns, "tcp4", "127.0.0.1:8080"); err == nil {
		t.Fatal("the IPv6-only server answers at 127.0.0.1 in the pod's namespace")
	}
	if got, err := dialLineIn(ns, "tcp6", "[::1]:8080"); err != nil || got != "pong6-from-a" {
		t.Fatalf("[::1]:8080 in pod a's namespace: %q, %v; want pong6-from-a", got, err)
	}
	if localhostHasIPv6(t) {
		if got := portForwardLine(t, c, a, 8080); got != "pong6-from-a" {
			t.Fatalf("through port-forward to the IPv6-only server: %q; want pong6-from-a", got)
		}
	}
	// Pod b's server takes both families: port-forward reaches it over IPv4, and ::1 in
	// its namespace reaches it too.
	if got := portForwardLine(t, c, b, 8081); got != "pong46-from-b" {
		t.Fatalf("through port-forward to pod b's server on both families: %q; want pong46-from-b", got)
	}
	if got, err := dialLineIn(podNetNSPath(t, c, b), "tcp6", "[::1]:8081"); err != nil || got != "pong46-from-b" {
		t.Fatalf("[::1]:8081 in pod b's namespace: %q, %v; want pong46-from-b", got, err)
	}

	c.RemovePod(t, a)
	c.RemovePod(t, b)
	if left := c.Leftovers(); len(left) > 0 {
		t.Fatalf("after RemovePodSandbox:\n  %s", strings.Join(left, "\n  "))
	}
	if conn, err := net.DialTimeout("tcp", hostTo6, 2*time.Second); err == nil {
		conn.Close()
		t.Fatal("pod a's server still answers at its IPv6 address after its removal")
	}
}

// TestCRIPortForwardIPv6Only: a pod with an IPv6 address only (the CNI network has no
// IPv4 range). Its guest has the address and the default route, the host reaches it, and
// a connection to ::1 in its namespace (PortForward's) reaches a server in it.
func TestCRIPortForwardIPv6Only(t *testing.T) {
	o, v6 := withIPv6(t, false)
	c := harness.StartCRI(t, o)
	image := c.Pull(t, c.BusyboxRef, harness.Handler)
	podCfg := c.PodConfig("pf6", nil)
	pod := c.RunPod(t, podCfg, harness.Handler)
	ip4, ip6 := podIPs(t, c, pod)
	if ip4 != "" || !v6.Subnet.Contains(net.ParseIP(ip6)) {
		t.Fatalf("pod addresses %q and %q, want one in %s only", ip4, ip6, v6.Subnet)
	}
	srv := c.StartContainer(t, pod, podCfg, harness.ContainerConfig("server", image, tcpServer(8080, "pong-ipv6-only")...))
	out, _, _ := c.Exec(t, srv, "busybox", "ip", "route", "show", "default")
	if strings.TrimSpace(out) != "" {
		t.Errorf("an IPv4 default route in the guest of an IPv6-only pod: %q", out)
	}
	out, _, _ = c.Exec(t, srv, "busybox", "ip", "-6", "route", "show", "default")
	if !strings.Contains(out, "default via "+v6.Gateway.String()+" dev eth0") {
		t.Fatalf("IPv6 routes in the guest lack the default via %s:\n%s", v6.Gateway, out)
	}
	if got, err := dialLineFrom(v6.Gateway, net.JoinHostPort(ip6, "8080")); err != nil || got != "pong-ipv6-only" {
		t.Fatalf("host to pod: %q, %v", got, err)
	}
	if got, err := dialLineIn(podNetNSPath(t, c, pod), "tcp6", "[::1]:8080"); err != nil || got != "pong-ipv6-only" {
		t.Fatalf("[::1]:8080 in the pod's namespace: %q, %v; want pong-ipv6-only", got, err)
	}
	if localhostHasIPv6(t) {
		if got := portForwardLine(t, c, pod, 8080); got != "pong-ipv6-only" {
			t.Fatalf("through port-forward: %q; want pong-ipv6-only", got)
		}
	}
	c.RemovePod(t, pod)
	if left := c.Leftovers(); len(left) > 0 {
		t.Fatalf("after RemovePodSandbox:\n  %s", strings.Join(left, "\n  "))
	}
}

// podNetNSPath is the pod's network namespace on the host: the one its sandbox's spec
// joins, from the CRI's verbose status.
func podNetNSPath(t *testing.T, c *harness.CRI, pod string) string {
	t.Helper()
	st, err := c.Runtime.PodSandboxStatus(c.Ctx(t), &runtime.PodSandboxStatusRequest{PodSandboxId: pod, Verbose: true})
	if err != nil {
		t.Fatal(err)
	}
	var info struct {
		Spec *specs.Spec `json:"runtimeSpec"`
	}
	if err := json.Unmarshal([]byte(st.GetInfo()["info"]), &info); err != nil || info.Spec == nil || info.Spec.Linux == nil {
		t.Fatalf("no runtime spec in pod %s's status info (%v)", pod, err)
	}
	for _, ns := range info.Spec.Linux.Namespaces {
		if ns.Type == specs.NetworkNamespace && ns.Path != "" {
			return ns.Path
		}
	}
	t.Fatalf("pod %s's sandbox spec joins no network namespace: %+v", pod, info.Spec.Linux.Namespaces)
	return ""
}

// dialLineIn is dialLine from inside the network namespace at path, as containerd's
// PortForward dials (network "tcp4" or "tcp6").
func dialLineIn(path, network, addr string) (string, error) {
	type result struct {
		line string
		err  error
	}
	ch := make(chan result, 1)
	go func() {
		goruntime.LockOSThread() // not unlocked if leaving the namespace fails: the thread dies
		orig, err := netns.Get()
		if err != nil {
			ch <- result{err: err}
			return
		}
		defer orig.Close()
		target, err := netns.GetFromPath(path)
		if err != nil {
			ch <- result{err: err}
			return
		}
		defer target.Close()
		if err := netns.Set(target); err != nil {
			ch <- result{err: err}
			return
		}
		var r result
		d := net.Dialer{Timeout: 5 * time.Second}
		conn, err := d.Dial(network, addr)
		if err == nil {
			conn.SetDeadline(time.Now().Add(30 * time.Second))
			var b []byte
			b, err = io.ReadAll(conn)
			conn.Close()
			r.line = strings.TrimSpace(string(b))
		}
		r.err = err
		if netns.Set(orig) == nil {
			goruntime.UnlockOSThread()
		}
		ch <- r
	}()
	r := <-ch
	return r.line, r.err
}

// localhostHasIPv6 says whether "localhost" resolves to an IPv6 address on this host, so
// whether containerd's PortForward ever dials ::1.
func localhostHasIPv6(t *testing.T) bool {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	ips, err := net.DefaultResolver.LookupIP(ctx, "ip6", "localhost")
	if err != nil || len(ips) == 0 {
		t.Logf("localhost has no IPv6 address on this host (%v): containerd's PortForward dials 127.0.0.1 only, so only the ::1 dial was checked", err)
		return false
	}
	return true
}
