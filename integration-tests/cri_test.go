package integration

import (
	"bufio"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/pkg/namespaces"
	runtime "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/caisson-containers/caisson/integration-tests/harness"
)

// criLogLine is one line of the CRI log format: RFC3339Nano time, stream, tag (F full,
// P partial), content.
var criLogLine = regexp.MustCompile(`^(\S+) (stdout|stderr) (F|P) (.*)$`)

// TestCRIPodLifecycle drives one pod through the kubelet's calls: the pause container in
// a new VM, two app containers in the same VM, ExecSync, logs in the CRI format, status,
// list, stats, resource updates, stop and remove; then nothing of the pod is left.
func TestCRIPodLifecycle(t *testing.T) {
	c := harness.StartCRI(t, harness.Options{})
	ctx := c.Ctx(t)
	image := c.Pull(t, c.BusyboxRef, harness.Handler)

	podCfg := c.PodConfig("lifecycle", func(p *runtime.PodSandboxConfig) {
		p.Linux.CgroupParent = harness.CgroupParent(t, "lifecycle")
		p.DnsConfig = &runtime.DNSConfig{Servers: []string{"10.96.0.10"}, Searches: []string{"svc.cluster.local"}, Options: []string{"ndots:5"}}
	})
	pod := c.RunPod(t, podCfg, harness.Handler)
	st, err := c.Runtime.PodSandboxStatus(ctx, &runtime.PodSandboxStatusRequest{PodSandboxId: pod})
	if err != nil {
		t.Fatal(err)
	}
	if st.Status.State != runtime.PodSandboxState_SANDBOX_READY || st.Status.RuntimeHandler != harness.Handler {
		t.Fatalf("pod status %v, want ready with handler %s", st.Status, harness.Handler)
	}

	logger := c.StartContainer(t, pod, podCfg, harness.ContainerConfig("logger", image,
		"sh", "-c", "echo out-line-1; echo err-line-1 >&2; echo out-line-2; exec sleep 100000"))
	worker := c.StartContainer(t, pod, podCfg, harness.ContainerConfig("worker", image, "sleep", "100000"))

	// Both containers run in the pod's guest kernel, not the host's.
	for _, id := range []string{logger, worker} {
		out, _, code := c.Exec(t, id, "uname", "-r")
		if code != 0 || strings.TrimSpace(out) != guestRelease {
			t.Fatalf("uname -r in %s = %q (exit %d), want %q", id, out, code, guestRelease)
		}
	}
	if out, _, _ := c.Exec(t, worker, "hostname"); strings.TrimSpace(out) != "lifecycle" {
		t.Fatalf("hostname = %q, want the pod's", out)
	}
	// The pause container writes to a tmpfs in the guest (docs/mounts.md): its sandbox
	// snapshot's writable image is never made, an app container's is.
	sn := c.Client.SnapshotService("caisson")
	for key, made := range map[string]bool{pod: false, worker: true} {
		mounts, err := sn.Mounts(namespaces.WithNamespace(ctx, "k8s.io"), key)
		if err != nil {
			t.Fatalf("mounts of snapshot %s: %v", key, err)
		}
		var image string
		for _, m := range mounts {
			if m.Type == "mkfs/ext4" {
				image = m.Source
			}
		}
		if image == "" {
			t.Fatalf("snapshot %s has no writable image among its mounts %+v", key, mounts)
		}
		if _, err := os.Stat(image); (err == nil) != made {
			t.Errorf("snapshot %s's writable image %s: %v; want made %v", key, image, err, made)
		}
	}
	// The pod's DNS configuration reaches the guest's resolv.conf.
	if out, _, _ := c.Exec(t, worker, "cat", "/etc/resolv.conf"); !strings.Contains(out, "nameserver 10.96.0.10") ||
		!strings.Contains(out, "search svc.cluster.local") || !strings.Contains(out, "options ndots:5") {
		t.Fatalf("/etc/resolv.conf in the pod:\n%s\nwant the pod's DNSConfig", out)
	}
	// One VM: a file written in one container's /dev/shm is the pod's shm, seen by the other.
	if _, errOut, code := c.Exec(t, logger, "sh", "-c", "echo shared > /dev/shm/x"); code != 0 {
		t.Fatalf("write /dev/shm: %s", errOut)
	}
	if out, _, _ := c.Exec(t, worker, "cat", "/dev/shm/x"); strings.TrimSpace(out) != "shared" {
		t.Fatalf("worker's /dev/shm/x = %q, want the logger's", out)
	}
	if _, errOut, code := c.Exec(t, worker, "sh", "-c", "echo to-stderr >&2; exit 7"); code != 7 || strings.TrimSpace(errOut) != "to-stderr" {
		t.Fatalf("exec exit %d stderr %q, want 7 and to-stderr", code, errOut)
	}

	// Logs, in the CRI format, in the file the CRI named.
	logPath := filepath.Join(podCfg.LogDirectory, "logger.log")
	want := map[string]string{"out-line-1": "stdout", "err-line-1": "stderr", "out-line-2": "stdout"}
	got := map[string]string{}
	deadline := time.Now().Add(30 * time.Second)
	for len(got) < len(want) && time.Now().Before(deadline) {
		got = readCRILog(t, logPath)
		time.Sleep(100 * time.Millisecond)
	}
	for line, stream := range want {
		if got[line] != stream {
			t.Errorf("log %s: %q on %q, want on %s (log: %v)", logPath, line, got[line], stream, got)
		}
	}

	// Status and list.
	cs, err := c.Runtime.ContainerStatus(ctx, &runtime.ContainerStatusRequest{ContainerId: worker})
	if err != nil {
		t.Fatal(err)
	}
	if cs.Status.State != runtime.ContainerState_CONTAINER_RUNNING {
		t.Fatalf("worker is %s, want running", cs.Status.State)
	}
	list, err := c.Runtime.ListContainers(ctx, &runtime.ListContainersRequest{Filter: &runtime.ContainerFilter{PodSandboxId: pod}})
	if err != nil {
		t.Fatal(err)
	}
	if len(list.Containers) != 2 {
		t.Fatalf("ListContainers: %d containers, want 2", len(list.Containers))
	}
	pods, err := c.Runtime.ListPodSandbox(ctx, &runtime.ListPodSandboxRequest{})
	if err != nil || len(pods.Items) != 1 || pods.Items[0].Id != pod {
		t.Fatalf("ListPodSandbox = %v, %v; want just %s", pods, err, pod)
	}

	// Stats: the guest's cgroups, reported per container and per pod.
	stats, err := c.Runtime.ContainerStats(ctx, &runtime.ContainerStatsRequest{ContainerId: worker})
	if err != nil {
		t.Fatalf("ContainerStats: %v", err)
	}
	if stats.Stats.GetMemory().GetWorkingSetBytes().GetValue() == 0 || stats.Stats.GetCpu() == nil {
		t.Errorf("ContainerStats without memory or CPU: %v", stats.Stats)
	}
	pstats, err := c.Runtime.PodSandboxStats(ctx, &runtime.PodSandboxStatsRequest{PodSandboxId: pod})
	if err != nil {
		t.Fatalf("PodSandboxStats: %v", err)
	}
	if len(pstats.Stats.GetLinux().GetContainers()) != 2 {
		t.Errorf("PodSandboxStats: %d containers, want 2: %v", len(pstats.Stats.GetLinux().GetContainers()), pstats.Stats)
	}

	// A resource update reaches the container's cgroup in the guest.
	if _, err := c.Runtime.UpdateContainerResources(ctx, &runtime.UpdateContainerResourcesRequest{
		ContainerId: worker, Linux: &runtime.LinuxContainerResources{MemoryLimitInBytes: 96 << 20, CpuPeriod: 100000, CpuQuota: 50000},
	}); err != nil {
		t.Fatalf("UpdateContainerResources: %v", err)
	}
	if out, _, _ := c.Exec(t, worker, "sh", "-c", "cat /sys/fs/cgroup$(cut -d: -f3 /proc/self/cgroup)/memory.max"); strings.TrimSpace(out) != "100663296" {
		t.Errorf("memory.max in the guest = %q after the update, want 100663296", out)
	}

	// Stop one container, then the pod.
	if _, err := c.Runtime.StopContainer(ctx, &runtime.StopContainerRequest{ContainerId: worker, Timeout: 2}); err != nil {
		t.Fatalf("StopContainer: %v", err)
	}
	if cs, _ := c.Runtime.ContainerStatus(ctx, &runtime.ContainerStatusRequest{ContainerId: worker}); cs.GetStatus().GetState() != runtime.ContainerState_CONTAINER_EXITED {
		t.Fatalf("worker after StopContainer: %v", cs.GetStatus())
	}
	if _, err := c.Runtime.RemoveContainer(ctx, &runtime.RemoveContainerRequest{ContainerId: worker}); err != nil {
		t.Fatalf("RemoveContainer: %v", err)
	}
	c.RemovePod(t, pod)
	if left := c.Leftovers(); len(left) > 0 {
		t.Fatalf("after RemovePodSandbox:\n  %s", strings.Join(left, "\n  "))
	}
}

// readCRILog maps each full line of a CRI log file to its stream.
func readCRILog(t *testing.T, path string) map[string]string {
	f, err := os.Open(path)
	if err != nil {
		return nil
	}
	defer f.Close()
	got := map[string]string{}
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		m := criLogLine.FindStringSubmatch(sc.Text())
		if m == nil {
			t.Errorf("%s: line %q is not in the CRI log format", path, sc.Text())
			continue
		}
		if _, err := time.Parse(time.RFC3339Nano, m[1]); err != nil {
			t.Errorf("%s: time %q: %v", path, m[1], err)
		}
		got[m[4]] = m[2]
	}
	return got
}
