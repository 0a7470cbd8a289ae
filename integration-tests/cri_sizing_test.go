package integration

import (
	"encoding/json"
	"fmt"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"

	runtime "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/caisson-containers/caisson/integration-tests/harness"
	"github.com/caisson-containers/caisson/shim/config"
	"github.com/caisson-containers/caisson/shim/pod"
)

// sizingMaxVCPUs is the runtime's hypervisor.max_vcpus in these tests: room for three
// distinct vCPU counts on this 2-core machine (idle vCPUs cost little under TCG).
const sizingMaxVCPUs = 4

// podSize is a pod's CRI resources and the VM they make, above the runtime's base size.
type podSize struct {
	name      string
	memoryMiB int // the pod's memory limit (0: none)
	cpus      int // the pod's CPU quota in whole CPUs (0: none)
}

// TestCRISizing: pods of three sizes (the CRI's LinuxPodSandboxConfig resources, which
// containerd passes to the runtime as the sandbox's annotations) each get a VM of the
// base size plus their own, seen in the guest from their first container on, started from
// one VM template (every pod from the template at the base size, then grown) and booted;
// an UpdateContainerResources above the VM grows it, and one above the host's maxima is
// refused naming the limit, the pod as it was.
func TestCRISizing(t *testing.T) {
	for _, tc := range []struct {
		name     string
		template bool
	}{{"template", true}, {"booted", false}} {
		t.Run(tc.name, func(t *testing.T) { testSizing(t, tc.template) })
	}
}

func testSizing(t *testing.T, template bool) {
	c := harness.StartCRI(t, harness.Options{Runtime: func(cfg *config.Config) {
		cfg.Hypervisor.Template = template
		cfg.Hypervisor.MaxVCPUs = sizingMaxVCPUs
	}})
	image := c.Pull(t, c.BusyboxRef, harness.Handler)
	base := c.Config.Hypervisor
	runcUpdateControl(t, c)
	sizes := []podSize{{"small", 0, 0}, {"medium", 256, 1}, {"large", 640, 2}}
	cfgs := make([]*runtime.PodSandboxConfig, len(sizes))
	pods := make([]string, len(sizes))
	var wg sync.WaitGroup
	for i, s := range sizes {
		cfgs[i] = c.PodConfig("size-"+s.name, func(p *runtime.PodSandboxConfig) {
			if s.memoryMiB > 0 || s.cpus > 0 {
				p.Linux.Resources = &runtime.LinuxContainerResources{
					MemoryLimitInBytes: int64(s.memoryMiB) << 20, CpuPeriod: 100000, CpuQuota: int64(s.cpus) * 100000,
				}
			}
		})
		wg.Go(func() { pods[i] = c.RunPod(t, cfgs[i], harness.Handler) })
	}
	wg.Wait()
	if t.Failed() {
		t.FailNow()
	}
	templates, _ := filepath.Glob(filepath.Join(c.Config.StateDir, pod.TemplatesDir, "*", "state"))
	if want := map[bool]int{true: 1, false: 0}[template]; len(templates) != want {
		t.Fatalf("templates for pods of three sizes: %v, want %d", templates, want)
	}
	ctrs := make([]string, len(sizes))
	for i, s := range sizes {
		ctrs[i] = c.StartContainer(t, pods[i], cfgs[i], harness.ContainerConfig("sleeper", image, "sleep", "3600"))
		checkGuestSize(t, c, ctrs[i], s.name, base.MemoryMiB+s.memoryMiB, base.VCPUs+s.cpus)
		checkGuestTSC(t, c, ctrs[i])
	}

	// The small pod's container raised beyond its VM: the VM grows to the base plus
	// the container's new limits.
	small := ctrs[0]
	update := func(memoryMiB, cpus int) error {
		_, err := c.Runtime.UpdateContainerResources(c.Ctx(t), &runtime.UpdateContainerResourcesRequest{
			ContainerId: small,
			Linux:       &runtime.LinuxContainerResources{MemoryLimitInBytes: int64(memoryMiB) << 20, CpuPeriod: 100000, CpuQuota: int64(cpus) * 100000},
		})
		return err
	}
	if err := update(512, 2); err != nil {
		t.Fatalf("UpdateContainerResources beyond the VM: %v", err)
	}
	grown := base.MemoryMiB + 512
	checkGuestSize(t, c, small, "small, updated", grown, base.VCPUs+2)
	checkMemoryMax(t, c, small, 512<<20)
	// The pod's host cgroup follows: no other pod's VM has that size.
	memory, _ := vmLimits(c.Config, 512, 2)
	if limits := qemuMemoryLimits(t, c); !limits[memory] {
		t.Errorf("no QEMU's cgroup has the grown VM's memory limit %d: %v", memory, limits)
	}

	// Above the host's maxima: refused, naming the limit; the pod is as it was.
	for _, bad := range []struct {
		memoryMiB, cpus int
		want            string
	}{
		{base.MaxMemoryMiB, 2, "hypervisor.max_memory_mib"},
		{512, sizingMaxVCPUs, "hypervisor.max_vcpus"},
	} {
		err := update(bad.memoryMiB, bad.cpus)
		if err == nil || !strings.Contains(err.Error(), bad.want) {
			t.Fatalf("UpdateContainerResources to %d MiB and %d CPUs: %v, want an error naming %s", bad.memoryMiB, bad.cpus, err, bad.want)
		}
		checkGuestSize(t, c, small, "small, after a refused update", grown, base.VCPUs+2)
		checkMemoryMax(t, c, small, 512<<20)
	}

	// Lower limits: the container's cgroup follows, the VM keeps its size (a VM only
	// grows).
	if err := update(128, 1); err != nil {
		t.Fatalf("UpdateContainerResources lowering the limits: %v", err)
	}
	checkMemoryMax(t, c, small, 128<<20)
	checkGuestSize(t, c, small, "small, lowered", grown, base.VCPUs+2)

	for _, p := range pods {
		c.RemovePod(t, p)
	}
	if left := c.Leftovers(); len(left) > 0 {
		t.Fatalf("after RemovePodSandbox:\n  %s", strings.Join(left, "\n  "))
	}
}

// checkGuestSize checks that the guest of container id has vcpus online (nproc) and
// memoryMiB of memory: MemTotal at most that and at least 90 % of it (what the kernel
// keeps for itself).
func checkGuestSize(t *testing.T, c *harness.CRI, id, name string, memoryMiB, vcpus int) {
	t.Helper()
	out, errOut, code := c.Exec(t, id, "sh", "-c", "nproc; head -1 /proc/meminfo")
	f := strings.Fields(out)
	if code != 0 || len(f) < 3 {
		t.Fatalf("pod %s: nproc and meminfo: %q %s (exit %d)", name, out, errOut, code)
	}
	n, _ := strconv.Atoi(f[0])
	kb, _ := strconv.Atoi(f[2])
	if n != vcpus {
		// What the guest has online, and what the exec's cgroup lets it use: a vCPU can
		// be online before its cpuset has it.
		more, _, _ := c.Exec(t, id, "sh", "-c", "cat /sys/devices/system/cpu/online /sys/fs/cgroup$(cut -d: -f3 /proc/self/cgroup)/cpuset.cpus.effective; grep Cpus_allowed_list /proc/self/status")
		t.Errorf("pod %s: the guest has %d vCPUs online, want %d (online, the cgroup's effective cpuset, the exec's: %q)", name, n, vcpus, more)
	}
	if want := memoryMiB << 10; kb > want || kb < want*9/10 {
		t.Errorf("pod %s: guest MemTotal %d kB, want at most %d kB and at least 90 %% of it", name, kb, want)
	}
}

// checkMemoryMax checks the memory.max of container id's cgroup in the guest.
func checkMemoryMax(t *testing.T, c *harness.CRI, id string, want int64) {
	t.Helper()
	out, errOut, _ := c.Exec(t, id, "sh", "-c", "cat /sys/fs/cgroup$(cut -d: -f3 /proc/self/cgroup)/memory.max")
	if strings.TrimSpace(out) != fmt.Sprint(want) {
		t.Errorf("memory.max in the guest = %q %s, want %d", out, errOut, want)
	}
}

// runcUpdateControl: under runc, the control, UpdateContainerResources raising a
// container's limits is accepted and reaches its cgroup, as it does in a Caisson pod.
func runcUpdateControl(t *testing.T, c *harness.CRI) {
	t.Helper()
	image := c.Pull(t, c.BusyboxRef, harness.RuncHandler)
	cfg := c.PodConfig("size-runc", nil)
	p := c.RunPod(t, cfg, harness.RuncHandler)
	id := c.StartContainer(t, p, cfg, harness.ContainerConfig("sleeper", image, "sleep", "3600"))
	if _, err := c.Runtime.UpdateContainerResources(c.Ctx(t), &runtime.UpdateContainerResourcesRequest{
		ContainerId: id,
		Linux:       &runtime.LinuxContainerResources{MemoryLimitInBytes: 512 << 20, CpuPeriod: 100000, CpuQuota: 200000},
	}); err != nil {
		t.Fatalf("runc: UpdateContainerResources: %v", err)
	}
	st, err := c.Runtime.ContainerStatus(c.Ctx(t), &runtime.ContainerStatusRequest{ContainerId: id, Verbose: true})
	if err != nil {
		t.Fatal(err)
	}
	var info struct {
		Pid int `json:"pid"`
	}
	if err := json.Unmarshal([]byte(st.GetInfo()["info"]), &info); err != nil || info.Pid == 0 {
		t.Fatalf("runc: no pid in the container's status info (%v)", err)
	}
	pid := strconv.Itoa(info.Pid)
	if got := cgroupFile(t, cgroupOf(t, pid), "memory", "memory.limit_in_bytes", "memory.max"); got != strconv.Itoa(512<<20) {
		t.Errorf("runc: the container's memory limit %s after the update, want %d", got, 512<<20)
	}
	c.RemovePod(t, p)
}

// qemuMemoryLimits are the memory limits of the cgroups of the QEMUs running.
func qemuMemoryLimits(t *testing.T, c *harness.CRI) map[int64]bool {
	t.Helper()
	limits := map[int64]bool{}
	for _, pid := range c.QEMUs() {
		v := cgroupFile(t, cgroupOf(t, pid), "memory", "memory.limit_in_bytes", "memory.max")
		n, _ := strconv.ParseInt(v, 10, 64)
		limits[n] = true
	}
	return limits
}
