package integration

import (
	"fmt"
	"os"
	"strings"
	"sync"
	"testing"

	runtime "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/caisson-containers/caisson/integration-tests/harness"
)

// TestCRIConcurrentPods starts five pods at once, each with an app container; all reach
// Running, each in its own VM with its own address; after removal nothing is left (no
// QEMU, tap, network namespace, veth, mount, loop device or pod state directory).
func TestCRIConcurrentPods(t *testing.T) {
	const n = 5
	c := harness.StartCRI(t, harness.Options{})
	ctx := c.Ctx(t)
	image := c.Pull(t, c.BusyboxRef, harness.Handler)

	pods := make([]string, n)
	ctrs := make([]string, n)
	errs := make([]error, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() {
			cfg := c.PodConfig(fmt.Sprintf("concurrent-%d", i), nil)
			if err := mkdirLog(cfg); err != nil {
				errs[i] = err
				return
			}
			resp, err := c.Runtime.RunPodSandbox(ctx, &runtime.RunPodSandboxRequest{Config: cfg, RuntimeHandler: harness.Handler})
			if err != nil {
				errs[i] = fmt.Errorf("RunPodSandbox: %w", err)
				return
			}
			pods[i] = resp.PodSandboxId
			id, err := c.CreateContainer(ctx, pods[i], cfg, harness.ContainerConfig("app", image, "sleep", "100000"))
			if err != nil {
				errs[i] = fmt.Errorf("CreateContainer: %w", err)
				return
			}
			if _, err := c.Runtime.StartContainer(ctx, &runtime.StartContainerRequest{ContainerId: id}); err != nil {
				errs[i] = fmt.Errorf("StartContainer: %w", err)
				return
			}
			ctrs[i] = id
		})
	}
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Errorf("pod %d: %v", i, err)
		}
	}
	if t.Failed() {
		t.FailNow()
	}
	ips := map[string]bool{}
	for i := range n {
		st, err := c.Runtime.ContainerStatus(ctx, &runtime.ContainerStatusRequest{ContainerId: ctrs[i]})
		if err != nil || st.Status.State != runtime.ContainerState_CONTAINER_RUNNING {
			t.Fatalf("pod %d's container: %v %v", i, st.GetStatus(), err)
		}
		ip := c.PodIP(t, pods[i])
		out, _, _ := c.Exec(t, ctrs[i], "busybox", "ip", "-4", "addr", "show", "eth0")
		if !strings.Contains(out, " "+ip+"/") || ips[ip] {
			t.Fatalf("pod %d: eth0 %q, want its own %s", i, out, ip)
		}
		ips[ip] = true
	}
	if got := len(c.QEMUs()); got != n {
		t.Fatalf("%d QEMU processes for %d pods", got, n)
	}

	for i := range n {
		wg.Go(func() { c.RemovePod(t, pods[i]) })
	}
	wg.Wait()
	if left := c.Leftovers(); len(left) > 0 {
		t.Fatalf("after removing the pods:\n  %s", strings.Join(left, "\n  "))
	}
}

func mkdirLog(cfg *runtime.PodSandboxConfig) error {
	return os.MkdirAll(cfg.LogDirectory, 0o755)
}
