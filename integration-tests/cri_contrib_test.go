package integration

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/v2/core/snapshots/proxy"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/pelletier/go-toml/v2"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	nodev1 "k8s.io/api/node/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	"sigs.k8s.io/yaml"

	"github.com/caisson-containers/caisson/guest/vmlinux"
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
// proportional set size with the default configuration, less the node's guest files.
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
	// The guest's kernel and initramfs are files QEMU maps (PVH loads the vmlinux's
	// segments from its page cache): paid once per node, shared by every pod's QEMU, yet
	// counted whole in the PSS of a pod alone on the node. They are not the pod's.
	guestFiles := mappingPSS(t, qemu, func(m harness.Mapping) bool {
		return m.Path == c.Config.Guest.Kernel || m.Path == c.Config.Guest.Initramfs
	})
	qemuPSS -= guestFiles
	// virtiofsd (guest.shared_fs) maps the guest's RAM too: its share of it, and its own.
	var fsPSS int64
	for _, p := range c.Virtiofsds() {
		pid, _ := strconv.Atoi(p)
		fsPSS += pss(t, pid)
	}
	used := qemuPSS + shimPSS + fsPSS
	t.Logf("idle pod: QEMU PSS %d MiB (and %d MiB of the node's guest kernel and initramfs files), shim PSS %d MiB, virtiofsd PSS %d MiB; RuntimeClass podFixed memory %s, cpu %s",
		qemuPSS>>20, guestFiles>>20, shimPSS>>20, fsPSS>>20, mem, cpu)
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
		"usr/share/caisson/vmlinux", "usr/share/caisson/initramfs.cpio.lz4", "usr/share/caisson/modules.erofs",
		"etc/caisson/config.toml", "etc/caisson/snapshotter.toml", "etc/containerd/config.toml",
		"etc/systemd/system/caisson-snapshotter.service", "etc/systemd/system/containerd.service.d/caisson.conf",
	} {
		if _, err := os.Stat(filepath.Join(dest, f)); err != nil {
			t.Errorf("not installed: /%s", f)
		}
	}
	// One kernel, one format: the vmlinux QEMU boots directly (PVH), not the bzImage.
	if _, err := os.Stat(filepath.Join(dest, "usr/share/caisson/vmlinuz")); err == nil {
		t.Error("installed the bzImage, /usr/share/caisson/vmlinuz, beside the vmlinux")
	}
	if k, err := os.Open(filepath.Join(dest, "usr/share/caisson/vmlinux")); err == nil {
		if _, err := vmlinux.PVHEntry(k); err != nil {
			t.Errorf("installed kernel /usr/share/caisson/vmlinux: %v", err)
		}
		k.Close()
	}
	// The runtime configuration names the installed guest.
	cfg, _, err := config.Load(filepath.Join(dest, "etc/caisson/config.toml"))
	if err != nil {
		t.Fatalf("installed config.toml: %v", err)
	}
	if cfg.Guest.Kernel != "/usr/share/caisson/vmlinux" || cfg.Guest.Initramfs != "/usr/share/caisson/initramfs.cpio.lz4" {
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
	// The drop-in pulls in the unit install.sh installed.
	if b, err := os.ReadFile(filepath.Join(dest, "etc/systemd/system/containerd.service.d/caisson.conf")); err == nil {
		for _, dep := range []string{"Wants=caisson-snapshotter.service", "After=caisson-snapshotter.service"} {
			if !strings.Contains(string(b), dep+"\n") {
				t.Errorf("containerd.service.d/caisson.conf lacks %s", dep)
			}
		}
	}
	runUnitSnapshotter(t, dest)

	// containerd accepts the installed config.
	containerdBin := testutil.RequireBinary(t, "containerd")
	dump, err := exec.Command(containerdBin, "--config", filepath.Join(dest, "etc/containerd/config.toml"), "config", "dump").CombinedOutput()
	if err != nil || !strings.Contains(string(dump), "io.containerd.caisson.v2") {
		t.Fatalf("containerd config dump of the installed config: %v\n%s", err, dump)
	}

	// Installed over an install whose config.toml boots the bzImage it shipped, vmlinuz:
	// the file is kept, and install.sh says what to change in it.
	cfgPath := filepath.Join(dest, "etc/caisson/config.toml")
	b, err := os.ReadFile(cfgPath)
	if err != nil {
		t.Fatal(err)
	}
	old := bytes.Replace(b, []byte(`kernel = "/usr/share/caisson/vmlinux"`), []byte(`kernel = "/usr/share/caisson/vmlinuz"`), 1)
	if bytes.Equal(old, b) {
		t.Fatalf("installed config.toml has no kernel = \"/usr/share/caisson/vmlinux\" line:\n%s", b)
	}
	if err := os.WriteFile(cfgPath, old, 0o644); err != nil {
		t.Fatal(err)
	}
	again := exec.Command(filepath.Join(root, "contrib", "install.sh"))
	again.Env = append(os.Environ(), "DESTDIR="+dest)
	upgrade, err := again.CombinedOutput()
	if err != nil {
		t.Fatalf("install.sh over an install: %v\n%s", err, upgrade)
	}
	if !strings.Contains(string(upgrade), "set its guest.kernel to /usr/share/caisson/vmlinux") {
		t.Errorf("install.sh over a config.toml naming vmlinuz says nothing of it:\n%s", upgrade)
	}
	if b, _ := os.ReadFile(cfgPath); !bytes.Equal(b, old) {
		t.Error("install.sh changed the existing config.toml")
	}
}

// runUnitSnapshotter runs the ExecStart command line of the caisson-snapshotter.service
// install.sh put under dest, with its paths moved into dest and a scratch directory (the
// installed binary and snapshotter.toml, a scratch socket, a containerd socket nobody
// serves) and --root added, since the installed config's root is the host's
// /var/lib/containerd. The snapshotter must serve with those flags and that config before
// containerd is up (the unit starts first), prepare a snapshot whose writable image has
// the config's default_writable_size, and exit cleanly on the unit's KillSignal, SIGTERM.
func runUnitSnapshotter(t *testing.T, dest string) {
	t.Helper()
	unit := filepath.Join(dest, "etc/systemd/system/caisson-snapshotter.service")
	b, err := os.ReadFile(unit)
	if err != nil {
		t.Fatal(err)
	}
	var args []string
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "ExecStart="); ok {
			args = strings.Fields(v)
		}
	}
	if len(args) == 0 || !strings.Contains(string(b), "\nKillSignal=SIGTERM\n") {
		t.Fatalf("%s: want an ExecStart line and KillSignal=SIGTERM:\n%s", unit, b)
	}
	scratch := testutil.ShortTempDir(t)
	sock := filepath.Join(scratch, "snapshotter.sock")
	for i, a := range args {
		switch {
		case i == 0 || strings.HasPrefix(a, "/etc/caisson/"):
			args[i] = filepath.Join(dest, a)
		case args[i-1] == "--address":
			args[i] = sock
		case args[i-1] == "--containerd-address":
			args[i] = filepath.Join(scratch, "containerd.sock")
		}
	}
	args = append(args, "--root", filepath.Join(scratch, "root"))
	cmd := exec.Command(args[0], args[1:]...)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	stop := func() error {
		cmd.Process.Signal(syscall.SIGTERM)
		select {
		case err := <-exited:
			return err
		case <-time.After(60 * time.Second):
			cmd.Process.Kill()
			<-exited
			return fmt.Errorf("no exit within a minute of SIGTERM")
		}
	}
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		if _, err := os.Stat(sock); err == nil {
			break
		}
		select {
		case err := <-exited:
			t.Fatalf("the unit's %v exited at start: %v\n%s", args, err, out.String())
		default:
		}
		if time.Now().After(deadline) {
			stop()
			t.Fatalf("the unit's %v did not serve %s within 30 s\n%s", args, sock, out.String())
		}
	}
	conn, err := grpc.NewClient("unix://"+sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		stop()
		t.Fatal(err)
	}
	sn := proxy.NewSnapshotter(snapshotsapi.NewSnapshotsClient(conn), "caisson")
	ctx := context.Background()
	ms, err := sn.Prepare(ctx, "unit-check", "")
	if err == nil {
		err = sn.Remove(ctx, "unit-check")
	}
	conn.Close()
	if serr := stop(); serr != nil {
		t.Errorf("the unit's snapshotter after SIGTERM: %v\n%s", serr, out.String())
	}
	if err != nil {
		t.Fatalf("the unit's snapshotter: %v\n%s", err, out.String())
	}
	want := "X-containerd.mkfs.size=10737418240" // the installed snapshotter.toml's default_writable_size, 10GiB
	if len(ms) == 0 || !slices.Contains(ms[0].Options, want) {
		t.Errorf("the unit's snapshotter prepared %+v, want a writable image with %s", ms, want)
	}
}
