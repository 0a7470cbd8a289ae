package integration

import (
	"context"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/containerd/cgroups/v3"
	containerd "github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/core/containers"
	"github.com/containerd/containerd/v2/pkg/cio"
	"github.com/containerd/containerd/v2/pkg/oci"

	"github.com/caisson-containers/caisson/integration-tests/harness"
	"github.com/caisson-containers/caisson/shim/config"
	"github.com/caisson-containers/caisson/shim/pod"
	"github.com/caisson-containers/caisson/shim/podid"
)

// cgroupOf is pid's cgroup: in the memory controller's hierarchy on cgroup v1, the
// unified one on v2.
func cgroupOf(t *testing.T, pid string) string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("/proc", pid, "cgroup"))
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range strings.Split(strings.TrimSpace(string(b)), "\n") {
		f := strings.SplitN(l, ":", 3)
		if len(f) != 3 {
			continue
		}
		if cgroups.Mode() == cgroups.Unified && f[0] == "0" || strings.Contains(","+f[1]+",", ",memory,") {
			return f[2]
		}
	}
	t.Fatalf("no memory cgroup for %s in:\n%s", pid, b)
	return ""
}

// cgroupFile reads a cgroup's control file: file1 on cgroup v1 (in controller's
// hierarchy), file2 on v2.
func cgroupFile(t *testing.T, path, controller, file1, file2 string) string {
	t.Helper()
	p := filepath.Join("/sys/fs/cgroup", controller, path, file1)
	if cgroups.Mode() == cgroups.Unified {
		p = filepath.Join("/sys/fs/cgroup", path, file2)
	}
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	return strings.TrimSpace(string(b))
}

// vmLimits are the memory (bytes) and CPU (µs of quota per 100 ms) limits a VM of cfg,
// grown by podMiB and podCPUs for the pod's resources, gets (docs/security.md).
func vmLimits(cfg config.Config, podMiB, podCPUs int) (memory, quota int64) {
	mib := cfg.Hypervisor.MemoryMiB + podMiB + pod.VMOverheadMiB
	if cfg.Hypervisor.Accelerator != "kvm" {
		tb := cfg.Hypervisor.TCGTranslationCacheMiB
		if tb == 0 {
			tb = 1024
		}
		mib += tb
	}
	return int64(mib) << 20, int64(cfg.Hypervisor.VCPUs+podCPUs+1) * 100000
}

// checkVMCgroup checks that the pids are in the cgroup at path and that it has the
// memory limit and CPU quota given.
func checkVMCgroup(t *testing.T, pids []string, path string, memory, quota int64) {
	t.Helper()
	if len(pids) == 0 {
		t.Fatal("no process to check")
	}
	for _, pid := range pids {
		if got := cgroupOf(t, pid); got != path {
			t.Errorf("process %s in cgroup %s, want %s", pid, got, path)
		}
	}
	if got := cgroupFile(t, path, "memory", "memory.limit_in_bytes", "memory.max"); got != strconv.FormatInt(memory, 10) {
		t.Errorf("cgroup %s: memory limit %s, want %d (%d MiB)", path, got, memory, memory>>20)
	}
	if cgroups.Mode() == cgroups.Unified {
		if got, want := cgroupFile(t, path, "", "", "cpu.max"), strconv.FormatInt(quota, 10)+" 100000"; got != want {
			t.Errorf("cgroup %s: cpu.max %q, want %q", path, got, want)
		}
	} else if got := cgroupFile(t, path, "cpu", "cpu.cfs_quota_us", ""); got != strconv.FormatInt(quota, 10) {
		t.Errorf("cgroup %s: CPU quota %s µs, want %d", path, got, quota)
	}
}

// waitCgroupGone waits for the cgroup at path to be removed from every hierarchy: the
// shim removes it while it shuts down, or `shim delete` after a dead shim, which
// containerd runs in the background.
func waitCgroupGone(t *testing.T, path string) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for _, dir := range cgroupDirs(path) {
		for {
			if _, err := os.Stat(dir); err != nil {
				break
			}
			if time.Now().After(deadline) {
				t.Errorf("cgroup %s left after its VM was removed", dir)
				break
			}
			time.Sleep(100 * time.Millisecond)
		}
	}
}

// withCgroupsPath sets the spec's cgroupsPath ("" to give none).
func withCgroupsPath(path string) oci.SpecOpts {
	return func(_ context.Context, _ oci.Client, _ *containers.Container, s *oci.Spec) error {
		s.Linux.CgroupsPath = path
		return nil
	}
}

// A task of containerd's client (what `ctr run` makes): its processes run in the
// cgroupsPath of its spec (/NAMESPACE/ID), as runc, the control, puts them. Caisson's are
// the VM's QEMU and virtiofsd, with limits from the VM's size; the cgroup goes with the
// task, also when the shim was killed (`shim delete`). A task with no cgroupsPath gets
// one of the shim's own (/caisson/POD), as limited.
func TestTaskVMCgroup(t *testing.T) {
	e := harness.Start(t, harness.Options{})
	image := e.ImportBusybox(t)
	ctx := e.Context(t)
	if err := image.Unpack(ctx, runcControl.snapshotter); err != nil {
		t.Fatalf("unpack into %s for runc: %v", runcControl.snapshotter, err)
	}
	memory, quota := vmLimits(e.Config, 0, 0)

	t.Run("runc", func(t *testing.T) {
		c := newContainerOn(t, e, image, runcControl, "cg-runc", oci.WithProcessArgs("sleep", "100000"))
		spec, err := c.Spec(ctx)
		if err != nil {
			t.Fatal(err)
		}
		var o outputs
		task, _ := startTask(t, ctx, c, &o)
		want := spec.Linux.CgroupsPath
		if got := cgroupOf(t, strconv.Itoa(int(task.Pid()))); got != want {
			t.Errorf("runc's container in cgroup %s, want its cgroupsPath %s", got, want)
		}
		if _, err := task.Delete(ctx, containerd.WithProcessKill); err != nil {
			t.Fatal(err)
		}
		waitCgroupGone(t, want)
	})

	t.Run("caisson", func(t *testing.T) {
		c := newContainer(t, e, image, "cg-task", oci.WithProcessArgs("sleep", "100000"))
		spec, err := c.Spec(ctx)
		if err != nil {
			t.Fatal(err)
		}
		want := spec.Linux.CgroupsPath
		if want != "/"+harness.Namespace+"/cg-task" {
			t.Fatalf("containerd's default cgroupsPath is %q", want)
		}
		var o outputs
		task, _ := startTask(t, ctx, c, &o)
		checkVMCgroup(t, append(e.QEMUs(), e.Virtiofsds()...), want, memory, quota)
		if _, err := task.Delete(ctx, containerd.WithProcessKill); err != nil {
			t.Fatal(err)
		}
		waitCgroupGone(t, want)
		waitNoQEMU(t, e)
	})

	t.Run("caisson-own-cgroup-shim-killed", func(t *testing.T) {
		const id = "cg-own"
		c := newContainer(t, e, image, id, oci.WithProcessArgs("sleep", "100000"), withCgroupsPath(""))
		var o outputs
		task, exit := startTask(t, ctx, c, &o)
		want := pod.DefaultCgroupParent + "/" + filepath.Base(podid.StateDir(e.StateDir, harness.Namespace, id))
		checkVMCgroup(t, append(e.QEMUs(), e.Virtiofsds()...), want, memory, quota)
		killShim(t, ctx, e, c, task, exit)
		waitCgroupGone(t, want)
	})

	t.Run("caisson-systemd-path-without-systemd", func(t *testing.T) {
		if _, err := os.Stat("/run/systemd/system"); err == nil {
			t.Skip("systemd runs on this host")
		}
		path := "system.slice:caisson:cg-sd"
		c := newContainer(t, e, image, "cg-sd", oci.WithProcessArgs("sleep", "100000"), withCgroupsPath(path))
		_, err := c.NewTask(ctx, cio.NullIO)
		if err == nil || !strings.Contains(err.Error(), path) || !strings.Contains(err.Error(), "systemd") {
			t.Fatalf("a task with a systemd cgroup path on a host without systemd: %v", err)
		}
		t.Logf("NewTask: %v", err)
		waitNoQEMU(t, e)
		waitNoPodState(t, e)
	})
}
