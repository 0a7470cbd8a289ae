package integration

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	runtime "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/caisson-containers/caisson/integration-tests/harness"
)

// The pod's VM runs in the cgroup the CRI gave its sandbox container, below the pod's
// cgroup parent, so the pod's accounting (PodSandboxStats, the kubelet's) includes the
// VM, and QEMU and virtiofsd are limited there to the VM's size: the pod's resources
// (256 MiB, one CPU) and the VM's own (docs/security.md); the cgroup goes with the pod.
// runc's pod, the control, has its pause process in the same place.
func TestCRIPodVMInPodCgroup(t *testing.T) {
	c := harness.StartCRI(t, harness.Options{})
	ctx := c.Ctx(t)
	parent := harness.CgroupParent(t, "vmcg")
	t.Run("runc", func(t *testing.T) {
		podCfg := c.PodConfig("vmcg-runc", func(p *runtime.PodSandboxConfig) { p.Linux.CgroupParent = parent })
		pod := c.RunPod(t, podCfg, harness.RuncHandler)
		st, err := c.Runtime.PodSandboxStatus(ctx, &runtime.PodSandboxStatusRequest{PodSandboxId: pod, Verbose: true})
		if err != nil {
			t.Fatal(err)
		}
		var info struct {
			Pid int `json:"pid"`
		}
		if err := json.Unmarshal([]byte(st.GetInfo()["info"]), &info); err != nil || info.Pid == 0 {
			t.Fatalf("no pid in pod %s's status info (%v)", pod, err)
		}
		want := filepath.Join(parent, pod)
		if got := cgroupOf(t, strconv.Itoa(info.Pid)); got != want {
			t.Errorf("runc's pause process in cgroup %s, want %s", got, want)
		}
		c.RemovePod(t, pod)
		waitCgroupGone(t, want)
	})
	podCfg := c.PodConfig("vmcg", func(p *runtime.PodSandboxConfig) {
		p.Linux.CgroupParent = parent
		p.Linux.Resources = &runtime.LinuxContainerResources{MemoryLimitInBytes: 256 << 20, CpuPeriod: 100000, CpuQuota: 100000}
	})
	pod := c.RunPod(t, podCfg, harness.Handler)

	qemus := c.QEMUs()
	if len(qemus) != 1 {
		t.Fatalf("QEMU processes: %v", qemus)
	}
	cg, err := os.ReadFile(filepath.Join("/proc", qemus[0], "cgroup"))
	if err != nil {
		t.Fatal(err)
	}
	want := filepath.Join(parent, pod)
	if !strings.Contains(string(cg), ":"+want+"\n") {
		t.Fatalf("QEMU's cgroups:\n%swant %s", cg, want)
	}
	memory, quota := vmLimits(c.Config, 256, 1)
	checkVMCgroup(t, append(qemus, c.Virtiofsds()...), want, memory, quota)

	st, err := c.Runtime.PodSandboxStats(ctx, &runtime.PodSandboxStatsRequest{PodSandboxId: pod})
	if err != nil {
		t.Fatal(err)
	}
	if ws := st.GetStats().GetLinux().GetMemory().GetWorkingSetBytes().GetValue(); ws < 64<<20 {
		t.Fatalf("pod working set %d bytes: the VM (well over 64 MiB) is not counted", ws)
	}

	c.RemovePod(t, pod)
	// The shim removes the pod cgroup while it shuts down, which containerd asks
	// of it in the background after RemovePodSandbox has returned.
	waitCgroupGone(t, want)
}

// cgroupDirs are path's directories in every mounted hierarchy.
func cgroupDirs(path string) []string {
	if _, err := os.Stat("/sys/fs/cgroup/cgroup.controllers"); err == nil {
		return []string{filepath.Join("/sys/fs/cgroup", path)}
	}
	var dirs []string
	hs, _ := os.ReadDir("/sys/fs/cgroup")
	for _, h := range hs {
		dirs = append(dirs, filepath.Join("/sys/fs/cgroup", h.Name(), path))
	}
	return dirs
}
