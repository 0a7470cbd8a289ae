package integration

import (
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	v2 "github.com/containerd/cgroups/v3/cgroup2/stats"
	containerd "github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/pkg/cio"
	"github.com/containerd/containerd/v2/pkg/oci"
	"github.com/containerd/typeurl/v2"
	"github.com/opencontainers/runtime-spec/specs-go"

	"github.com/caisson-containers/caisson/integration-tests/harness"
)

// Stdin reaches the container and its EOF ends `cat`, whose output precedes the exit.
func TestStdinEOF(t *testing.T) {
	e := harness.Start(t, harness.Options{})
	image := e.ImportBusybox(t)
	ctx := e.Context(t)
	c := newContainer(t, e, image, "cat", oci.WithProcessArgs("cat"))
	var out, errOut syncBuffer
	task, err := c.NewTask(ctx, cio.NewCreator(cio.WithStreams(strings.NewReader("line one\nline two\n"), &out, &errOut)))
	if err != nil {
		t.Fatal(err)
	}
	defer task.Delete(ctx, containerd.WithProcessKill)
	exit, _ := task.Wait(ctx)
	if err := task.Start(ctx); err != nil {
		t.Fatal(err)
	}
	select {
	case st := <-exit:
		if st.ExitCode() != 0 {
			t.Fatalf("cat exited %d", st.ExitCode())
		}
	case <-time.After(60 * time.Second):
		t.Fatal("cat did not exit at stdin EOF")
	}
	task.IO().Wait()
	if out.String() != "line one\nline two\n" {
		t.Fatalf("cat printed %q", out.String())
	}
}

// Pause/resume, pids, stats and a resource update, on one running container, in a VM
// sized from the CRI's sandbox annotations.
func TestTaskControls(t *testing.T) {
	e := harness.Start(t, harness.Options{})
	image := e.ImportBusybox(t)
	ctx := e.Context(t)
	const podMemory = 256 << 20
	c := newContainer(t, e, image, "ctl", oci.WithProcessArgs("sh", "-c", "while true; do sleep 0.1; done"),
		oci.WithAnnotations(map[string]string{
			"io.kubernetes.cri.container-type": "sandbox", "io.kubernetes.cri.sandbox-id": "ctl",
			"io.kubernetes.cri.sandbox-memory": strconv.Itoa(podMemory),
		}))
	var o outputs
	task, _ := startTask(t, ctx, c, &o)

	// The VM has the configured memory plus the pod's.
	mem, _ := execIn(t, ctx, task, "meminfo", false, "head", "-1", "/proc/meminfo")
	f := strings.Fields(mem)
	kb, _ := strconv.Atoi(f[1])
	if want := (e.Config.Hypervisor.MemoryMiB + podMemory>>20) << 10; kb < want*9/10 || kb > want {
		t.Errorf("guest MemTotal %d kB, want about %d kB (config + sandbox-memory)", kb, want)
	}

	if err := task.Pause(ctx); err != nil {
		t.Fatal(err)
	}
	if st, _ := task.Status(ctx); st.Status != containerd.Paused {
		t.Fatalf("status after pause: %s", st.Status)
	}
	if err := task.Resume(ctx); err != nil {
		t.Fatal(err)
	}
	if st, _ := task.Status(ctx); st.Status != containerd.Running {
		t.Fatalf("status after resume: %s", st.Status)
	}

	pids, err := task.Pids(ctx)
	if err != nil || len(pids) < 1 {
		t.Fatalf("pids: %v, %v", pids, err)
	}

	m, err := task.Metrics(ctx)
	if err != nil {
		t.Fatal(err)
	}
	v, err := typeurl.UnmarshalAny(m.Data)
	if err != nil {
		t.Fatalf("metrics of type %s: %v", m.Data.GetTypeUrl(), err)
	}
	stats, ok := v.(*v2.Metrics)
	if !ok {
		t.Fatalf("metrics are %T, want cgroup v2 metrics", v)
	}
	if stats.GetPids().GetCurrent() < 1 || stats.GetMemory().GetUsage() == 0 {
		t.Fatalf("metrics without pids or memory: %v", stats)
	}

	limit := int64(64 << 20)
	if err := task.Update(ctx, containerd.WithResources(&specs.LinuxResources{Memory: &specs.LinuxMemory{Limit: &limit}})); err != nil {
		t.Fatal(err)
	}
	// The guest's cgroup of the container now has the limit: the metrics the agent reads
	// from it report memory.max as the usage limit.
	m, err = task.Metrics(ctx)
	if err != nil {
		t.Fatal(err)
	}
	v, err = typeurl.UnmarshalAny(m.Data)
	if err != nil {
		t.Fatal(err)
	}
	if got := v.(*v2.Metrics).GetMemory().GetUsageLimit(); got != uint64(limit) {
		t.Fatalf("memory limit in the guest cgroup = %d after update, want %d", got, limit)
	}
	task.Kill(ctx, syscall.SIGKILL)
}
