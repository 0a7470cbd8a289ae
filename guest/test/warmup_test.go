package test

import (
	"os"
	"strings"
	"testing"
	"time"

	"github.com/containerd/errdefs"
	"github.com/containerd/errdefs/pkg/errgrpc"

	agent "github.com/caisson-containers/caisson/api/agent/v1"
)

// TestGuestWarmUp: a Check with devices_ready, as the shim sends before it saves a VM
// template, runs the agent's warm-up once in the real guest (its debug line on the
// console, no warning); Sandbox.WarmUp, as a warm VM's shim sends, runs it again each
// time until the sandbox exists, and is FailedPrecondition after; the pod and its
// containers work after it as before.
func TestGuestWarmUp(t *testing.T) {
	g := bootGuest(t, layerDisks(t), 0)
	ctx := ctxT(t)
	for i := 0; i < 2; i++ { // the second Check does not warm up again
		if _, err := g.sandbox.Check(ctx, &agent.CheckRequest{DevicesReady: true}); err != nil {
			t.Fatalf("Check with devices_ready: %v", err)
		}
	}
	waitWarmUps(t, g, 1)
	for i := 0; i < 2; i++ {
		if _, err := g.sandbox.WarmUp(ctx, &agent.WarmUpRequest{}); err != nil {
			t.Fatalf("WarmUp: %v", err)
		}
	}
	waitWarmUps(t, g, 3)

	if _, err := g.sandbox.Create(ctx, &agent.CreateSandboxRequest{SandboxId: "pod", Hostname: "pod"}); err != nil {
		t.Fatal(err)
	}
	if _, err := g.sandbox.WarmUp(ctx, &agent.WarmUpRequest{}); !errdefs.IsFailedPrecondition(errgrpc.ToNative(err)) {
		t.Fatalf("WarmUp after the sandbox's creation: %v, want FailedPrecondition", err)
	}
	g.mountLayers(t)
	// The pod's namespaces were made by the warm-up (sandbox.Prepare): the host name
	// is the pod's all the same.
	spec := testSpec("sh", "-c", "cat /etc/layer; hostname")
	spec.Hostname = ""
	r := g.run(t, "after-warm-up", spec)
	if r.stdout != "top\npod\n" || r.stderr != "" || r.exit != 0 {
		t.Errorf("container after the warm-up: %+v", r)
	}
}

// waitWarmUps checks that the guest's console says n warm-ups ran, none failed.
func waitWarmUps(t *testing.T, g *guestVM, n int) {
	t.Helper()
	// The agent logs before it answers; the console file follows QEMU's output.
	var console string
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(100 * time.Millisecond) {
		b, _ := os.ReadFile(g.console)
		console = string(b)
		if strings.Count(console, "container runtime warmed up") >= n || time.Now().After(deadline) {
			break
		}
	}
	if got := strings.Count(console, "container runtime warmed up"); got != n {
		t.Errorf("the console has %d warm-ups, want %d:\n%s", got, n, tail(console, 3000))
	}
	if strings.Contains(console, "container runtime warm-up") || strings.Contains(console, "pod namespaces ahead") {
		t.Errorf("the warm-up failed:\n%s", tail(console, 3000))
	}
}
