package integration

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/pelletier/go-toml/v2"
	"golang.org/x/sys/unix"
	nodev1 "k8s.io/api/node/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	"sigs.k8s.io/yaml"

	"github.com/caisson-containers/caisson/integration-tests/harness"
	"github.com/caisson-containers/caisson/internal/testutil"
	"github.com/caisson-containers/caisson/shim/config"
)

// TestContribContainerdConfigV2: containerd started from contrib/containerd/config-v2.toml
// (the version 2 schema, which containerd 2 migrates) runs a CRI pod with the caisson handler.
func TestContribContainerdConfigV2(t *testing.T) {
	c := harness.StartCRI(t, harness.Options{ContribConfig: "config-v2.toml"})
	image := c.Pull(t, c.BusyboxRef, harness.Handler)
	podCfg := c.PodConfig("v2", nil)
	pod := c.RunPod(t, podCfg, harness.Handler)
	id := c.StartContainer(t, pod, podCfg, harness.ContainerConfig("app", image, "sleep", "100000"))
	if out, _, code := c.Exec(t, id, "uname", "-r"); code != 0 || strings.TrimSpace(out) != guestRelease {
		t.Fatalf("uname -r = %q (exit %d), want the guest's %s", out, code, guestRelease)
	}
	c.RemovePod(t, pod)
}

// TestContribProxyPluginSnippet: contrib/snapshotter/containerd-proxy-plugin.toml, put into
// containerd's configuration as its comment says, makes image pulls unpack into
// caisson-snapshotter for Caisson pods and still into overlayfs for runc pods on the same
// node: one image is pulled for each handler, found unpacked in each snapshotter, and a
// container runs on each (the Caisson one in the guest's kernel, the runc one in the
// host's). Its sections replace those of contrib/containerd/config.toml that set the same
// things, so what the pulls use is the snippet alone.
func TestContribProxyPluginSnippet(t *testing.T) {
	root := testutil.RepoRoot(t)
	snippet := readTOML(t, filepath.Join(root, "contrib", "snapshotter", "containerd-proxy-plugin.toml"))
	// The snippet names the socket the systemd unit serves.
	unitAddr := execStartFlag(t, filepath.Join(root, "contrib", "snapshotter", "caisson-snapshotter.service"), "--address")
	proxies, _ := snippet["proxy_plugins"].(map[string]any)
	for _, name := range []string{"caisson", "caisson-diff"} {
		p, _ := proxies[name].(map[string]any)
		if p == nil || p["address"] != unitAddr {
			t.Fatalf("snippet's proxy plugin %s: %v, want address %s (caisson-snapshotter.service's --address)", name, p, unitAddr)
		}
	}

	c := harness.StartCRI(t, harness.Options{ContainerdConfig: func(cfg map[string]any) {
		// The harness pointed contrib's proxy plugins at its snapshotter; the snippet's go there too.
		sock := cfg["proxy_plugins"].(map[string]any)["caisson"].(map[string]any)["address"]
		for key, v := range snippet {
			switch key {
			case "version":
				if v != cfg["version"] {
					t.Fatalf("snippet is config version %v, contrib/containerd/config.toml %v", v, cfg["version"])
				}
			case "plugins":
				// Whole plugin sections: nothing of contrib's transfer or diff service
				// configuration is left to help the snippet.
				for id, section := range v.(map[string]any) {
					cfg["plugins"].(map[string]any)[id] = section
				}
			default:
				cfg[key] = v
			}
		}
		for _, p := range cfg["proxy_plugins"].(map[string]any) {
			p.(map[string]any)["address"] = sock
		}
	}})
	ctx := namespaces.WithNamespace(c.Ctx(t), "k8s.io") // the CRI plugin's namespace
	for _, tc := range []struct {
		handler, snapshotter, kernel string
	}{
		{harness.Handler, "caisson", guestRelease},
		{harness.RuncHandler, "overlayfs", hostRelease(t)},
	} {
		image := c.Pull(t, c.BusyboxRef, tc.handler)
		img, err := c.Client.GetImage(ctx, c.BusyboxRef)
		if err != nil {
			t.Fatal(err)
		}
		if ok, err := img.IsUnpacked(ctx, tc.snapshotter); err != nil || !ok {
			t.Fatalf("pulled for %s: unpacked into %s %v, %v", tc.handler, tc.snapshotter, ok, err)
		}
		podCfg := c.PodConfig("snippet-"+tc.handler, nil)
		pod := c.RunPod(t, podCfg, tc.handler)
		id := c.StartContainer(t, pod, podCfg, harness.ContainerConfig("app", image, "sleep", "100000"))
		ctr, err := c.Client.LoadContainer(ctx, id)
		if err != nil {
			t.Fatal(err)
		}
		if info, err := ctr.Info(ctx); err != nil || info.Snapshotter != tc.snapshotter || info.Runtime.Name != runtimeType(tc.handler) {
			t.Fatalf("%s container: snapshotter %q, runtime %q (%v); want %s and %s", tc.handler, info.Snapshotter, info.Runtime.Name, err, tc.snapshotter, runtimeType(tc.handler))
		}
		if out, _, code := c.Exec(t, id, "uname", "-r"); code != 0 || strings.TrimSpace(out) != tc.kernel {
			t.Fatalf("%s container: uname -r = %q (exit %d), want %s", tc.handler, out, code, tc.kernel)
		}
		c.RemovePod(t, pod)
	}
}

// runtimeType is the shim a CRI handler of contrib's configuration runs.
func runtimeType(handler string) string {
	if handler == harness.Handler {
		return "io.containerd.caisson.v2"
	}
	return "io.containerd.runc.v2"
}

func hostRelease(t *testing.T) string {
	t.Helper()
	var u unix.Utsname
	if err := unix.Uname(&u); err != nil {
		t.Fatal(err)
	}
	return unix.ByteSliceToString(u.Release[:])
}

func readTOML(t *testing.T, path string) map[string]any {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var m map[string]any
	if err := toml.Unmarshal(b, &m); err != nil {
		t.Fatalf("%s: %v", path, err)
	}
	return m
}

// execStartFlag is the value of flag on the ExecStart line of a systemd unit.
func execStartFlag(t *testing.T, unit, flag string) string {
	t.Helper()
	b, err := os.ReadFile(unit)
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "ExecStart="); ok {
			f := strings.Fields(v)
			for i := range f {
				if f[i] == flag && i+1 < len(f) {
					return f[i+1]
				}
				if val, ok := strings.CutPrefix(f[i], flag+"="); ok {
					return val
				}
			}
		}
	}
	t.Fatalf("%s: no %s on its ExecStart line", unit, flag)
	return ""
}

// shimPids are the pids of caisson shims whose command line names id.
func shimPids(id string) []string {
	var pids []string
	entries, _ := os.ReadDir("/proc")
	for _, en := range entries {
		b, err := os.ReadFile(filepath.Join("/proc", en.Name(), "cmdline"))
		if err == nil && bytes.Contains(b, []byte("containerd-shim-caisson-v2")) && bytes.Contains(b, []byte(id)) {
			pids = append(pids, en.Name())
		}
	}
	return pids
}

// TestContribRuntimeClass: contrib/kubernetes/runtimeclass.yaml is a valid RuntimeClass
// for the handler contrib's containerd config defines, and its overhead.podFixed memory
// covers what an idle pod costs the host beyond its containers here: QEMU's and the shim's
// proportional set size with the default configuration.
func TestContribRuntimeClass(t *testing.T) {
	b, err := os.ReadFile(filepath.Join(testutil.RepoRoot(t), "contrib", "kubernetes", "runtimeclass.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	var rc nodev1.RuntimeClass
	if err := yaml.UnmarshalStrict(b, &rc); err != nil {
		t.Fatalf("runtimeclass.yaml: %v", err)
	}
	if rc.Kind != "RuntimeClass" || rc.APIVersion != "node.k8s.io/v1" || rc.Handler != harness.Handler || rc.Overhead == nil {
		t.Fatalf("runtimeclass.yaml: %+v; want a node.k8s.io/v1 RuntimeClass for handler %q with an overhead", rc, harness.Handler)
	}
	mem := rc.Overhead.PodFixed.Memory()
	cpu := rc.Overhead.PodFixed.Cpu()
	if mem.IsZero() || cpu.IsZero() {
		t.Fatalf("overhead.podFixed %v lacks memory or cpu", rc.Overhead.PodFixed)
	}

	c := harness.StartCRI(t, harness.Options{})
	image := c.Pull(t, c.BusyboxRef, harness.Handler)
	podCfg := c.PodConfig("overhead", nil)
	pod := c.RunPod(t, podCfg, harness.Handler)
	c.StartContainer(t, pod, podCfg, harness.ContainerConfig("app", image, "sleep", "100000"))
	qemus := c.QEMUs()
	shims := shimPids(pod)
	if len(qemus) != 1 || len(shims) != 1 {
		t.Fatalf("%d QEMU and %d shim processes for one pod", len(qemus), len(shims))
	}
	qemu, _ := strconv.Atoi(qemus[0])
	shim, _ := strconv.Atoi(shims[0])
	// Let the guest settle after boot (page cache, agent), then measure.
	time.Sleep(3 * time.Second)
	qemuPSS, shimPSS := pss(t, qemu), pss(t, shim)
	used := qemuPSS + shimPSS
	t.Logf("idle pod: QEMU PSS %d MiB, shim PSS %d MiB; RuntimeClass podFixed memory %s, cpu %s",
		qemuPSS>>20, shimPSS>>20, mem, cpu)
	if used > mem.Value() {
		t.Errorf("an idle pod costs %s of host memory, more than the RuntimeClass's podFixed %s",
			resource.NewQuantity(used, resource.BinarySI), mem)
	}
	c.RemovePod(t, pod)
}

// TestContribInstall runs contrib/install.sh into a scratch root and checks that what it
// installs fits together: the binaries the systemd units start, the runtime configuration
// (which loads and names the installed guest), the snapshotter's, and a containerd config
// that containerd itself accepts.
func TestContribInstall(t *testing.T) {
	testutil.RequireRoot(t)
	root := testutil.RepoRoot(t)
	for _, b := range []string{"containerd-shim-caisson-v2", "caisson-snapshotter", "caisson"} {
		if _, err := os.Stat(filepath.Join(root, "bin", b)); err != nil {
			t.Skipf("needs bin/%s (make binaries)", b)
		}
	}
	testutil.RequireGuest(t)
	dest := t.TempDir()
	cmd := exec.Command(filepath.Join(root, "contrib", "install.sh"))
	cmd.Env = append(os.Environ(), "DESTDIR="+dest)
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("install.sh: %v\n%s", err, out)
	}
	t.Logf("install.sh:\n%s", out)
	for _, f := range []string{
		"usr/local/bin/containerd-shim-caisson-v2", "usr/local/bin/caisson-snapshotter", "usr/local/bin/caisson",
		"usr/share/caisson/vmlinuz", "usr/share/caisson/initramfs.cpio.lz4",
		"etc/caisson/config.toml", "etc/caisson/snapshotter.toml", "etc/containerd/config.toml",
		"etc/systemd/system/caisson-snapshotter.service", "etc/systemd/system/containerd.service.d/caisson.conf",
	} {
		if _, err := os.Stat(filepath.Join(dest, f)); err != nil {
			t.Errorf("not installed: /%s", f)
		}
	}
	// The runtime configuration names the installed guest.
	cfg, _, err := config.Load(filepath.Join(dest, "etc/caisson/config.toml"))
	if err != nil {
		t.Fatalf("installed config.toml: %v", err)
	}
	if cfg.Guest.Kernel != "/usr/share/caisson/vmlinuz" || cfg.Guest.Initramfs != "/usr/share/caisson/initramfs.cpio.lz4" {
		t.Errorf("installed config names kernel %q and initramfs %q, not the installed ones", cfg.Guest.Kernel, cfg.Guest.Initramfs)
	}
	// Every command a unit starts is installed.
	for _, unit := range []string{"etc/systemd/system/caisson-snapshotter.service", "etc/systemd/system/containerd.service.d/caisson.conf"} {
		b, err := os.ReadFile(filepath.Join(dest, unit))
		if err != nil {
			continue
		}
		for _, line := range strings.Split(string(b), "\n") {
			v, ok := strings.CutPrefix(line, "ExecStart=")
			if !ok {
				v, ok = strings.CutPrefix(line, "ExecStartPre=")
			}
			if !ok {
				continue
			}
			bin := strings.Fields(strings.TrimLeft(v, "-"))[0]
			if strings.HasPrefix(bin, "/usr/local/") {
				if _, err := os.Stat(filepath.Join(dest, bin)); err != nil {
					t.Errorf("%s starts %s, which install.sh did not install", unit, bin)
				}
			} else if _, err := os.Stat(bin); err != nil {
				t.Errorf("%s starts %s, which this host lacks", unit, bin)
			}
			for _, f := range strings.Fields(v) {
				if strings.HasPrefix(f, "/etc/caisson/") {
					if _, err := os.Stat(filepath.Join(dest, f)); err != nil {
						t.Errorf("%s names %s, which install.sh did not install", unit, f)
					}
				}
			}
		}
	}
	// containerd accepts the installed config.
	containerdBin := testutil.RequireBinary(t, "containerd")
	dump, err := exec.Command(containerdBin, "--config", filepath.Join(dest, "etc/containerd/config.toml"), "config", "dump").CombinedOutput()
	if err != nil || !strings.Contains(string(dump), "io.containerd.caisson.v2") {
		t.Fatalf("containerd config dump of the installed config: %v\n%s", err, dump)
	}
}
