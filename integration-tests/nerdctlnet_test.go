package integration

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	containerd "github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/core/containers"
	"github.com/containerd/containerd/v2/pkg/oci"
	"github.com/containerd/go-cni"
	"github.com/opencontainers/runtime-spec/specs-go"
	"github.com/vishvananda/netlink"

	"github.com/caisson-containers/caisson/integration-tests/harness"
	"github.com/caisson-containers/caisson/internal/testutil"
)

// buildNerdctlHook builds the nerdctl-shaped hook (integration-tests/nerdctlhook).
func buildNerdctlHook(t *testing.T) string {
	t.Helper()
	bin := filepath.Join(t.TempDir(), "nerdctlhook")
	cmd := exec.Command("go", "build", "-o", bin, "./integration-tests/nerdctlhook")
	cmd.Dir = testutil.RepoRoot(t)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("build nerdctlhook: %v\n%s", err, out)
	}
	return bin
}

// nerdctlNet is nerdctl's default network ("bridge": the bridge plugin with host-local
// IPAM, isGateway, ipMasq and hairpin mode, then portmap, firewall and tuning) for a test,
// with the nerdctl-shaped hook that wires containers to it. It differs from nerdctl's
// default in names only: nerdctl's bridge is nerdctl0 on 10.4.0.0/24; this one's bridge
// name is random and its subnet a random 10.4.X.0/24 (X ≥ 100), so that it collides neither
// with a real nerdctl on the host nor with the CRI tests' networks (10.100–199.X.0/24).
// IPAM leases are kept in the test's directory.
type nerdctlNet struct {
	hook, cniPath, confDir, dataRoot, ipamDir string
	bridge                                    string
	subnet                                    *net.IPNet
	gateway                                   net.IP
	// run is random, in every container id: runs of the test in other containerds at the
	// same time share runc's state root and libcni's cache, both keyed by container id.
	run string
}

// id is the container id for name in this run.
func (n *nerdctlNet) id(name string) string { return "nerd-" + n.run + "-" + name }

// nerdctlNetwork is the network's name, nerdctl's default network's.
const nerdctlNetwork = "bridge"

// libcniCache is where go-cni (libcni's default) caches each attachment's result.
const libcniCache = "/var/lib/cni/results"

func newNerdctlNet(t *testing.T) *nerdctlNet {
	t.Helper()
	cniPath := filepath.Join(testutil.RepoRoot(t), "_output", "tools", "cni")
	for _, p := range []string{"bridge", "host-local", "portmap", "firewall", "tuning"} {
		if _, err := os.Stat(filepath.Join(cniPath, p)); err != nil {
			t.Skipf("needs the CNI plugin %s in %s (run `make deps`)", p, cniPath)
		}
	}
	dir := t.TempDir()
	x := 100 + rand.IntN(150)
	n := &nerdctlNet{
		hook: buildNerdctlHook(t), cniPath: cniPath,
		confDir: filepath.Join(dir, "net.d"), dataRoot: filepath.Join(dir, "data"), ipamDir: filepath.Join(dir, "ipam"),
		bridge:  fmt.Sprintf("nerd%06x", rand.IntN(1<<24)),
		gateway: net.IPv4(10, 4, byte(x), 1).To4(),
		run:     fmt.Sprintf("%04x", rand.IntN(1<<16)),
	}
	_, n.subnet, _ = net.ParseCIDR(fmt.Sprintf("10.4.%d.0/24", x))
	conf := map[string]any{
		"cniVersion": "1.0.0",
		"name":       nerdctlNetwork,
		"plugins": []any{
			map[string]any{
				"type": "bridge", "bridge": n.bridge, "isGateway": true, "ipMasq": true, "hairpinMode": true,
				"ipam": map[string]any{
					"type":    "host-local",
					"ranges":  [][]map[string]string{{{"subnet": n.subnet.String(), "gateway": n.gateway.String()}}},
					"routes":  []map[string]string{{"dst": "0.0.0.0/0"}},
					"dataDir": n.ipamDir,
				},
			},
			map[string]any{"type": "portmap", "capabilities": map[string]bool{"portMappings": true}},
			map[string]any{"type": "firewall"},
			map[string]any{"type": "tuning"},
		},
	}
	b, _ := json.MarshalIndent(conf, "", "  ")
	if err := os.MkdirAll(n.confDir, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(n.confDir, "nerdctl-bridge.conflist"), b, 0o644); err != nil {
		t.Fatal(err)
	}
	restore := keepHostNetworkState(t)
	t.Cleanup(func() {
		if l, err := netlink.LinkByName(n.bridge); err == nil {
			if err := netlink.LinkDel(l); err != nil {
				t.Errorf("delete bridge %s: %v", n.bridge, err)
			}
		}
		restore()
	})
	return n
}

// hookArgs are the hook's command line for event, as nerdctl's own (its global flags,
// then the event).
func (n *nerdctlNet) hookArgs(event string) []string {
	return []string{n.hook, "--cni-path", n.cniPath, "--cni-netconfpath", n.confDir, "--data-root", n.dataRoot, event}
}

// withNetwork gives a spec nerdctl's network hooks and annotations: network (nerdctl's
// --net: "bridge", "none"), and port mappings (-p). extra createRuntime hooks follow
// nerdctl's, as another tool's would.
func (n *nerdctlNet) withNetwork(network string, ports []cni.PortMapping, extra ...specs.Hook) oci.SpecOpts {
	return func(_ context.Context, _ oci.Client, _ *containers.Container, s *specs.Spec) error {
		nets, _ := json.Marshal([]string{network})
		if s.Annotations == nil {
			s.Annotations = map[string]string{}
		}
		s.Annotations["nerdctl/namespace"] = harness.Namespace
		s.Annotations["nerdctl/networks"] = string(nets)
		if len(ports) > 0 {
			p, _ := json.Marshal(ports)
			s.Annotations["nerdctl/ports"] = string(p)
		}
		if s.Hooks == nil {
			s.Hooks = &specs.Hooks{}
		}
		// nerdctl passes its own environment (PATH among it: the CNI plugins run iptables).
		s.Hooks.CreateRuntime = append(s.Hooks.CreateRuntime, specs.Hook{Path: n.hook, Args: n.hookArgs("createRuntime"), Env: os.Environ()})
		s.Hooks.CreateRuntime = append(s.Hooks.CreateRuntime, extra...)
		s.Hooks.Poststop = append(s.Hooks.Poststop, specs.Hook{Path: n.hook, Args: n.hookArgs("postStop"), Env: os.Environ()})
		return nil
	}
}

// fullID is the id nerdctl's hook gives CNI for container id.
func fullID(id string) string { return harness.Namespace + "-" + id }

// leftovers lists what of containers ids is still on the host: veths on the bridge (each
// the peer of one in a container's network namespace, so a namespace still alive), network
// namespace holders of this environment's shims, host-local leases, iptables rules that
// name the containers or their addresses, libcni's cached results, and the hook's records.
func (n *nerdctlNet) leftovers(e *harness.Env, ids []string, addrs []string) []string {
	var left []string
	if br, err := netlink.LinkByName(n.bridge); err == nil {
		links, _ := netlink.LinkList()
		for _, l := range links {
			if l.Attrs().MasterIndex == br.Attrs().Index {
				left = append(left, "veth on the bridge: "+l.Attrs().Name)
			}
		}
	}
	for _, pid := range netnsHolders(e) {
		left = append(left, "network namespace holder process "+pid)
	}
	leases, _ := os.ReadDir(filepath.Join(n.ipamDir, nerdctlNetwork))
	for _, l := range leases {
		if name := l.Name(); name != "lock" && !strings.HasPrefix(name, "last_reserved_ip") {
			left = append(left, "host-local lease "+name)
		}
	}
	var addrREs []*regexp.Regexp
	for _, a := range addrs {
		addrREs = append(addrREs, regexp.MustCompile(`[^0-9.]`+regexp.QuoteMeta(a)+`([^0-9]|$)`))
	}
	for _, cmd := range []string{"iptables-save", "ip6tables-save"} {
		out, err := exec.Command(cmd).Output()
		if err != nil {
			left = append(left, fmt.Sprintf("%s: %v", cmd, err))
			continue
		}
		for _, line := range strings.Split(string(out), "\n") {
			for _, id := range ids {
				if strings.Contains(line, `"`+fullID(id)+`"`) {
					left = append(left, cmd+": "+line)
				}
			}
			for _, re := range addrREs {
				if re.MatchString(line) {
					left = append(left, cmd+": "+line)
				}
			}
		}
	}
	cached, _ := os.ReadDir(libcniCache)
	for _, c := range cached {
		for _, id := range ids {
			if strings.Contains(c.Name(), fullID(id)) {
				left = append(left, "libcni cache "+filepath.Join(libcniCache, c.Name()))
			}
		}
	}
	for _, id := range ids {
		if _, err := os.Stat(filepath.Join(n.dataRoot, fullID(id)+".json")); err == nil {
			left = append(left, "hook record of "+id+" (its postStop did not finish)")
		}
	}
	return slices.Compact(left)
}

// waitNoLeftovers fails t if leftovers remain after the shims had time to shut down
// (containerd asks a shim to after its last delete, and it stops its VM then).
func (n *nerdctlNet) waitNoLeftovers(t *testing.T, e *harness.Env, ids []string, addrs []string) {
	t.Helper()
	deadline := time.Now().Add(40 * time.Second)
	for {
		left := n.leftovers(e, ids, addrs)
		if len(left) == 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("left behind after the containers' delete:\n  %s", strings.Join(left, "\n  "))
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// netnsHolders are the pids of network namespace holders (shim/netns) whose parent is a
// shim of e.
func netnsHolders(e *harness.Env) []string {
	var pids []string
	entries, _ := os.ReadDir("/proc")
	for _, en := range entries {
		b, err := os.ReadFile(filepath.Join("/proc", en.Name(), "cmdline"))
		if err != nil || string(b) != "caisson-netns-holder\x00" {
			continue
		}
		stat, err := os.ReadFile(filepath.Join("/proc", en.Name(), "stat"))
		if err != nil {
			continue
		}
		f := strings.Fields(string(stat[bytes.LastIndexByte(stat, ')')+1:]))
		parent, _ := os.ReadFile(filepath.Join("/proc", f[1], "cmdline"))
		if bytes.Contains(parent, []byte(e.Address)) {
			pids = append(pids, en.Name())
		}
	}
	return pids
}

// keepHostNetworkState records what the CNI plugins change on the host beyond each
// container, and returns what puts it back: the bridge plugin (isGateway) turns on IPv4
// forwarding; portmap and firewall add chains of their own (CNI-HOSTPORT-*, CNI-FORWARD,
// CNI-ADMIN) and jumps to them, which they never remove (nerdctl leaves them for good).
// Chains that existed before are left alone, and so are all of them while some container
// (another test's, running at the same time) still has rules in them.
func keepHostNetworkState(t *testing.T) func() {
	forward, err := os.ReadFile("/proc/sys/net/ipv4/ip_forward")
	if err != nil {
		t.Fatal(err)
	}
	before := map[string]bool{}
	for _, c := range cniChains(t) {
		before[c.key()] = true
	}
	return func() {
		defer func() {
			if now, _ := os.ReadFile("/proc/sys/net/ipv4/ip_forward"); !bytes.Equal(now, forward) {
				if err := os.WriteFile("/proc/sys/net/ipv4/ip_forward", forward, 0o644); err != nil {
					t.Errorf("restore ip_forward: %v", err)
				}
			}
		}()
		if user := hostChainsInUse(t); user != "" {
			t.Logf("leaving the CNI plugins' host chains: in use (%s)", user)
			return
		}
		for _, c := range cniChains(t) {
			if before[c.key()] {
				continue
			}
			for _, jump := range c.jumps {
				if out, err := exec.Command(c.cmd, append([]string{"-w", "-t", c.table, "-D"}, jump...)...).CombinedOutput(); err != nil {
					t.Errorf("%s -t %s -D %v: %v: %s", c.cmd, c.table, jump, err, out)
				}
			}
		}
		for _, c := range cniChains(t) {
			if before[c.key()] {
				continue
			}
			for _, op := range []string{"-F", "-X"} {
				if out, err := exec.Command(c.cmd, "-w", "-t", c.table, op, c.name).CombinedOutput(); err != nil {
					t.Errorf("%s -t %s %s %s: %v: %s", c.cmd, c.table, op, c.name, err, out)
				}
			}
		}
	}
}

// hostChainsInUse returns a rule that makes a container use the host chains (a port it
// publishes, its firewall rules), or "".
func hostChainsInUse(t *testing.T) string {
	for _, cmd := range []string{"iptables", "ip6tables"} {
		for _, table := range []string{"filter", "nat"} {
			out, err := exec.Command(cmd, "-w", "-t", table, "-S").Output()
			if err != nil {
				t.Fatalf("%s -t %s -S: %v", cmd, table, err)
			}
			for _, r := range strings.Split(string(out), "\n") {
				if strings.HasPrefix(r, "-A CNI-HOSTPORT-DNAT ") || strings.HasPrefix(r, "-A CNI-ADMIN ") ||
					(strings.HasPrefix(r, "-A CNI-FORWARD ") && !strings.HasSuffix(r, "-j CNI-ADMIN")) {
					return cmd + " -t " + table + ": " + r
				}
			}
		}
	}
	return ""
}

// cniChain is a chain the portmap or firewall plugin makes once per host, with the rules
// of other chains that jump to it.
type cniChain struct {
	cmd, table, name string
	jumps            [][]string // each a rule spec after "-D"
}

func (c cniChain) key() string { return c.cmd + " " + c.table + " " + c.name }

// hostChains are the per-host chains of portmap and firewall.
var hostChains = []string{"CNI-HOSTPORT-DNAT", "CNI-HOSTPORT-SETMARK", "CNI-HOSTPORT-MASQ", "CNI-FORWARD", "CNI-ADMIN"}

func cniChains(t *testing.T) []cniChain {
	var chains []cniChain
	for _, cmd := range []string{"iptables", "ip6tables"} {
		for _, table := range []string{"filter", "nat"} {
			out, err := exec.Command(cmd, "-w", "-t", table, "-S").Output()
			if err != nil {
				t.Fatalf("%s -t %s -S: %v", cmd, table, err)
			}
			rules := strings.Split(string(out), "\n")
			for _, name := range hostChains {
				if !slices.Contains(rules, "-N "+name) {
					continue
				}
				c := cniChain{cmd: cmd, table: table, name: name}
				for _, r := range rules {
					args := shellWords(r)
					if len(args) > 2 && args[0] == "-A" && !slices.Contains(hostChains, args[1]) &&
						slices.Index(args, "-j") >= 0 && slices.Index(args, "-j")+1 < len(args) && args[slices.Index(args, "-j")+1] == name {
						c.jumps = append(c.jumps, args[1:])
					}
				}
				chains = append(chains, c)
			}
		}
	}
	return chains
}

// shellWords splits an iptables -S line: words, and double-quoted strings with \" inside.
func shellWords(s string) []string {
	var words []string
	var w strings.Builder
	in, quoted := false, false
	for i := 0; i < len(s); i++ {
		switch c := s[i]; {
		case quoted && c == '\\' && i+1 < len(s):
			i++
			w.WriteByte(s[i])
		case c == '"':
			quoted, in = !quoted, true
		case c == ' ' && !quoted:
			if in {
				words = append(words, w.String())
				w.Reset()
				in = false
			}
		default:
			w.WriteByte(c)
			in = true
		}
	}
	if in {
		words = append(words, w.String())
	}
	return words
}

// testRuntime is a runtime a test runs containers under, with its snapshotter.
type testRuntime struct {
	name, runtime, snapshotter string
}

var (
	runcControl    = testRuntime{"runc", "io.containerd.runc.v2", "overlayfs"}
	caissonRuntime = testRuntime{"caisson", runtimeName, snapshotter}
)

// nerdContainer is a container of the nerdctl tests.
type nerdContainer struct {
	c      containerd.Container
	task   containerd.Task
	exit   <-chan containerd.ExitStatus
	output outputs
}

// newContainerOn creates container id on rt, a busybox container with opts (its process,
// its network); newContainer is newContainerOn(caissonRuntime).
func newContainerOn(t *testing.T, e *harness.Env, image containerd.Image, rt testRuntime, id string, opts ...oci.SpecOpts) containerd.Container {
	t.Helper()
	ctx := e.Context(t)
	c, err := e.Client.NewContainer(ctx, id,
		containerd.WithImage(image),
		containerd.WithSnapshotter(rt.snapshotter),
		containerd.WithNewSnapshot(id+"-rootfs", image),
		containerd.WithRuntime(rt.runtime, nil),
		containerd.WithNewSpec(append([]oci.SpecOpts{oci.WithImageConfig(image)}, opts...)...))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Delete(context.WithoutCancel(ctx), containerd.WithSnapshotCleanup) })
	return c
}

// start creates and starts the container's task.
func (nc *nerdContainer) start(t *testing.T, ctx context.Context) {
	t.Helper()
	task, exit := startTask(t, ctx, nc.c, &nc.output)
	nc.task, nc.exit = task, exit
}

// remove kills the container's task if it runs, deletes it, and deletes the container
// (nerdctl rm -f).
func (nc *nerdContainer) remove(t *testing.T, ctx context.Context) {
	t.Helper()
	if nc.task != nil {
		if st, err := nc.task.Status(ctx); err == nil && st.Status == containerd.Running {
			nc.task.Kill(ctx, 9)
			select {
			case <-nc.exit:
			case <-time.After(time.Minute):
				t.Fatalf("container %s did not exit on SIGKILL", nc.c.ID())
			}
		}
		if _, err := nc.task.Delete(ctx); err != nil {
			t.Fatalf("delete task %s: %v", nc.c.ID(), err)
		}
	}
	if err := nc.c.Delete(ctx, containerd.WithSnapshotCleanup); err != nil {
		t.Fatalf("delete container %s: %v", nc.c.ID(), err)
	}
}

var inetRE = regexp.MustCompile(`inet (\d+\.\d+\.\d+\.\d+)/(\d+)`)

// eth0Addr is the IPv4 address of the container's eth0, as `ip addr` in it shows it.
func eth0Addr(t *testing.T, ctx context.Context, nc *nerdContainer) (string, int) {
	t.Helper()
	out, code := execIn(t, ctx, nc.task, "ipaddr", false, "busybox", "ip", "-4", "-o", "addr", "show", "dev", "eth0")
	m := inetRE.FindStringSubmatch(out)
	if code != 0 || m == nil {
		t.Fatalf("container %s: `ip -4 addr show dev eth0` exited %d: %q, want an IPv4 address", nc.c.ID(), code, out)
	}
	bits, _ := strconv.Atoi(m[2])
	return m[1], bits
}

// freePort is a TCP port nothing listens on at 127.0.0.1 right now.
func freePort(t *testing.T) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}
