package integration

import (
	"os/exec"
	"strings"
	"testing"

	runtime "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/caisson-containers/caisson/integration-tests/harness"
	"github.com/caisson-containers/caisson/shim/config"
)

// privilegedScript makes, in a privileged container, network devices whose kernel
// modules the guest's initramfs does not carry (bridge, veth, tun, 8021q: the guest
// loads them on demand from its modules image), and mounts a tmpfs. Each step prints
// NAME=ok or NAME=failed (with the error on stderr); then the links it sees.
const privilegedScript = `step() { n=$1; shift; if "$@"; then echo $n=ok; else echo $n=failed; fi; }
step bridge ip link add br-priv type bridge
step veth ip link add veth-priv type veth peer name veth-peer
step master ip link set veth-priv master br-priv
step tun tunctl -t tap-priv
step vlan ip link add link veth-priv name vlan-priv type vlan id 10
step tmpfs sh -c 'mkdir -p /mnt/priv && mount -t tmpfs tmpfs /mnt/priv && echo data > /mnt/priv/f && grep -q data /mnt/priv/f'
echo links: $(ip -o link show | sed -n 's/^[0-9]*: \([^:@]*\).*/\1/p' | sort)`

// TestCRIPrivilegedModules: a privileged container (its pod privileged too) creates a
// bridge, a veth pair enslaved to it, a tap device through /dev/net/tun, a VLAN, and
// mounts a tmpfs — on runc (the control) and on Caisson, booted and made from a VM
// template (whose VMs get the modules image hot-plugged). On runc each device works
// if the host kernel has its module (this host's has no 8021q: VLAN is expected to
// fail there only if a VLAN cannot be made on the host either); on Caisson every one
// works: the guest kernel loads its module on demand.
func TestCRIPrivilegedModules(t *testing.T) {
	hostVLAN := hostCanMakeVLAN(t)
	run := func(t *testing.T, c *harness.CRI, handler, name string) map[string]string {
		image := c.Pull(t, c.BusyboxRef, handler)
		cfg := c.PodConfig(name, func(p *runtime.PodSandboxConfig) {
			p.Linux.SecurityContext = &runtime.LinuxSandboxSecurityContext{Privileged: true}
		})
		pod := c.RunPod(t, cfg, handler)
		defer c.RemovePod(t, pod)
		cc := harness.ContainerConfig("priv", image, "sleep", "600")
		cc.Linux.SecurityContext = &runtime.LinuxContainerSecurityContext{Privileged: true}
		id := c.StartContainer(t, pod, cfg, cc)
		out, errOut, code := c.Exec(t, id, "sh", "-c", privilegedScript)
		t.Logf("%s: exit %d\n%s%s", handler, code, out, errOut)
		got := map[string]string{}
		for _, line := range strings.Split(out, "\n") {
			if k, v, ok := strings.Cut(line, "="); ok {
				got[k] = v
			}
			if l, ok := strings.CutPrefix(line, "links: "); ok {
				got["links"] = " " + l + " "
			}
		}
		return got
	}
	check := func(t *testing.T, got map[string]string, vlan bool) {
		for _, step := range []string{"bridge", "veth", "master", "tun", "tmpfs"} {
			if got[step] != "ok" {
				t.Errorf("%s: %q, want ok", step, got[step])
			}
		}
		links := []string{"br-priv", "veth-priv", "tap-priv"}
		if vlan {
			links = append(links, "vlan-priv")
			if got["vlan"] != "ok" {
				t.Errorf("vlan: %q, want ok", got["vlan"])
			}
		} else if got["vlan"] != "failed" {
			t.Errorf("vlan: %q, but the host cannot make a VLAN itself", got["vlan"])
		}
		for _, l := range links {
			if !strings.Contains(got["links"], " "+l+" ") {
				t.Errorf("link %s missing from %q", l, got["links"])
			}
		}
	}

	c := harness.StartCRI(t, harness.Options{})
	t.Run(harness.RuncHandler, func(t *testing.T) {
		check(t, run(t, c, harness.RuncHandler, "priv-runc"), hostVLAN)
	})
	t.Run(harness.Handler, func(t *testing.T) {
		check(t, run(t, c, harness.Handler, "priv-caisson"), true)
	})
	if left := c.Leftovers(); len(left) > 0 {
		t.Errorf("left after the pods: %v", left)
	}
	t.Run("template", func(t *testing.T) {
		ct := harness.StartCRI(t, harness.Options{Runtime: func(cfg *config.Config) { cfg.Hypervisor.Template = true }})
		check(t, run(t, ct, harness.Handler, "priv-template"), true)
	})
}

// hostCanMakeVLAN says whether this host's kernel makes a VLAN (8021q), in a network
// namespace of its own.
func hostCanMakeVLAN(t *testing.T) bool {
	const ns = "caisson-test-vlan"
	if out, err := exec.Command("ip", "netns", "add", ns).CombinedOutput(); err != nil {
		t.Fatalf("ip netns add: %v: %s", err, out)
	}
	defer exec.Command("ip", "netns", "del", ns).Run()
	script := "ip link add vlan-base type dummy 2>/dev/null || ip link add vlan-base type veth peer name vlan-peer; ip link add link vlan-base name vlan-test type vlan id 10"
	err := exec.Command("ip", "netns", "exec", ns, "sh", "-c", script).Run()
	t.Logf("host kernel makes a VLAN: %v", err == nil)
	return err == nil
}
