package fakevm

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"testing"

	"github.com/containerd/errdefs"
	"github.com/containerd/errdefs/pkg/errgrpc"

	agent "github.com/caisson-containers/caisson/api/agent/v1"
	"github.com/caisson-containers/caisson/internal/transport"
	"github.com/caisson-containers/caisson/shim/vmm"
)

// dial connects to vm's agent as the shim does.
func dial(t *testing.T, vm vmm.VM) (agent.SandboxService, agent.ContainersClient, agent.StorageService) {
	t.Helper()
	ctx := context.Background()
	s, err := transport.DialSerial(ctx, vm.Endpoint().Path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	c, err := transport.OpenTTRPC(ctx, s)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return agent.NewSandboxClient(c), agent.NewContainersClient(c), agent.NewStorageClient(c)
}

func TestAgentOverTransport(t *testing.T) {
	ctx := context.Background()
	h := New()
	dir := t.TempDir()
	vm, err := h.New(vmm.Config{StateDir: dir, HotplugSlots: 1})
	if err != nil {
		t.Fatal(err)
	}
	if err := vm.Start(ctx); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { vm.Stop(ctx) })
	sb, ctrs, st := dial(t, vm)
	v, err := sb.Version(ctx, &agent.VersionRequest{})
	if err != nil || v.GetApiVersion() != agent.APIVersion {
		t.Fatalf("Version: %v, %v", v, err)
	}
	if _, err := ctrs.Create(ctx, &agent.CreateContainerRequest{ContainerId: "c"}); !errdefs.IsFailedPrecondition(errgrpc.ToNative(err)) {
		t.Fatalf("Create before the sandbox: %v, want FailedPrecondition", err)
	}
	if _, err := sb.Create(ctx, &agent.CreateSandboxRequest{SandboxId: "pod"}); err != nil {
		t.Fatal(err)
	}
	rfs := &agent.Rootfs{Lower: []*agent.StoragePath{{StorageId: "s1"}}}
	if _, err := ctrs.Create(ctx, &agent.CreateContainerRequest{ContainerId: "c", Rootfs: rfs}); !errdefs.IsFailedPrecondition(errgrpc.ToNative(err)) {
		t.Fatalf("Create on an unmounted storage: %v, want FailedPrecondition", err)
	}
	if _, err := st.Mount(ctx, &agent.MountStorageRequest{StorageId: "s1"}); err != nil {
		t.Fatal(err)
	}
	h.Agent.Fail("Containers.Create", errdefs.ErrResourceExhausted)
	if _, err := ctrs.Create(ctx, &agent.CreateContainerRequest{ContainerId: "c", Rootfs: rfs}); !errdefs.IsResourceExhausted(errgrpc.ToNative(err)) {
		t.Fatalf("Create with a failure injected: %v, want ResourceExhausted", err)
	}
	h.Agent.Fail("Containers.Create", nil)
	if _, err := ctrs.Create(ctx, &agent.CreateContainerRequest{ContainerId: "c", Rootfs: rfs}); err != nil {
		t.Fatal(err)
	}
	if _, err := ctrs.Start(ctx, &agent.StartContainerRequest{ContainerId: "c"}); err != nil {
		t.Fatal(err)
	}
	if _, err := ctrs.Delete(ctx, &agent.DeleteContainerRequest{ContainerId: "c"}); !errdefs.IsFailedPrecondition(errgrpc.ToNative(err)) {
		t.Fatalf("Delete of a running container: %v, want FailedPrecondition", err)
	}
	waited := make(chan *agent.WaitResponse, 1)
	go func() {
		r, _ := ctrs.Wait(ctx, &agent.WaitRequest{ContainerId: "c"})
		waited <- r
	}()
	if err := h.Agent.Exit("c", "", 3); err != nil {
		t.Fatal(err)
	}
	if r := <-waited; r.GetExit().GetExitStatus() != 3 {
		t.Fatalf("Wait: %v, want exit 3", r)
	}
	if _, err := ctrs.Delete(ctx, &agent.DeleteContainerRequest{ContainerId: "c"}); err != nil {
		t.Fatal(err)
	}
	want := []string{"Sandbox.Version", "Containers.Create c", "Sandbox.Create pod", "Containers.Create c", "Storage.Mount s1",
		"Containers.Create c", "Containers.Create c", "Containers.Start c", "Containers.Delete c", "Containers.Wait c", "Containers.Delete c"}
	if got := h.Agent.Methods(""); !slices.Equal(got, want) {
		t.Errorf("calls:\n got %q\nwant %q", got, want)
	}
}

func TestVMDisksAndStop(t *testing.T) {
	ctx := context.Background()
	h := New()
	dir := t.TempDir()
	layer := filepath.Join(dir, "layer")
	if err := os.WriteFile(layer, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	vm, err := h.New(vmm.Config{StateDir: filepath.Join(dir, "vm"), HotplugSlots: 1, Disks: []vmm.Disk{{ID: "boot", Path: layer}}})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := vm.AttachDisk(ctx, vmm.Disk{ID: "d", Path: layer}); err == nil {
		t.Fatal("AttachDisk before Start succeeded")
	}
	if err := vm.Start(ctx); err != nil {
		t.Fatal(err)
	}
	if vm.Pid() <= 0 || vm.Pid() == os.Getpid() {
		t.Fatalf("Pid %d: want a process of its own", vm.Pid())
	}
	if _, err := vm.AttachDisk(ctx, vmm.Disk{ID: "d", Path: layer}); err != nil {
		t.Fatal(err)
	}
	if _, err := vm.AttachDisk(ctx, vmm.Disk{ID: "e", Path: layer}); !errdefs.IsResourceExhausted(err) {
		t.Fatalf("AttachDisk beyond the hot-plug slots: %v", err)
	}
	if err := vm.DetachDisk(ctx, "boot"); err != nil {
		t.Fatal(err)
	}
	if err := vm.DetachDisk(ctx, "boot"); !errdefs.IsNotFound(err) {
		t.Fatalf("second DetachDisk: %v, want NotFound", err)
	}
	if err := vm.Stop(ctx); err != nil {
		t.Fatal(err)
	}
	if err := vm.Wait(); err != nil {
		t.Fatalf("Wait after Stop: %v", err)
	}
	if err := vm.Stop(ctx); err != nil {
		t.Fatalf("second Stop: %v", err)
	}
	if _, err := os.Stat(vm.Endpoint().Path); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("agent socket after Stop: %v", err)
	}
	f := h.VMs()[0]
	want := []Event{"start", "attach d", "detach boot", "stop"}
	if got := f.Events(); !slices.Equal(got, want) {
		t.Errorf("events %q, want %q", got, want)
	}
	if got := f.Disks(); len(got) != 1 || got[0].ID != "d" {
		t.Errorf("disks after Stop %v, want d only (Stop does not detach)", got)
	}
}

func TestVMCrash(t *testing.T) {
	ctx := context.Background()
	h := New()
	vm, err := h.New(vmm.Config{StateDir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	if err := vm.Start(ctx); err != nil {
		t.Fatal(err)
	}
	if err := h.VMs()[0].Crash(); err != nil {
		t.Fatal(err)
	}
	var ee *vmm.ExitError
	if err := vm.Wait(); !errors.As(err, &ee) {
		t.Fatalf("Wait after a crash: %v, want an ExitError", err)
	}
	if err := vm.Stop(ctx); err != nil {
		t.Fatalf("Stop after a crash: %v", err)
	}
}

func TestFailedStartLeavesNothing(t *testing.T) {
	ctx := context.Background()
	h := New()
	h.Fail(OpStart, errdefs.ErrUnavailable)
	dir := t.TempDir()
	vm, err := h.New(vmm.Config{StateDir: dir})
	if err != nil {
		t.Fatal(err)
	}
	if err := vm.Start(ctx); !errdefs.IsUnavailable(err) {
		t.Fatalf("Start: %v, want the injected failure", err)
	}
	select {
	case <-vm.Done():
	default:
		t.Fatal("Done open after a failed Start")
	}
	if vm.Pid() != 0 {
		t.Fatalf("Pid %d after a failed Start", vm.Pid())
	}
	if _, err := os.Stat(vm.Endpoint().Path); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("agent socket after a failed Start: %v", err)
	}
}
