package pod

import (
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/containerd/errdefs"
	"github.com/opencontainers/cgroups"
	"github.com/opencontainers/cgroups/systemd"

	"github.com/caisson-containers/caisson/internal/testutil"
	"github.com/caisson-containers/caisson/shim/config"
	"github.com/caisson-containers/caisson/shim/podid"
)

func TestCgroupConfig(t *testing.T) {
	for _, tc := range []struct {
		name, path string
		want       cgroups.Cgroup
		err        error
	}{
		{name: "ctr", path: "/default/box", want: cgroups.Cgroup{Path: "/default/box"}},
		{name: "cri cgroupfs", path: "/kubepods/burstable/pod12/abc", want: cgroups.Cgroup{Path: "/kubepods/burstable/pod12/abc"}},
		{name: "cri systemd", path: "kubepods-burstable-pod12.slice:cri-containerd:abc",
			want: cgroups.Cgroup{Parent: "kubepods-burstable-pod12.slice", ScopePrefix: "cri-containerd", Name: "abc", Systemd: true}},
		{name: "nerdctl systemd", path: "system.slice:nerdctl:abc",
			want: cgroups.Cgroup{Parent: "system.slice", ScopePrefix: "nerdctl", Name: "abc", Systemd: true}},
		{name: "empty", path: "", err: errdefs.ErrInvalidArgument},
		{name: "two parts", path: "system.slice:abc", err: errdefs.ErrInvalidArgument},
		{name: "no name", path: "system.slice:runc:", err: errdefs.ErrInvalidArgument},
		{name: "not a slice", path: "system:runc:abc", err: errdefs.ErrInvalidArgument},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c, err := cgroupConfig(tc.path, nil)
			if tc.err != nil {
				if !errors.Is(err, tc.err) {
					t.Fatalf("cgroupConfig(%q) = %v, want %v", tc.path, err, tc.err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if c.Path != tc.want.Path || c.Parent != tc.want.Parent || c.ScopePrefix != tc.want.ScopePrefix ||
				c.Name != tc.want.Name || c.Systemd != tc.want.Systemd {
				t.Errorf("cgroupConfig(%q) = %+v, want %+v", tc.path, *c, tc.want)
			}
		})
	}
}

// The systemd driver's paths land where runc's would: the library's systemd managers
// compute the cgroup directory without talking to systemd, which does not run on the
// machine these tests were written on (the scope itself is made through D-Bus, which
// no test here drives).
func TestSystemdCgroupDirectory(t *testing.T) {
	c, err := cgroupConfig("kubepods-burstable-pod12.slice:cri-containerd:abc", &cgroups.Resources{SkipDevices: true})
	if err != nil {
		t.Fatal(err)
	}
	const want = "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod12.slice/cri-containerd-abc.scope"
	var dir string
	if cgroups.IsCgroup2UnifiedMode() {
		m, err := systemd.NewUnifiedManager(c, "")
		if err != nil {
			t.Fatal(err)
		}
		dir = m.Path("")
	} else {
		m, err := systemd.NewLegacyManager(c, nil)
		if err != nil {
			t.Fatal(err)
		}
		if dir = m.Path("memory"); dir == "" {
			t.Skip("no cgroup v1 memory hierarchy mounted")
		}
	}
	if !strings.HasSuffix(dir, "/"+want) {
		t.Errorf("cgroup directory %s, want .../%s", dir, want)
	}
}

// Where systemd does not run, a systemd path is refused, naming it, rather than the VM
// left unlimited.
func TestSystemdPathWithoutSystemd(t *testing.T) {
	if systemd.IsRunningSystemd() {
		t.Skip("systemd runs on this host")
	}
	_, err := newCgroupManager("system.slice:caisson:abc", nil)
	if !errors.Is(err, errdefs.ErrFailedPrecondition) || !strings.Contains(err.Error(), "system.slice:caisson:abc") {
		t.Fatalf("systemd path without systemd: %v", err)
	}
}

func TestCgroupLimits(t *testing.T) {
	cfg := func(accel string, mib, vcpus, tb int) config.Config {
		c := config.Default("/nonexistent")
		c.Hypervisor.Accelerator, c.Hypervisor.MemoryMiB, c.Hypervisor.VCPUs, c.Hypervisor.TCGTranslationCacheMiB = accel, mib, vcpus, tb
		return c
	}
	for _, tc := range []struct {
		name      string
		cfg       config.Config
		memoryMiB int64
		cpus      int64
	}{
		{"default", config.Default("/nonexistent"), 512 + 128 + VMOverheadMiB, 2},
		{"tcg", cfg("tcg", 1024, 2, 64), 1024 + 64 + VMOverheadMiB, 3},
		{"tcg with QEMU's cache size", cfg("auto", 512, 1, 0), 512 + 1024 + VMOverheadMiB, 2},
		{"kvm", cfg("kvm", 2048, 4, 128), 2048 + VMOverheadMiB, 5},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := cgroupLimits(tc.cfg)
			if r.Memory != tc.memoryMiB<<20 {
				t.Errorf("memory limit %d MiB, want %d", r.Memory>>20, tc.memoryMiB)
			}
			if r.CpuPeriod != cpuPeriod || r.CpuQuota != tc.cpus*cpuPeriod {
				t.Errorf("CPU quota %d per %d µs, want %d CPUs", r.CpuQuota, r.CpuPeriod, tc.cpus)
			}
			if !r.SkipDevices {
				t.Error("device rules set on QEMU's cgroup")
			}
		})
	}
}

// procCgroup is the cgroup of pid in the memory controller (v1) or the unified
// hierarchy (v2).
func procCgroup(t *testing.T, pid int) string {
	t.Helper()
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/cgroup")
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range strings.Split(strings.TrimSpace(string(b)), "\n") {
		f := strings.SplitN(l, ":", 3)
		if len(f) == 3 && (cgroups.IsCgroup2UnifiedMode() && f[0] == "0" || strings.Contains(","+f[1]+",", ",memory,")) {
			return f[2]
		}
	}
	t.Fatalf("no memory cgroup for %d in:\n%s", pid, b)
	return ""
}

// memoryLimitFile is the memory limit file of the cgroup at path.
func memoryLimitFile(path string) string {
	if cgroups.IsCgroup2UnifiedMode() {
		return filepath.Join("/sys/fs/cgroup", path, "memory.max")
	}
	return filepath.Join("/sys/fs/cgroup/memory", path, "memory.limit_in_bytes")
}

func readInt(t *testing.T, file string) int64 {
	t.Helper()
	b, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	n, err := strconv.ParseInt(strings.TrimSpace(string(b)), 10, 64)
	if err != nil {
		t.Fatal(err)
	}
	return n
}

// A cgroupfs cgroup: made with its limits by the first process, refused to another
// pod while busy, removed once its processes are gone, also from the record alone
// (the cleanup of a dead shim).
func TestCgroupLifecycle(t *testing.T) {
	testutil.RequireRoot(t)
	if systemd.IsRunningSystemd() {
		t.Skip("the shim's own cgroups are systemd scopes here: this test drives cgroupfs")
	}
	ctx := context.Background()
	cfg := config.Default("/nonexistent")
	stateDir := filepath.Join(t.TempDir(), "test-cglife")
	if err := os.Mkdir(stateDir, 0o700); err != nil {
		t.Fatal(err)
	}
	want := DefaultCgroupParent + "/test-cglife"
	sleep := func() *exec.Cmd {
		cmd := exec.Command("sleep", "1000")
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
		return cmd
	}
	kill := func(cmd *exec.Cmd) { cmd.Process.Kill(); cmd.Wait() }

	cg, err := newCgroup(cfg, Options{StateDir: stateDir})
	if err != nil {
		t.Fatal(err)
	}
	if cg.path != want {
		t.Fatalf("default cgroup %s, want %s", cg.path, want)
	}
	a, b := sleep(), sleep()
	if err := cg.Add(a.Process.Pid); err != nil {
		t.Fatal(err)
	}
	if err := cg.Add(b.Process.Pid); err != nil {
		t.Fatal(err)
	}
	for _, cmd := range []*exec.Cmd{a, b} {
		if got := procCgroup(t, cmd.Process.Pid); got != want {
			t.Errorf("process %d in %s, want %s", cmd.Process.Pid, got, want)
		}
	}
	if got := readInt(t, memoryLimitFile(want)); got != cgroupLimits(cfg).Memory {
		t.Errorf("memory limit %d, want %d", got, cgroupLimits(cfg).Memory)
	}
	if !cgroups.IsCgroup2UnifiedMode() {
		if got := readInt(t, filepath.Join("/sys/fs/cgroup/cpu", want, "cpu.cfs_quota_us")); got != cgroupLimits(cfg).CpuQuota {
			t.Errorf("CPU quota %d µs, want %d", got, cgroupLimits(cfg).CpuQuota)
		}
	}

	// Another pod given the same, busy, cgroup.
	other := filepath.Join(t.TempDir(), "other")
	os.Mkdir(other, 0o700)
	if _, err := newCgroup(cfg, Options{StateDir: other, Cgroup: want}); !errors.Is(err, errdefs.ErrFailedPrecondition) {
		t.Errorf("a second pod in a busy cgroup: %v", err)
	}

	kill(a)
	kill(b)
	if err := cg.Remove(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(memoryLimitFile(want)); !os.IsNotExist(err) {
		t.Errorf("cgroup %s after remove: %v", want, err)
	}

	// The shim died: only the record is left to find the cgroup by.
	cg, err = newCgroup(cfg, Options{StateDir: stateDir})
	if err != nil {
		t.Fatal(err)
	}
	c := sleep()
	if err := cg.Add(c.Process.Pid); err != nil {
		t.Fatal(err)
	}
	go func() { time.Sleep(100 * time.Millisecond); kill(c) }() // the VM killed while cleanup waits
	if err := RemoveCgroup(ctx, stateDir); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(memoryLimitFile(want)); !os.IsNotExist(err) {
		t.Errorf("cgroup %s after RemoveCgroup: %v", want, err)
	}
	if err := RemoveCgroup(ctx, t.TempDir()); err != nil {
		t.Errorf("RemoveCgroup without a record: %v", err)
	}
}

// TestReleaseWarmSlot: the cgroup of a dead warm shim's VM (warm-SLOT, recorded in the
// slot) is kept, with an error, while a process is in it, and removed once none is; a
// slot without a record has nothing to release.
func TestReleaseWarmSlot(t *testing.T) {
	testutil.RequireRoot(t)
	if systemd.IsRunningSystemd() {
		t.Skip("the shim's own cgroups are systemd scopes here: this test drives cgroupfs")
	}
	slot := filepath.Join(t.TempDir(), "0123456789ab")
	if err := os.Mkdir(slot, 0o700); err != nil {
		t.Fatal(err)
	}
	want := DefaultCgroupParent + "/warm-0123456789ab"
	if got := warmCgroupPath(slot); got != want {
		t.Fatalf("warm cgroup %s, want %s", got, want)
	}
	cg, err := newCgroup(config.Default("/nonexistent"), Options{StateDir: slot, Cgroup: warmCgroupPath(slot)})
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command("sleep", "1000")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait(); RemoveCgroup(context.Background(), slot) })
	if err := cg.Add(cmd.Process.Pid); err != nil {
		t.Fatal(err)
	}
	if err := ReleaseWarmSlot(slot); !errors.Is(err, errdefs.ErrFailedPrecondition) {
		t.Fatalf("release with a process in the cgroup: %v, want FailedPrecondition", err)
	}
	if _, err := os.Stat(memoryLimitFile(want)); err != nil {
		t.Fatalf("cgroup %s after a release that failed: %v", want, err)
	}
	cmd.Process.Kill()
	cmd.Wait()
	if err := ReleaseWarmSlot(slot); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(memoryLimitFile(want)); !os.IsNotExist(err) {
		t.Errorf("cgroup %s after the release: %v", want, err)
	}
	if err := ReleaseWarmSlot(t.TempDir()); err != nil {
		t.Errorf("release of a slot without a record: %v", err)
	}
}

// descendants are pid's children, theirs, and so on.
func descendants(pid int) []int {
	var out []int
	tasks, _ := os.ReadDir("/proc/" + strconv.Itoa(pid) + "/task")
	for _, task := range tasks {
		b, _ := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/task/" + task.Name() + "/children")
		for _, f := range strings.Fields(string(b)) {
			if c, err := strconv.Atoi(f); err == nil {
				out = append(out, c)
				out = append(out, descendants(c)...)
			}
		}
	}
	return out
}

// A pod's QEMU, its virtiofsd and the sandboxed child virtiofsd forks when QEMU
// connects run in the pod's cgroup, with the VM's limits; Stop removes it. A VM that
// fails after it joined (its guest panics at boot) leaves no cgroup either.
func TestPodCgroup(t *testing.T) {
	testutil.RequireRoot(t)
	testutil.RequireBinary(t, "qemu-system-x86_64")
	guest := testutil.RequireGuest(t)
	if systemd.IsRunningSystemd() {
		t.Skip("the shim's own cgroups are systemd scopes here: this test drives cgroupfs")
	}
	cfg := config.Default(filepath.Dir(guest.Kernel))
	cfg.StateDir = testutil.ShortTempDir(t)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()

	t.Run("running", func(t *testing.T) {
		stateDir := podid.StateDir(cfg.StateDir, "test", "cg")
		want := DefaultCgroupParent + "/" + filepath.Base(stateDir)
		p, _, err := Start(ctx, cfg, Options{ID: "cg", StateDir: stateDir, Hostname: "cg", Hypervisor: qemuOf(t, cfg)})
		if err != nil {
			t.Fatal(err)
		}
		defer p.Stop(context.Background())
		pids := []int{p.Pid()}
		if SharesHostPaths(cfg) {
			kids := descendants(p.fs.Pid())
			if len(kids) == 0 {
				t.Error("virtiofsd forked no sandboxed child")
			}
			pids = append(pids, p.fs.Pid())
			pids = append(pids, kids...)
		}
		for _, pid := range pids {
			if got := procCgroup(t, pid); got != want {
				t.Errorf("process %d (%s) in cgroup %s, want %s", pid, qemuCmdline(t, pid)[:20], got, want)
			}
		}
		if got := readInt(t, memoryLimitFile(want)); got != cgroupLimits(cfg).Memory {
			t.Errorf("memory limit %d, want %d", got, cgroupLimits(cfg).Memory)
		}
		if err := p.Stop(ctx); err != nil {
			t.Fatal(err)
		}
		if _, err := os.Stat(memoryLimitFile(want)); !os.IsNotExist(err) {
			t.Errorf("cgroup %s after Stop: %v", want, err)
		}
	})

	t.Run("guest panics at boot", func(t *testing.T) {
		bad := cfg
		bad.Guest.KernelParams = "rdinit=/nonexistent"
		stateDir := podid.StateDir(cfg.StateDir, "test", "cgbad")
		want := DefaultCgroupParent + "/" + filepath.Base(stateDir)
		p, _, err := Start(ctx, bad, Options{ID: "cgbad", StateDir: stateDir, Hostname: "cgbad", Hypervisor: qemuOf(t, bad)})
		if err == nil {
			p.Stop(context.Background())
			t.Fatal("a pod whose guest has no init started")
		}
		t.Logf("Start: %v", err)
		if _, err := os.Stat(memoryLimitFile(want)); !os.IsNotExist(err) {
			t.Errorf("cgroup %s after a failed Start: %v", want, err)
		}
		if _, err := os.Stat(stateDir); !os.IsNotExist(err) {
			t.Errorf("state dir after a failed Start: %v", err)
		}
	})
}
