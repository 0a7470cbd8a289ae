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
