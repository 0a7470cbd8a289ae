package integration

import (
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	containerd "github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/pkg/cio"
	"github.com/containerd/containerd/v2/pkg/oci"
	"github.com/containerd/go-cni"
	"github.com/opencontainers/runtime-spec/specs-go"

	"github.com/caisson-containers/caisson/integration-tests/harness"
)

// TestNerdctlNetwork runs containers the way `nerdctl run` (default bridge network, -p)
// makes them, with nerdctl-shaped OCI hooks (integration-tests/nerdctlhook: nerdctl is not
// on the Go module proxy), under runc first, as the control that shows what the test
// expects is what a runtime does, then under Caisson:
//
//   - two containers each get an IPv4 eth0 on the network; one reaches the other's TCP
//     server (busybox nc), the host reaches it at its address, and a port published on 127.0.0.1
//     (`-p 127.0.0.1:PORT:80`, portmap's DNAT) reaches the first one's;
//   - their delete runs the teardown hook, and nothing of them is left: no veth on the
//     bridge (so no network namespace), no namespace holder, no iptables rule naming them
//     or their addresses, no host-local lease, no libcni cache;
//   - 20 create/remove cycles leave nothing either;
//   - a createRuntime hook after nerdctl's that fails, hangs past its timeout, or names a
//     missing binary fails the create, naming the hook, and the poststop hooks (runc's
//     destroy runs them too) leave nothing behind.
//
// Then a spec that shares the host's network namespace (`--net host`) is refused by Caisson.
func TestNerdctlNetwork(t *testing.T) {
	e := harness.Start(t, harness.Options{})
	image := e.ImportBusybox(t)
	ctx := e.Context(t)
	if err := image.Unpack(ctx, runcControl.snapshotter); err != nil {
		t.Fatalf("unpack into %s for runc: %v", runcControl.snapshotter, err)
	}
	n := newNerdctlNet(t)

	for _, rt := range []testRuntime{runcControl, caissonRuntime} {
		t.Run(rt.name, func(t *testing.T) {
			t.Run("bridge", func(t *testing.T) { testNerdctlBridge(t, e, image, n, rt) })
			t.Run("cycles", func(t *testing.T) { testNerdctlCycles(t, e, image, n, rt, 20) })
			t.Run("bad-hooks", func(t *testing.T) { testNerdctlBadHooks(t, e, image, n, rt) })
		})
	}

	t.Run("host-network-refused", func(t *testing.T) {
		c := newContainerOn(t, e, image, caissonRuntime, n.id("hostnet"), oci.WithProcessArgs("true"),
			oci.WithHostNamespace(specs.NetworkNamespace))
		_, err := c.NewTask(ctx, cio.NullIO)
		if err == nil {
			t.Fatal("a container sharing the host's network namespace was created")
		}
		if !strings.Contains(err.Error(), "cannot share the host's network namespace") {
			t.Fatalf("error %q does not say a VM cannot share the host's network namespace", err)
		}
		t.Logf("refused: %v", err)
	})
}

// testNerdctlBridge: two containers on the network, their reachability, a published port,
// and their teardown.
func testNerdctlBridge(t *testing.T, e *harness.Env, image containerd.Image, n *nerdctlNet, rt testRuntime) {
	ctx := e.Context(t)
	port := freePort(t)
	ports := []cni.PortMapping{{HostPort: int32(port), ContainerPort: 80, Protocol: "tcp", HostIP: "127.0.0.1"}}
	a := &nerdContainer{c: newContainerOn(t, e, image, rt, n.id("a-"+rt.name), oci.WithProcessArgs(tcpServer(80, "hello-from-a")...),
		n.withNetwork("bridge", ports))}
	b := &nerdContainer{c: newContainerOn(t, e, image, rt, n.id("b-"+rt.name), oci.WithProcessArgs(tcpServer(80, "hello-from-b")...),
		n.withNetwork("bridge", nil))}
	a.start(t, ctx)
	b.start(t, ctx)

	ipA, bitsA := eth0Addr(t, ctx, a)
	ipB, _ := eth0Addr(t, ctx, b)
	for _, ip := range []string{ipA, ipB} {
		if !n.subnet.Contains(parseIP(t, ip)) || bitsA != 24 {
			t.Fatalf("eth0 addresses %s/%d and %s, want addresses in %s", ipA, bitsA, ipB, n.subnet)
		}
	}
	if ipA == ipB {
		t.Fatalf("both containers have %s", ipA)
	}
	if out, _ := execIn(t, ctx, a.task, "route", false, "busybox", "ip", "-4", "route"); !strings.Contains(out, "default via "+n.gateway.String()) {
		t.Fatalf("routes in %s:\n%s\nwant the default route via the bridge %s", a.c.ID(), out, n.gateway)
	}
	t.Logf("%s: eth0 %s/%d, %s: eth0 %s", a.c.ID(), ipA, bitsA, b.c.ID(), ipB)

	// Container to container, over the bridge.
	out, code := execIn(t, ctx, a.task, "nc", false, "sh", "-c",
		fmt.Sprintf("for i in $(busybox seq 30); do nc %s 80 </dev/null && exit 0; sleep 1; done; exit 1", ipB))
	if code != 0 || strings.TrimSpace(out) != "hello-from-b" {
		t.Fatalf("%s to %s's server: exit %d, %q; want hello-from-b", a.c.ID(), b.c.ID(), code, out)
	}
	// Host to container, at its address.
	if got, err := dialLine(net.JoinHostPort(ipB, "80")); err != nil || got != "hello-from-b" {
		t.Fatalf("host to %s's server: %q, %v; want hello-from-b", b.c.ID(), got, err)
	}
	// Host to container through the port portmap published on 127.0.0.1 (its DNAT in
	// OUTPUT, route_localnet on the bridge, masquerade of the 127.0.0.1 source).
	if got, err := dialLine(fmt.Sprintf("127.0.0.1:%d", port)); err != nil || got != "hello-from-a" {
		t.Fatalf("host to 127.0.0.1:%d (published port 80 of %s): %q, %v; want hello-from-a", port, a.c.ID(), got, err)
	}

	// What the leftover check looks for is there while the containers run: it would see it
	// left behind.
	ids, addrs := []string{a.c.ID(), b.c.ID()}, []string{ipA, ipB}
	present := strings.Join(n.leftovers(e, ids, addrs), "\n")
	want := []string{"veth on the bridge", "host-local lease", "iptables-save: ", "libcni cache", "hook record"}
	if rt == caissonRuntime {
		want = append(want, "network namespace holder process")
	}
	for _, w := range want {
		if !strings.Contains(present, w) {
			t.Errorf("while the containers run, the leftover check sees no %q:\n%s", w, present)
		}
	}

	a.remove(t, ctx)
	b.remove(t, ctx)
	n.waitNoLeftovers(t, e, ids, addrs)
}

// testNerdctlCycles creates, runs and removes a networked container with a published port
// count times; each one has its address, and nothing is left after them.
func testNerdctlCycles(t *testing.T, e *harness.Env, image containerd.Image, n *nerdctlNet, rt testRuntime, count int) {
	ctx := e.Context(t)
	port := freePort(t)
	ports := []cni.PortMapping{{HostPort: int32(port), ContainerPort: 80, Protocol: "tcp", HostIP: "127.0.0.1"}}
	var ids, addrs []string
	start := time.Now()
	for i := range count {
		id := n.id(fmt.Sprintf("cycle-%s-%d", rt.name, i))
		nc := &nerdContainer{c: newContainerOn(t, e, image, rt, id, oci.WithProcessArgs("busybox", "ip", "-4", "-o", "addr", "show", "dev", "eth0"),
			n.withNetwork("bridge", ports))}
		nc.start(t, ctx)
		select {
		case st := <-nc.exit:
			if st.ExitCode() != 0 {
				t.Fatalf("cycle %d: exit %d: %s%s", i, st.ExitCode(), nc.output.stdout.String(), nc.output.stderr.String())
			}
		case <-time.After(2 * time.Minute):
			t.Fatalf("cycle %d: the container did not exit", i)
		}
		nc.task.IO().Wait()
		m := inetRE.FindStringSubmatch(nc.output.stdout.String())
		if m == nil || !n.subnet.Contains(parseIP(t, m[1])) {
			t.Fatalf("cycle %d: eth0 %q, want an address in %s", i, nc.output.stdout.String(), n.subnet)
		}
		nc.remove(t, ctx)
		ids, addrs = append(ids, id), append(addrs, m[1])
	}
	t.Logf("%d create/run/remove cycles in %s", count, time.Since(start).Round(time.Millisecond))
	n.waitNoLeftovers(t, e, ids, addrs)
}

// testNerdctlBadHooks: a createRuntime hook after nerdctl's that fails, hangs or is
// missing fails the create, and nerdctl's postStop undoes its network.
func testNerdctlBadHooks(t *testing.T, e *harness.Env, image containerd.Image, n *nerdctlNet, rt testRuntime) {
	ctx := e.Context(t)
	dir := t.TempDir()
	failing := filepath.Join(dir, "failing-hook")
	hanging := filepath.Join(dir, "hanging-hook")
	missing := filepath.Join(dir, "missing-hook")
	os.WriteFile(failing, []byte("#!/bin/sh\necho the hook failed on purpose >&2\nexit 1\n"), 0o755)
	os.WriteFile(hanging, []byte("#!/bin/sh\nexec sleep 600\n"), 0o755)
	timeout := 2
	for _, tc := range []struct {
		name string
		hook specs.Hook
		says []string // besides the hook's kind, what Caisson's error says
	}{
		{"fails", specs.Hook{Path: failing}, []string{failing, "exit status 1", "the hook failed on purpose"}},
		{"hangs", specs.Hook{Path: hanging, Timeout: &timeout}, []string{hanging, "timeout of 2s"}},
		{"missing", specs.Hook{Path: missing}, []string{missing, "no such binary"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			id := n.id("bad-" + tc.name + "-" + rt.name)
			c := newContainerOn(t, e, image, rt, id, oci.WithProcessArgs("true"), n.withNetwork("bridge", nil, tc.hook))
			start := time.Now()
			task, err := c.NewTask(ctx, cio.NullIO)
			if err == nil {
				task.Delete(ctx, containerd.WithProcessKill)
				t.Fatal("the create succeeded")
			}
			t.Logf("create failed after %s: %v", time.Since(start).Round(time.Millisecond), err)
			// runc 1.1 names the hook by its index only.
			says := []string{"hook #1"}
			if rt == caissonRuntime {
				says = append([]string{"createRuntime hook #1"}, tc.says...)
			}
			for _, s := range says {
				if !strings.Contains(err.Error(), s) {
					t.Errorf("error %q does not say %q", err, s)
				}
			}
			if err := c.Delete(ctx, containerd.WithSnapshotCleanup); err != nil {
				t.Fatal(err)
			}
			n.waitNoLeftovers(t, e, []string{id}, nil)
		})
	}
}

func parseIP(t *testing.T, s string) net.IP {
	t.Helper()
	ip := net.ParseIP(s)
	if ip == nil {
		t.Fatalf("not an IP address: %q", s)
	}
	return ip
}
