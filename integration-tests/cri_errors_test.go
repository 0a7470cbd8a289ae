package integration

import (
	"strings"
	"testing"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	runtime "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/caisson-containers/caisson/integration-tests/harness"
)

// TestCRIBadInput: each mistake gets a CRI error that says what is wrong, leaves
// nothing behind, and the node keeps running pods afterwards.
func TestCRIBadInput(t *testing.T) {
	c := harness.StartCRI(t, harness.Options{})
	ctx := c.Ctx(t)
	image := c.Pull(t, c.BusyboxRef, harness.Handler)

	expect := func(t *testing.T, err error, words ...string) {
		t.Helper()
		if err == nil {
			t.Fatalf("no error, want one saying %q", words)
		}
		for _, w := range words {
			if !strings.Contains(err.Error(), w) {
				t.Fatalf("error %q does not say %q", err, w)
			}
		}
		if left := c.Leftovers(); len(left) > 0 {
			t.Fatalf("after the failure:\n  %s", strings.Join(left, "\n  "))
		}
	}
	runPod := func(name string, adjust func(*runtime.PodSandboxConfig)) error {
		cfg := c.PodConfig(name, adjust)
		_, err := c.Runtime.RunPodSandbox(ctx, &runtime.RunPodSandboxRequest{Config: cfg, RuntimeHandler: harness.Handler})
		return err
	}

	t.Run("image that does not exist", func(t *testing.T) {
		_, err := c.Images.PullImage(ctx, &runtime.PullImageRequest{
			Image: &runtime.ImageSpec{Image: c.Registry.Host + "/caisson-test/nothing:1", RuntimeHandler: harness.Handler}})
		expect(t, err, "caisson-test/nothing:1", "not found")
	})
	t.Run("unknown runtime option", func(t *testing.T) {
		err := runPod("bad-option", func(p *runtime.PodSandboxConfig) {
			p.Annotations = map[string]string{"io.caisson.config.hypervisor.bogus": "1"}
		})
		expect(t, err, "io.caisson.config.hypervisor.bogus", "pod_annotations")
		if status.Code(err) != codes.InvalidArgument {
			t.Errorf("code %s, want InvalidArgument", status.Code(err))
		}
	})
	t.Run("memory below the VM minimum", func(t *testing.T) {
		err := runPod("bad-memory", func(p *runtime.PodSandboxConfig) {
			p.Annotations = map[string]string{"io.caisson.config.hypervisor.memory_mib": "64"}
		})
		expect(t, err, "memory_mib", "at least 128 MiB")
	})
	t.Run("host network", func(t *testing.T) {
		err := runPod("bad-hostnet", func(p *runtime.PodSandboxConfig) {
			p.Linux.SecurityContext = &runtime.LinuxSandboxSecurityContext{NamespaceOptions: &runtime.NamespaceOption{Network: runtime.NamespaceMode_NODE}}
		})
		expect(t, err, "host-network pods")
	})

	// A good pod, in which a container's image and then its command do not exist.
	podCfg := c.PodConfig("good", nil)
	pod := c.RunPod(t, podCfg, harness.Handler)
	t.Run("container image that does not exist", func(t *testing.T) {
		_, err := c.CreateContainer(ctx, pod, podCfg, harness.ContainerConfig("noimage", c.Registry.Host+"/caisson-test/nothing:1", "true"))
		if err == nil || !strings.Contains(err.Error(), "caisson-test/nothing:1") || !strings.Contains(err.Error(), "not found") {
			t.Fatalf("CreateContainer with a missing image: %v", err)
		}
	})
	t.Run("command that does not exist", func(t *testing.T) {
		id, err := c.CreateContainer(ctx, pod, podCfg, harness.ContainerConfig("nocmd", image, "/bin/no-such-program"))
		if err == nil {
			_, err = c.Runtime.StartContainer(ctx, &runtime.StartContainerRequest{ContainerId: id})
		}
		if err == nil || !strings.Contains(err.Error(), "/bin/no-such-program") {
			t.Fatalf("a container running /bin/no-such-program: %v", err)
		}
		t.Log(err)
	})
	// The pod still works.
	ok := c.StartContainer(t, pod, podCfg, harness.ContainerConfig("ok", image, "sleep", "100000"))
	if out, _, code := c.Exec(t, ok, "echo", "still-working"); code != 0 || strings.TrimSpace(out) != "still-working" {
		t.Fatalf("exec after the failures: %q exit %d", out, code)
	}
	c.RemovePod(t, pod)
	if left := c.Leftovers(); len(left) > 0 {
		t.Fatalf("after RemovePodSandbox:\n  %s", strings.Join(left, "\n  "))
	}
}
