package integration

import (
	"net"
	"strconv"
	"testing"

	runtime "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/caisson-containers/caisson/integration-tests/harness"
)

// TestCRIHostPort: a pod's port_mappings with a host_port (Kubernetes hostPort) reach the
// pod's server from the host, through the CNI portmap plugin as on any node: at the
// host's address on the pod bridge and at 127.0.0.1. runc first, as the control, then
// Caisson, in the same containerd; each pod's mapping is gone with it.
func TestCRIHostPort(t *testing.T) {
	c := harness.StartCRI(t, harness.Options{})
	for _, handler := range []string{harness.RuncHandler, harness.Handler} {
		t.Run(handler, func(t *testing.T) {
			image := c.Pull(t, c.BusyboxRef, handler)
			port := freePort(t)
			line := "hostport-" + handler
			cfg := c.PodConfig("hostport-"+handler, func(p *runtime.PodSandboxConfig) {
				p.PortMappings = []*runtime.PortMapping{{Protocol: runtime.Protocol_TCP, ContainerPort: 8080, HostPort: int32(port)}}
			})
			pod := c.RunPod(t, cfg, handler)
			c.StartContainer(t, pod, cfg, harness.ContainerConfig("server", image, tcpServer(8080, line)...))
			for _, host := range []string{c.CNI.Gateway.String(), "127.0.0.1"} {
				addr := net.JoinHostPort(host, strconv.Itoa(port))
				if got, err := dialLine(addr); err != nil || got != line {
					t.Errorf("%s: got %q, %v; want %q", addr, got, err, line)
				}
			}
			c.RemovePod(t, pod)
			if left := c.Leftovers(); len(left) > 0 {
				t.Errorf("left after the pod: %v", left)
			}
			if got, err := dialLine(net.JoinHostPort(c.CNI.Gateway.String(), strconv.Itoa(port))); err == nil {
				t.Errorf("the host port still answers %q after the pod was removed", got)
			}
		})
	}
}
