package vmboot

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"

	"github.com/containerd/errdefs"
	"github.com/containerd/ttrpc"

	agent "github.com/caisson-containers/caisson/api/agent/v1"
	"github.com/caisson-containers/caisson/shim/internal/fakevm"
	"github.com/caisson-containers/caisson/shim/vmm"
)

func testConfig(t *testing.T) vmm.Config {
	dir := t.TempDir()
	return vmm.Config{Kernel: "/nonexistent/vmlinuz", StateDir: filepath.Join(dir, "vm"), ConsoleLog: filepath.Join(dir, "console.log")}
}

// TestBoot boots a fake VM: Started runs once the VM does and before the agent is
// dialed, the caller's interceptor sees the boot's calls, the agent's version is
// returned, and Close hangs up with the VM left running.
func TestBoot(t *testing.T) {
	hv := fakevm.New()
	ctx := context.Background()
	var started []fakevm.Call
	var (
		mu          sync.Mutex
		intercepted []string
	)
	// Check's answer is held until Version has gone out too: a boot that waited for
	// Check before sending Version would wait here for ever (until the boot's timeout).
	versionSent := make(chan struct{})
	g, err := Boot(ctx, hv, testConfig(t), Options{
		Started: func(vm vmm.VM) error {
			if vm.Pid() == 0 {
				t.Error("Started before the VMM runs")
			}
			started = hv.Agent.Calls()
			return nil
		},
		ClientOpts: []ttrpc.ClientOpts{ttrpc.WithUnaryClientInterceptor(
			func(ctx context.Context, req *ttrpc.Request, resp *ttrpc.Response, info *ttrpc.UnaryClientInfo, inv ttrpc.Invoker) error {
				mu.Lock()
				intercepted = append(intercepted, info.FullMethod)
				mu.Unlock()
				if strings.HasSuffix(info.FullMethod, "/Version") {
					close(versionSent)
					return inv(ctx, req, resp)
				}
				err := inv(ctx, req, resp)
				select {
				case <-versionSent:
					return err
				case <-ctx.Done(): // the boot's timeout
					return fmt.Errorf("%s answered, Version never sent: %w", info.FullMethod, ctx.Err())
				}
			})},
	})
	if err != nil {
		t.Fatal(err)
	}
	defer g.VM.Stop(ctx)
	if len(started) != 0 {
		t.Errorf("the agent was called before Started: %v", started)
	}
	slices.Sort(intercepted)
	if want := []string{"/caisson.agent.v1.Sandbox/Check", "/caisson.agent.v1.Sandbox/Version"}; !slices.Equal(intercepted, want) {
		t.Errorf("intercepted %v, want %v", intercepted, want)
	}
	if g.Agent.GetApiVersion() != agent.APIVersion || g.Agent.GetAgentVersion() != fakevm.Version {
		t.Errorf("agent %v", g.Agent)
	}
	if err := g.Close(); err != nil {
		t.Fatal(err)
	}
	vm := hv.VMs()[0]
	if !vm.Running() {
		t.Error("Close stopped the VM")
	}
	if err := g.VM.Stop(ctx); err != nil {
		t.Fatal(err)
	}
}

// TestBootFails fails a boot at each step: the error says why (quoting the guest's
// console when the guest was up), and no VM is left running.
func TestBootFails(t *testing.T) {
	boom := errors.New("boom")
	for _, tc := range []struct {
		name    string
		setup   func(*fakevm.Hypervisor, *Options)
		want    error
		message string
	}{
		{name: "new", setup: func(h *fakevm.Hypervisor, _ *Options) { h.Fail(fakevm.OpNew, boom) }, want: boom},
		{name: "start", setup: func(h *fakevm.Hypervisor, _ *Options) { h.Fail(fakevm.OpStart, boom) }, want: boom, message: "start VM"},
		{name: "started hook", setup: func(_ *fakevm.Hypervisor, o *Options) {
			o.Started = func(vmm.VM) error { return boom }
		}, want: boom},
		{name: "agent refuses", setup: func(h *fakevm.Hypervisor, _ *Options) {
			h.Agent.Fail("Sandbox.Check", errdefs.ErrUnavailable)
		}, want: errdefs.ErrUnavailable, message: "the guest says why"},
		{name: "version", setup: func(h *fakevm.Hypervisor, _ *Options) {
			h.Agent.Fail("Sandbox.Version", errdefs.ErrNotImplemented)
		}, want: errdefs.ErrNotImplemented, message: "agent version"},
		{name: "another API version", setup: func(h *fakevm.Hypervisor, _ *Options) {
			h.Agent.APIVersion = "v1"
		}, want: errdefs.ErrFailedPrecondition, message: "rebuild the guest image"},
		{name: "VM dies while booting", setup: func(_ *fakevm.Hypervisor, o *Options) {
			o.Started = func(vm vmm.VM) error { return vm.(*fakevm.VM).Crash() }
		}, message: "VM ended while booting"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			hv := fakevm.New()
			cfg := testConfig(t)
			if err := os.WriteFile(cfg.ConsoleLog, []byte("early noise\nthe guest says why\n"), 0o600); err != nil {
				t.Fatal(err)
			}
			var o Options
			tc.setup(hv, &o)
			g, err := Boot(context.Background(), hv, cfg, o)
			if err == nil {
				g.VM.Stop(context.Background())
				t.Fatal("Boot succeeded")
			}
			t.Logf("Boot: %v", err)
			if tc.want != nil && !errors.Is(err, tc.want) {
				t.Errorf("got %v, want %v", err, tc.want)
			}
			if !strings.Contains(err.Error(), tc.message) {
				t.Errorf("error %q does not say %q", err, tc.message)
			}
			for _, vm := range hv.VMs() {
				if vm.Running() {
					t.Error("VM left running after a failed boot")
				}
			}
		})
	}
}

// TestBootGivesUp: a boot whose context ends while the agent does not answer returns
// the context's error, with the VM stopped.
func TestBootGivesUp(t *testing.T) {
	hv := fakevm.New()
	ctx, cancel := context.WithCancel(context.Background())
	_, err := Boot(ctx, hv, testConfig(t), Options{Started: func(vmm.VM) error {
		cancel()
		return nil
	}})
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("got %v, want the context's error", err)
	}
	if hv.VMs()[0].Running() {
		t.Error("VM left running")
	}
}
