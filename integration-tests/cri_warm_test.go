package integration

import (
	"bytes"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	runtime "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/caisson-containers/caisson/integration-tests/harness"
	"github.com/caisson-containers/caisson/internal/testutil"
	"github.com/caisson-containers/caisson/shim/config"
	"github.com/caisson-containers/caisson/shim/pod"
	"github.com/caisson-containers/caisson/shim/warm"
)

// warmSlots lists the warm VM slots of the environment's pools.
func warmSlots(t testing.TB, stateDir string) []warm.Slot {
	t.Helper()
	pools, err := warm.Pools(stateDir)
	if err != nil {
		t.Fatal(err)
	}
	var slots []warm.Slot
	for _, p := range pools {
		s, err := p.Slots()
		if err != nil {
			t.Fatal(err)
		}
		slots = append(slots, s...)
	}
	return slots
}

// slotAt is the warm VM slot in dir, which must be listed.
func slotAt(t testing.TB, stateDir, dir string) warm.Slot {
	t.Helper()
	for _, s := range warmSlots(t, stateDir) {
		if s.Dir == dir {
			return s
		}
	}
	t.Fatalf("the warm VM slot %s is not listed", dir)
	return warm.Slot{}
}

// waitWarm waits until n warm VMs wait for pods, and returns them.
func waitWarm(t testing.TB, stateDir string, n int) []warm.Slot {
	t.Helper()
	for end := time.Now().Add(2 * time.Minute); ; time.Sleep(100 * time.Millisecond) {
		var ready []warm.Slot
		for _, s := range warmSlots(t, stateDir) {
			if s.Ready {
				ready = append(ready, s)
			}
		}
		if len(ready) == n {
			return ready
		}
		if time.Now().After(end) {
			t.Fatalf("%d warm VMs waiting, want %d: %+v", len(ready), n, warmSlots(t, stateDir))
		}
	}
}

// podLog is what the shim logged for pod (containerd's debug log carries it).
func podLog(t *testing.T, c *harness.CRI, pod string) string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(c.Dir, "containerd.log"))
	if err != nil {
		t.Fatal(err)
	}
	var lines []string
	for _, l := range strings.Split(string(b), "\n") {
		if strings.Contains(l, pod) {
			lines = append(lines, l)
		}
	}
	return strings.Join(lines, "\n")
}

// runMisfitPod runs pod name, whose VM differs from the waiting warm VM's (its kernel
// command line: the guest.debug_console annotation, which the runtime must allow), with
// a container: the pod must end the warm VM, its slot gone, and boot its own VM.
func runMisfitPod(t *testing.T, c *harness.CRI, image, name string) string {
	t.Helper()
	waiting := waitWarm(t, c.StateDir, 1)[0]
	cfg := c.PodConfig(name, func(p *runtime.PodSandboxConfig) {
		p.Annotations = map[string]string{"io.caisson.config.guest.debug_console": "true"}
	})
	id := c.RunPod(t, cfg, harness.Handler)
	if l := podLog(t, c, id); strings.Contains(l, `msg="warm VM taken"`) || !strings.Contains(l, "does not fit the pod") {
		t.Fatalf("a pod of another VM and the warm VM:\n%s", l)
	}
	if _, err := os.Stat(waiting.Dir); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("the warm VM that did not fit left its slot: %v", err)
	}
	app := c.StartContainer(t, id, cfg, harness.ContainerConfig("app", image, "sleep", "100000"))
	if out, _, code := c.Exec(t, app, "cat", "/proc/cmdline"); code != 0 || !strings.Contains(out, "loglevel=7") {
		t.Fatalf("the pod of another VM: cmdline %q (exit %d)", out, code)
	}
	return id
}

// requireTaken fails unless pod took the warm VM of slot: the shim's log says so, no
// shim was started for the pod, and the slot's QEMU runs.
func requireTaken(t *testing.T, c *harness.CRI, pod string, slot warm.Slot) {
	t.Helper()
	if l := podLog(t, c, pod); !strings.Contains(l, `msg="warm VM taken"`) {
		t.Fatalf("pod %s did not take the warm VM:\n%s", pod, l)
	}
	if pids := shimPids(pod); len(pids) != 0 {
		t.Fatalf("a shim was started for the claimed pod: %v", pids)
	}
	if !qemuOf(slot.Dir) {
		t.Fatalf("no QEMU runs in the claimed slot %s", slot.Dir)
	}
}

// requireServedAndGrown fails unless srv, a tcpServer on port 8080 in pod, answers pong
// to the host, and the pod, which asked 640 MiB, has more memory than the warm VM's 512.
func requireServedAndGrown(t *testing.T, c *harness.CRI, pod, srv, pong string) {
	t.Helper()
	ip := c.PodIP(t, pod)
	if got, err := dialLine(net.JoinHostPort(ip, "8080")); err != nil || got != pong {
		t.Fatalf("host to the warm pod at %s: %q, %v", ip, got, err)
	}
	out, errOut, code := c.Exec(t, srv, "sh", "-c", "grep MemTotal /proc/meminfo | tr -s ' ' | cut -d' ' -f2")
	if kib, err := strconv.Atoi(strings.TrimSpace(out)); code != 0 || err != nil || kib <= 512<<10 {
		t.Fatalf("the warm pod's memory: %q %s (exit %d), want more than the 512 MiB of the warm VM (640 asked)", out, errOut, code)
	}
}

// TestCRIWarmVMs: with hypervisor.warm_vms, the first pod boots from the template and
// fills the pool; the next pod starts in the waiting warm VM (its NIC and disks
// hot-plugged: network, exec and its size as asked), and the pool is filled again. A
// warm shim killed while it waits leaves a slot the next start sweeps; a pod whose
// configuration makes another template does not take the warm VM (it is ended, the pod
// boots); a claimed shim killed under its pod leaves nothing once the pod is removed; a
// lone container (ctr run) runs in a warm VM of its namespace's pool; `caisson warm
// remove` ends the waiting ones, and nothing is left.
func TestCRIWarmVMs(t *testing.T) {
	c := harness.StartCRI(t, harness.Options{Runtime: func(cfg *config.Config) {
		cfg.Hypervisor.Template = true
		cfg.Hypervisor.WarmVMs = 1
		cfg.PodAnnotations = append(cfg.PodAnnotations, "guest.debug_console")
	}})
	image := c.Pull(t, c.BusyboxRef, harness.Handler)

	cfgA := c.PodConfig("warm-a", nil)
	podA := c.RunPod(t, cfgA, harness.Handler)
	if strings.Contains(podLog(t, c, podA), `msg="warm VM taken"`) {
		t.Fatal("the first pod took a warm VM from an empty pool")
	}
	first := waitWarm(t, c.StateDir, 1)[0]
	firstCgroup := requireWarmCgroup(t, c, first.Dir)

	cfgB := c.PodConfig("warm-b", func(p *runtime.PodSandboxConfig) {
		p.Annotations = map[string]string{"io.caisson.config.hypervisor.memory_mib": "640"}
	})
	podB := c.RunPod(t, cfgB, harness.Handler)
	requireTaken(t, c, podB, first)
	// The pod moved the VM into its own cgroup and removed the warm one.
	if qemu := qemuIn(first.Dir); qemu == 0 || cgroupOf(t, strconv.Itoa(qemu)) == firstCgroup {
		t.Fatalf("the claimed warm VM's QEMU (%d) is not in its pod's cgroup", qemu)
	}
	requireCgroupGone(t, firstCgroup, "the claimed warm VM's own cgroup")
	if slotAt(t, c.StateDir, first.Dir).Claimed == "" {
		t.Fatalf("slot %s is not marked claimed", first.Dir)
	}
	srv := c.StartContainer(t, podB, cfgB, harness.ContainerConfig("server", image, tcpServer(8080, "pong-from-warm")...))
	requireServedAndGrown(t, c, podB, srv, "pong-from-warm")
	refilled := waitWarm(t, c.StateDir, 1)[0]
	refilledCgroup := requireWarmCgroup(t, c, refilled.Dir)

	// A warm shim killed while it waits: its VM goes with it, and the next start sweeps
	// its slot, and the VM's cgroup, and boots the pod.
	syscall.Kill(refilled.Pid, syscall.SIGKILL)
	waitQEMUGone(t, refilled.Dir)
	cfgC := c.PodConfig("warm-c", nil)
	podC := c.RunPod(t, cfgC, harness.Handler)
	if strings.Contains(podLog(t, c, podC), `msg="warm VM taken"`) {
		t.Fatal("a pod took the warm VM of a killed shim")
	}
	if _, err := os.Stat(refilled.Dir); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("the killed warm shim's slot: %v", err)
	}
	requireCgroupGone(t, refilledCgroup, "the killed warm shim's VM cgroup")

	// A pod whose configuration makes another template ends the warm VM and boots.
	podD := runMisfitPod(t, c, image, "warm-d")

	// The claimed shim killed under its pod: removing the pod cleans up after it,
	// the warm VM's state included.
	if slotAt(t, c.StateDir, first.Dir).Claimed == "" {
		t.Fatalf("the claimed slot %s is not listed as claimed", first.Dir)
	}
	syscall.Kill(first.Pid, syscall.SIGKILL)
	waitQEMUGone(t, first.Dir)
	for end := time.Now().Add(30 * time.Second); ; time.Sleep(100 * time.Millisecond) {
		st, err := c.Runtime.ContainerStatus(c.Ctx(t), &runtime.ContainerStatusRequest{ContainerId: srv})
		if err == nil && st.GetStatus().GetState() == runtime.ContainerState_CONTAINER_EXITED {
			break
		}
		if time.Now().After(end) {
			t.Fatalf("the container of the killed shim: %v, %v", st.GetStatus().GetState(), err)
		}
	}
	for _, p := range []string{podA, podB, podC, podD} {
		c.RemovePod(t, p)
	}
	if _, err := os.Stat(first.Dir); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("the killed claimed shim's warm VM state: %v", err)
	}
	waitWarm(t, c.StateDir, 1)

	// A lone container (ctr run, its own namespace's pool): the first fills the pool,
	// the second runs in the warm VM.
	if out, errOut, code := c.Ctr(t, "images", "pull", "--plain-http", "--snapshotter", "caisson", c.BusyboxRef); code != 0 {
		t.Fatalf("ctr images pull (exit %d):\n%s%s", code, out, errOut)
	}
	for i := range 2 {
		if i == 1 {
			waitWarm(t, c.StateDir, 2)
		}
		id := fmt.Sprintf("warm-ctr-%d", i)
		out, errOut, code := c.Ctr(t, "run", "--rm", "--runtime", "io.containerd.caisson.v2", "--snapshotter", "caisson",
			c.BusyboxRef, id, "sh", "-c", "cat /proc/sys/kernel/random/boot_id; exit 3")
		if code != 3 || len(strings.TrimSpace(out)) != 36 {
			t.Fatalf("ctr run %s: exit %d, %q %s", id, code, out, errOut)
		}
		if taken := strings.Contains(podLog(t, c, id), `msg="warm VM taken"`); taken != (i == 1) {
			t.Fatalf("ctr run %s took a warm VM: %v", id, taken)
		}
	}
	waiting := waitWarm(t, c.StateDir, 2)
	cli := filepath.Join(testutil.RepoRoot(t), "bin", "caisson")
	list, err := exec.Command(cli, "warm", "list", "--config", c.ConfigPath).CombinedOutput()
	if err != nil || strings.Count(string(list), " waiting ") != 2 || !strings.Contains(string(list), waiting[0].Dir) {
		t.Fatalf("caisson warm list: %v\n%s", err, list)
	}
	removed, err := exec.Command(cli, "warm", "remove", "--config", c.ConfigPath).CombinedOutput()
	if err != nil || strings.TrimSpace(string(removed)) != "ended 2 waiting warm VMs" {
		t.Fatalf("caisson warm remove: %v\n%s", err, removed)
	}
	if left := c.Leftovers(); len(left) > 0 {
		t.Fatalf("after removing the pods and the warm VMs:\n  %s", strings.Join(left, "\n  "))
	}
	if _, err := os.Stat(filepath.Join(c.StateDir, pod.TemplatesDir)); err != nil {
		t.Fatalf("the templates went: %v", err)
	}
}

// qemuOf reports whether a QEMU runs whose command line names dir.
func qemuOf(dir string) bool { return qemuIn(dir) != 0 }

// qemuIn is the pid of the QEMU whose command line names dir (its state), or 0.
func qemuIn(dir string) int {
	entries, _ := os.ReadDir("/proc")
	for _, en := range entries {
		b, err := os.ReadFile(filepath.Join("/proc", en.Name(), "cmdline"))
		if err == nil && bytes.Contains(b, []byte("qemu-system")) && bytes.Contains(b, []byte(dir+"/")) {
			pid, _ := strconv.Atoi(en.Name())
			return pid
		}
	}
	return 0
}

// requireWarmCgroup checks that the QEMU of the warm VM in slot runs in the warm VM's
// own cgroup (/caisson/warm-SLOT), limited as a VM of c's runtime configuration, and
// returns the cgroup's path.
func requireWarmCgroup(t *testing.T, c *harness.CRI, slot string) string {
	t.Helper()
	qemu := qemuIn(slot)
	if qemu == 0 {
		t.Fatalf("no QEMU for the warm VM in %s", slot)
	}
	path := pod.DefaultCgroupParent + "/warm-" + filepath.Base(slot)
	memory, quota := vmLimits(c.Config, 0, 0)
	checkVMCgroup(t, []string{strconv.Itoa(qemu)}, path, memory, quota)
	return path
}

// requireCgroupGone fails unless the cgroup at path is gone from every hierarchy now.
func requireCgroupGone(t *testing.T, path, what string) {
	t.Helper()
	for _, dir := range cgroupDirs(path) {
		if _, err := os.Stat(dir); !errors.Is(err, os.ErrNotExist) {
			t.Fatalf("%s %s: %v", what, dir, err)
		}
	}
}

// waitQEMUGone waits for the QEMU whose command line names dir to exit.
func waitQEMUGone(t *testing.T, dir string) {
	t.Helper()
	for end := time.Now().Add(30 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		if !qemuOf(dir) {
			return
		}
		if time.Now().After(end) {
			t.Fatalf("the QEMU of %s outlived its shim", dir)
		}
	}
}

// TestCRIWarmVMIdle: a warm VM no pod takes within hypervisor.warm_vm_idle_timeout ends,
// its QEMU with it, and its slot goes; the next pod starts from the template and
// fills the pool again.
func TestCRIWarmVMIdle(t *testing.T) {
	c := harness.StartCRI(t, harness.Options{Runtime: func(cfg *config.Config) {
		cfg.Hypervisor.Template = true
		cfg.Hypervisor.WarmVMs = 1
		cfg.Hypervisor.WarmVMIdleTimeout = config.Duration(3 * time.Second)
	}})
	first := c.RunPod(t, c.PodConfig("idle-a", nil), harness.Handler)
	slot := waitWarm(t, c.StateDir, 1)[0]
	for end := time.Now().Add(30 * time.Second); ; time.Sleep(100 * time.Millisecond) {
		if _, err := os.Stat(slot.Dir); errors.Is(err, os.ErrNotExist) {
			break
		}
		if time.Now().After(end) {
			t.Fatalf("the idle warm VM's slot %s is still there", slot.Dir)
		}
	}
	waitQEMUGone(t, slot.Dir)
	if left := warmSlots(t, c.StateDir); len(left) != 0 {
		t.Fatalf("slots after the idle timeout: %+v", left)
	}
	second := c.RunPod(t, c.PodConfig("idle-b", nil), harness.Handler)
	if strings.Contains(podLog(t, c, second), `msg="warm VM taken"`) {
		t.Fatal("a pod took a warm VM that had timed out")
	}
	waitWarm(t, c.StateDir, 1)
	for _, p := range []string{first, second} {
		c.RemovePod(t, p)
	}
}

// TestCRIWarmVMsBooted: with hypervisor.warm_vms and no template, the warm VMs boot
// (Kata's VM cache, whose VMs share no memory): the first pod boots and fills the pool,
// and no template is made; the next pod starts in the warm VM, which gets the pod's
// NIC, its disks and its virtiofsd (a volume's write is on the host at once), and
// grows to the pod's size; the warm VM booted with the kernel modules image mounted,
// which the pod then does not mount (a privileged container makes a bridge, whose
// module only that image has); a pod whose VM differs (its kernel parameters) ends the
// warm VM and boots; nothing is left.
func TestCRIWarmVMsBooted(t *testing.T) {
	c := harness.StartCRI(t, harness.Options{Runtime: func(cfg *config.Config) {
		cfg.Hypervisor.WarmVMs = 1
		cfg.PodAnnotations = append(cfg.PodAnnotations, "guest.debug_console")
	}})
	image := c.Pull(t, c.BusyboxRef, harness.Handler)

	podA := c.RunPod(t, c.PodConfig("booted-warm-a", nil), harness.Handler)
	if strings.Contains(podLog(t, c, podA), `msg="warm VM taken"`) {
		t.Fatal("the first pod took a warm VM from an empty pool")
	}
	first := waitWarm(t, c.StateDir, 1)[0]
	firstCgroup := requireWarmCgroup(t, c, first.Dir)

	cfgB := c.PodConfig("booted-warm-b", func(p *runtime.PodSandboxConfig) {
		p.Annotations = map[string]string{"io.caisson.config.hypervisor.memory_mib": "640"}
		p.Linux.SecurityContext = &runtime.LinuxSandboxSecurityContext{Privileged: true}
	})
	podB := c.RunPod(t, cfgB, harness.Handler)
	requireTaken(t, c, podB, first)
	requireCgroupGone(t, firstCgroup, "the claimed warm VM's own cgroup")
	logB := podLog(t, c, podB)
	// The warm VM booted with the modules image and mounted it: a booted pod mounts
	// its own, the warm pod none.
	mountsModules := func(log string) bool {
		for _, l := range strings.Split(log, "\n") {
			if strings.Contains(l, `msg="storage mounted"`) && strings.Contains(l, "storage=kernel-modules") {
				return true
			}
		}
		return false
	}
	if byBooted, byWarm := mountsModules(podLog(t, c, podA)), mountsModules(logB); !byBooted || byWarm {
		t.Fatalf("the modules image: mounted by the booted pod %v (want true), by the warm pod %v (want false)", byBooted, byWarm)
	}
	cc := harness.ContainerConfig("server", image, tcpServer(8080, "pong-from-booted-warm")...)
	cc.Linux.SecurityContext = &runtime.LinuxContainerSecurityContext{Privileged: true}
	volume := t.TempDir()
	cc.Mounts = []*runtime.Mount{{ContainerPath: "/data", HostPath: volume}}
	srv := c.StartContainer(t, podB, cfgB, cc)
	requireServedAndGrown(t, c, podB, srv, "pong-from-booted-warm")
	if out, errOut, code := c.Exec(t, srv, "sh", "-c", "ip link add br-warm type bridge"); code != 0 {
		t.Fatalf("a bridge in the warm pod (its module from the modules image): exit %d %s%s", code, out, errOut)
	}
	// The volume is shared (virtio-fs, the pod's virtiofsd hot-plugged): the write is
	// on the host at once.
	if out, errOut, code := c.Exec(t, srv, "sh", "-c", "echo from-the-warm-pod > /data/f"); code != 0 {
		t.Fatalf("a write to the warm pod's volume: exit %d %s%s", code, out, errOut)
	}
	if b, err := os.ReadFile(filepath.Join(volume, "f")); err != nil || string(b) != "from-the-warm-pod\n" {
		t.Fatalf("the warm pod's volume write on the host: %q, %v", b, err)
	}
	if _, err := os.Stat(filepath.Join(c.StateDir, pod.TemplatesDir)); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("booted warm VMs made a template: %v", err)
	}

	// A pod whose VM differs ends the warm VM and boots.
	podC := runMisfitPod(t, c, image, "booted-warm-c")

	for _, p := range []string{podA, podB, podC} {
		c.RemovePod(t, p)
	}
	waitWarm(t, c.StateDir, 1)
	cli := filepath.Join(testutil.RepoRoot(t), "bin", "caisson")
	if out, err := exec.Command(cli, "warm", "remove", "--config", c.ConfigPath).CombinedOutput(); err != nil {
		t.Fatalf("caisson warm remove: %v\n%s", err, out)
	}
	if left := c.Leftovers(); len(left) > 0 {
		t.Fatalf("after removing the pods and the warm VMs:\n  %s", strings.Join(left, "\n  "))
	}
}
