package integration

import (
	"os"
	"strings"
	"testing"

	runtime "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/caisson-containers/caisson/integration-tests/harness"
)

// TestCRISecurityBadInput: a container's security context that no runtime can honour
// (critest has no spec for these) fails its CreateContainer or StartContainer with an
// error naming what is wrong, on runc (the control) and on Caisson alike, and the pod
// keeps running containers afterwards. One deliberate difference: runc only logs an
// unknown capability and runs the container without it; Caisson refuses it, as the
// log would be the guest's, which nobody reads.
func TestCRISecurityBadInput(t *testing.T) {
	c := harness.StartCRI(t, harness.Options{})
	for _, handler := range []string{harness.RuncHandler, harness.Handler} {
		t.Run(handler, func(t *testing.T) {
			ctx := c.Ctx(t)
			image := c.Pull(t, c.BusyboxRef, handler)
			cfg := c.PodConfig("security-"+handler, nil)
			pod := c.RunPod(t, cfg, handler)
			for _, tc := range []struct {
				name   string
				adjust func(*runtime.LinuxContainerConfig)
				// pod, if set, makes the container's own pod: the CRI puts a pod's
				// sysctls into each of its containers' specs.
				pod   func(*runtime.PodSandboxConfig)
				words []string
				// runcAccepts: the control runs the container (runc ignores it).
				runcAccepts bool
			}{{
				name: "unknown capability",
				adjust: func(l *runtime.LinuxContainerConfig) {
					l.SecurityContext = &runtime.LinuxContainerSecurityContext{
						Capabilities: &runtime.Capability{AddCapabilities: []string{"CAP_NO_SUCH_THING"}},
					}
				},
				words:       []string{"CAP_NO_SUCH_THING"},
				runcAccepts: true,
			}, {
				name: "seccomp profile that does not exist",
				adjust: func(l *runtime.LinuxContainerConfig) {
					l.SecurityContext = &runtime.LinuxContainerSecurityContext{
						Seccomp: &runtime.SecurityProfile{ProfileType: runtime.SecurityProfile_Localhost, LocalhostRef: "/caisson-test/no-such-profile.json"},
					}
				},
				words: []string{"/caisson-test/no-such-profile.json"},
			}, {
				name:   "sysctl outside the container's namespaces",
				adjust: func(*runtime.LinuxContainerConfig) {},
				pod: func(p *runtime.PodSandboxConfig) {
					p.Linux.Sysctls = map[string]string{"vm.swappiness": "10"}
				},
				words: []string{"vm.swappiness"},
			}} {
				t.Run(tc.name, func(t *testing.T) {
					podCfg, podID := cfg, pod
					if tc.pod != nil {
						podCfg = c.PodConfig("sysctl-"+handler, tc.pod)
						if err := os.MkdirAll(podCfg.LogDirectory, 0o755); err != nil {
							t.Fatal(err)
						}
						resp, err := c.Runtime.RunPodSandbox(ctx, &runtime.RunPodSandboxRequest{Config: podCfg, RuntimeHandler: handler})
						if err != nil {
							expectSays(t, err, tc.words)
							return
						}
						podID = resp.PodSandboxId
						defer c.RemovePod(t, podID)
					}
					cc := harness.ContainerConfig("bad", image, "sleep", "60")
					tc.adjust(cc.Linux)
					id, err := c.CreateContainer(ctx, podID, podCfg, cc)
					if err == nil {
						_, err = c.Runtime.StartContainer(ctx, &runtime.StartContainerRequest{ContainerId: id})
						c.Runtime.RemoveContainer(ctx, &runtime.RemoveContainerRequest{ContainerId: id})
					}
					if tc.runcAccepts && handler == harness.RuncHandler {
						if err != nil {
							t.Errorf("runc refused it (%v): Caisson's refusal is no longer a difference", err)
						}
						return
					}
					expectSays(t, err, tc.words)
				})
			}
			// The pod still runs a container.
			id := c.StartContainer(t, pod, cfg, harness.ContainerConfig("good", image, "sleep", "60"))
			if out, _, code := c.Exec(t, id, "echo", "ok"); code != 0 || out != "ok\n" {
				t.Errorf("exec after the failures: %q, exit %d", out, code)
			}
			c.RemovePod(t, pod)
		})
	}
	if left := c.Leftovers(); len(left) > 0 {
		t.Errorf("left after the pods: %v", left)
	}
}

func expectSays(t *testing.T, err error, words []string) {
	t.Helper()
	if err == nil {
		t.Fatalf("no error, want one saying %q", words)
	}
	for _, w := range words {
		if !strings.Contains(err.Error(), w) {
			t.Fatalf("error %q does not say %q", err, w)
		}
	}
	t.Logf("error: %v", err)
}
