package integration

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"testing"
	"time"

	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/portforward"
	"k8s.io/client-go/transport/spdy"
	runtime "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/caisson-containers/caisson/integration-tests/harness"
)

// tcpServer is a container command serving one line per connection on port (-ll: nc
// keeps listening, and forks echo for each connection).
func tcpServer(port int, line string) []string {
	return []string{"nc", "-ll", "-p", strconv.Itoa(port), "-e", "echo", line}
}

// dialLine connects to addr and returns the first line it sends.
func dialLine(addr string) (string, error) { return dialLineFrom(nil, addr) }

// dialLineFrom is dialLine from the local address from (nil: the kernel chooses).
func dialLineFrom(from net.IP, addr string) (string, error) {
	d := net.Dialer{Timeout: 5 * time.Second}
	if from != nil {
		d.LocalAddr = &net.TCPAddr{IP: from}
	}
	var last error
	// The server loop may be between two nc processes; a few attempts.
	for range 50 {
		conn, err := d.Dial("tcp", addr)
		if err != nil {
			last = err
			time.Sleep(200 * time.Millisecond)
			continue
		}
		conn.SetDeadline(time.Now().Add(30 * time.Second))
		b, err := io.ReadAll(conn)
		conn.Close()
		if err != nil {
			return "", err
		}
		if len(b) == 0 {
			last = fmt.Errorf("connection to %s closed without data", addr)
			time.Sleep(200 * time.Millisecond)
			continue
		}
		return strings.TrimSpace(string(b)), nil
	}
	return "", last
}

// TestCRIPodNetworking: two pods on the CNI bridge, each in its own VM. The guest NIC has
// the veth's MAC, address and routes; a TCP server in a pod is reachable from the host at
// the pod IP and from the other pod; a pod reaches a server on the bridge's host address.
// After removal no veth, namespace or VM is left.
func TestCRIPodNetworking(t *testing.T) {
	c := harness.StartCRI(t, harness.Options{})
	image := c.Pull(t, c.BusyboxRef, harness.Handler)

	aCfg := c.PodConfig("net-a", nil)
	a := c.RunPod(t, aCfg, harness.Handler)
	bCfg := c.PodConfig("net-b", nil)
	b := c.RunPod(t, bCfg, harness.Handler)
	aIP, bIP := c.PodIP(t, a), c.PodIP(t, b)
	if aIP == bIP || !c.CNI.Subnet.Contains(net.ParseIP(aIP)) {
		t.Fatalf("pod IPs %s and %s, want two addresses in %s", aIP, bIP, c.CNI.Subnet)
	}
	srv := c.StartContainer(t, a, aCfg, harness.ContainerConfig("server", image, tcpServer(8080, "pong-from-a")...))
	cli := c.StartContainer(t, b, bCfg, harness.ContainerConfig("client", image, "sleep", "100000"))

	// The guest NIC: the pod IP on eth0, and the default route through the bridge.
	out, _, _ := c.Exec(t, srv, "busybox", "ip", "-4", "addr", "show", "eth0")
	if !strings.Contains(out, " "+aIP+"/") {
		t.Fatalf("eth0 in pod a's guest has no %s:\n%s", aIP, out)
	}
	out, _, _ = c.Exec(t, srv, "busybox", "ip", "route")
	if !strings.Contains(out, "default via "+c.CNI.Gateway.String()+" dev eth0") {
		t.Fatalf("routes in pod a's guest lack the default via %s:\n%s", c.CNI.Gateway, out)
	}

	// Host to pod.
	got, err := dialLine(net.JoinHostPort(aIP, "8080"))
	if err != nil || got != "pong-from-a" {
		t.Fatalf("host to pod a: %q, %v; want pong-from-a", got, err)
	}

	// Pod to pod.
	out, errOut, code := c.Exec(t, cli, "sh", "-c", fmt.Sprintf("for i in 1 2 3 4 5; do nc %s 8080 </dev/null && exit 0; sleep 1; done; exit 1", aIP))
	if code != 0 || strings.TrimSpace(out) != "pong-from-a" {
		t.Fatalf("pod b to pod a: exit %d, %q, %s", code, out, errOut)
	}

	// Pod to the bridge's host address.
	l, err := net.Listen("tcp", net.JoinHostPort(c.CNI.Gateway.String(), "0"))
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	got2 := make(chan string, 1)
	go func() {
		conn, err := l.Accept()
		if err != nil {
			got2 <- err.Error()
			return
		}
		defer conn.Close()
		conn.SetDeadline(time.Now().Add(30 * time.Second))
		line, _ := bufio.NewReader(conn).ReadString('\n')
		got2 <- strings.TrimSpace(line)
	}()
	_, errOut, code = c.Exec(t, cli, "sh", "-c", fmt.Sprintf("echo hello-from-b | nc %s", strings.ReplaceAll(l.Addr().String(), ":", " ")))
	if code != 0 {
		t.Fatalf("pod b to the host at %s: exit %d: %s", l.Addr(), code, errOut)
	}
	select {
	case g := <-got2:
		if g != "hello-from-b" {
			t.Fatalf("the host got %q from pod b, want hello-from-b", g)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("the host got nothing from pod b")
	}

	c.RemovePod(t, a)
	c.RemovePod(t, b)
	if left := c.Leftovers(); len(left) > 0 {
		t.Fatalf("after RemovePodSandbox:\n  %s", strings.Join(left, "\n  "))
	}
	if _, err := net.DialTimeout("tcp", net.JoinHostPort(aIP, "8080"), 2*time.Second); err == nil {
		t.Fatal("pod a's server still answers after its removal")
	}
}

// TestCRIPortForward: the kubelet's PortForward (kubectl port-forward) reaches a TCP
// server in the pod's guest: containerd dials localhost in the pod's network namespace,
// which the shim routes to the guest.
func TestCRIPortForward(t *testing.T) {
	c := harness.StartCRI(t, harness.Options{})
	image := c.Pull(t, c.BusyboxRef, harness.Handler)
	podCfg := c.PodConfig("portforward", nil)
	pod := c.RunPod(t, podCfg, harness.Handler)
	c.StartContainer(t, pod, podCfg, harness.ContainerConfig("server", image, tcpServer(8080, "pong-forwarded")...))
	// The server listens once the host reaches it at the pod IP.
	if got, err := dialLine(net.JoinHostPort(c.PodIP(t, pod), "8080")); err != nil || got != "pong-forwarded" {
		t.Fatalf("host to pod: %q, %v", got, err)
	}
	if got := portForwardLine(t, c, pod, 8080); got != "pong-forwarded" {
		t.Fatalf("through port-forward: %q; want pong-forwarded", got)
	}
	c.RemovePod(t, pod)
	if left := c.Leftovers(); len(left) > 0 {
		t.Fatalf("after RemovePodSandbox:\n  %s", strings.Join(left, "\n  "))
	}
}

// portForwardLine forwards a local port to the pod's port through the CRI's PortForward,
// with client-go's SPDY port-forwarder as kubectl does, and returns the first line a
// connection to it reads.
func portForwardLine(t *testing.T, c *harness.CRI, pod string, port int32) string {
	t.Helper()
	resp, err := c.Runtime.PortForward(c.Ctx(t), &runtime.PortForwardRequest{PodSandboxId: pod, Port: []int32{port}})
	if err != nil {
		t.Fatalf("PortForward: %v", err)
	}
	u, err := url.Parse(resp.Url)
	if err != nil {
		t.Fatal(err)
	}
	rt, upgrader, err := spdy.RoundTripperFor(&rest.Config{})
	if err != nil {
		t.Fatal(err)
	}
	dialer := spdy.NewDialer(upgrader, &http.Client{Transport: rt}, "POST", u)
	stop, ready := make(chan struct{}), make(chan struct{})
	fw, err := portforward.NewOnAddresses(dialer, []string{"127.0.0.1"}, []string{fmt.Sprintf("0:%d", port)}, stop, ready, io.Discard, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- fw.ForwardPorts() }()
	defer func() { close(stop); <-done }()
	select {
	case <-ready:
	case err := <-done:
		t.Fatalf("port-forward ended: %v", err)
	}
	ports, err := fw.GetPorts()
	if err != nil || len(ports) != 1 {
		t.Fatalf("forwarded ports %v, %v", ports, err)
	}
	got, err := dialLine(fmt.Sprintf("127.0.0.1:%d", ports[0].Local))
	if err != nil {
		t.Fatalf("through port-forward to %d: %v", port, err)
	}
	return got
}
