package test

import (
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/containerd/errdefs"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"
	"google.golang.org/protobuf/types/known/timestamppb"

	agent "github.com/caisson-containers/caisson/api/agent/v1"
	"github.com/caisson-containers/caisson/shim/vmm"
)

// TestGuestPod runs a pod as CRI does: the pause container first, then two containers
// that share its network, IPC and UTS namespaces (and, as the pod asks, its PID one):
// one reaches the other's localhost listener.
func TestGuestPod(t *testing.T) {
	g := bootGuest(t, layerDisks(t), 0)
	g.mountLayers(t)
	ctx := ctxT(t)
	if _, err := g.sandbox.Create(ctx, &agent.CreateSandboxRequest{
		SandboxId: "pod", Hostname: "pod-host", SharePid: true,
		Hosts: []*agent.HostEntry{{Ip: "10.1.2.3", Names: []string{"backend"}}},
		Dns:   &agent.DNS{Servers: []string{"10.0.0.53"}},
		Time:  timestamppb.Now(),
	}); err != nil {
		t.Fatal(err)
	}
	// CRI's specs name the host's namespaces and files; the agent replaces them.
	podSpec := func(args ...string) *specs.Spec {
		s := testSpec(args...)
		s.Hostname = "pod-host"
		for i := range s.Linux.Namespaces {
			if s.Linux.Namespaces[i].Type == specs.NetworkNamespace {
				s.Linux.Namespaces[i].Path = "/var/run/netns/cni-host-only"
			}
		}
		s.Mounts = append(s.Mounts,
			specs.Mount{Destination: "/etc/hosts", Type: "bind", Source: "/var/lib/containerd/sandboxes/pod/hosts", Options: []string{"rbind", "ro"}},
			specs.Mount{Destination: "/etc/resolv.conf", Type: "bind", Source: "/var/lib/containerd/sandboxes/pod/resolv.conf", Options: []string{"rbind", "ro"}})
		return s
	}
	g.start(t, "pause", podSpec("sleep", "1000"), &agent.Stdio{})
	g.start(t, "server", podSpec("nc", "-l", "-p", "8080", "-e", "echo", "hello-from-server"), &agent.Stdio{})
	r := g.run(t, "client", podSpec("sh", "-c", `
		for i in $(seq 100); do nc 127.0.0.1 8080 2>/dev/null && break; sleep 0.1; done
		hostname; grep backend /etc/hosts; cat /etc/resolv.conf
		tr '\0' ' ' < /proc/1/cmdline; echo
		for n in net ipc uts; do readlink /proc/self/ns/$n; done`))
	if r.exit != 0 {
		t.Fatalf("client: %+v", r)
	}
	lines := strings.Split(strings.TrimSpace(r.stdout), "\n")
	want := []string{"hello-from-server", "pod-host", "10.1.2.3\tbackend", "nameserver 10.0.0.53", "sleep 1000 "}
	if len(lines) != len(want)+3 {
		t.Fatalf("client output %q", r.stdout)
	}
	for i, w := range want {
		if lines[i] != w {
			t.Errorf("line %d: %q, want %q", i, lines[i], w)
		}
	}
	clientNS := lines[len(want):]

	// The pause container is in the same namespaces.
	proc, _ := json.Marshal(&specs.Process{Args: []string{"sh", "-c", "for n in net ipc uts; do readlink /proc/self/ns/$n; done"}, Cwd: "/", Env: []string{"PATH=/bin"}})
	if _, err := g.exec.Create(ctx, &agent.CreateExecRequest{ContainerId: "pause", ExecId: "ns", Process: proc, Stdio: &agent.Stdio{Stdout: true}}); err != nil {
		t.Fatal(err)
	}
	out := readAll(g.stdio(t, "pause", "ns", agent.StreamKind_STREAM_KIND_STDOUT))
	if _, err := g.exec.Start(ctx, &agent.StartExecRequest{ContainerId: "pause", ExecId: "ns"}); err != nil {
		t.Fatal(err)
	}
	if s := strings.Split(strings.TrimSpace(<-out), "\n"); strings.Join(s, ",") != strings.Join(clientNS, ",") {
		t.Errorf("pause namespaces %v, client's %v", s, clientNS)
	}

	for _, id := range []string{"server", "pause"} {
		if _, err := g.containers.Signal(ctx, &agent.SignalRequest{ContainerId: id, Signal: uint32(unix.SIGKILL), All: true}); err != nil {
			t.Fatal(err)
		}
		if _, err := g.containers.Wait(ctx, &agent.WaitRequest{ContainerId: id}); err != nil {
			t.Fatal(err)
		}
		g.delete(t, id)
	}
	if _, err := g.sandbox.Create(ctx, &agent.CreateSandboxRequest{SandboxId: "again"}); !errdefs.IsAlreadyExists(native(err)) {
		t.Errorf("second sandbox: %v, want AlreadyExists", err)
	}

	// Destroy kills what is left, unmounts everything and powers the VM off.
	g.start(t, "leftover", podSpec("sleep", "1000"), &agent.Stdio{})
	if _, err := g.sandbox.Destroy(ctx, &agent.DestroySandboxRequest{}); err != nil {
		t.Fatal(err)
	}
	select {
	case <-g.vm.Done():
	case <-ctx.Done():
		t.Fatal("the VM still runs after Sandbox.Destroy")
	}
	err := g.vm.Wait()
	var ee *vmm.ExitError
	if !errors.As(err, &ee) || !strings.Contains(ee.Reason, "powered off") {
		t.Errorf("VM ended with %v, want the guest powering off", err)
	}
}

// TestGuestBadInput sends what the agent must refuse, each with a clear error, and checks
// that it keeps serving.
func TestGuestBadInput(t *testing.T) {
	dir := t.TempDir()
	corrupt := filepath.Join(dir, "corrupt.erofs")
	must(t, os.WriteFile(corrupt, []byte(strings.Repeat("not a filesystem ", 1<<16)), 0o600))
	padTo(t, corrupt, vmm.PMEMAlignment)
	disks := append(layerDisks(t), vmm.Disk{ID: "corrupt", Path: corrupt, ReadOnly: true, Kind: vmm.Block})
	g := bootGuest(t, disks, 0)
	g.mountLayers(t)
	ctx := ctxT(t)

	_, err := g.storage.Mount(ctx, &agent.MountStorageRequest{StorageId: "missing", Fstype: "erofs", TimeoutMs: 500,
		Device: &agent.Device{Kind: agent.DeviceKind_DEVICE_KIND_BLOCK, PciPath: "1e.7/00.0"}})
	check(t, "a device that is not there", err, errdefs.IsNotFound)
	_, err = g.storage.Mount(ctx, &agent.MountStorageRequest{StorageId: "corrupt", Fstype: "erofs",
		Device: &agent.Device{Kind: agent.DeviceKind_DEVICE_KIND_BLOCK, PciPath: g.address(t, "corrupt")}})
	check(t, "a corrupt filesystem", err, errdefs.IsInvalidArgument)
	_, err = g.storage.Mount(ctx, &agent.MountStorageRequest{StorageId: "base", Fstype: "erofs",
		Device: &agent.Device{Kind: agent.DeviceKind_DEVICE_KIND_PMEM, PciPath: g.address(t, "base")}})
	check(t, "a storage id mounted already", err, errdefs.IsAlreadyExists)

	create := func(id string, spec *specs.Spec) error {
		_, err := g.containers.Create(ctx, &agent.CreateContainerRequest{ContainerId: id, Spec: specJSON(t, spec), Rootfs: rootfsFor(id), Stdio: &agent.Stdio{}})
		return err
	}
	err = create("nobin", testSpec("/no/such/binary"))
	check(t, "a binary that does not exist", err, errdefs.IsNotFound)
	rel := testSpec("true")
	rel.Process.Cwd = "relative/dir"
	check(t, "a relative cwd", create("relcwd", rel), errdefs.IsInvalidArgument)
	g.start(t, "dup", testSpec("sleep", "1000"), &agent.Stdio{})
	check(t, "a duplicate container id", create("dup", testSpec("true")), errdefs.IsAlreadyExists)
	_, err = g.containers.Create(ctx, &agent.CreateContainerRequest{ContainerId: "nostorage", Spec: specJSON(t, testSpec("true")),
		Rootfs: &agent.Rootfs{Lower: []*agent.StoragePath{{StorageId: "nope"}}}})
	check(t, "a rootfs on a storage that is not mounted", err, errdefs.IsNotFound)
	_, err = g.containers.Create(ctx, &agent.CreateContainerRequest{ContainerId: "badjson", Spec: []byte("{"), Rootfs: rootfsFor("badjson")})
	check(t, "a spec that is not JSON", err, errdefs.IsInvalidArgument)
	_, err = g.containers.Start(ctx, &agent.StartContainerRequest{ContainerId: "unknown"})
	check(t, "start of an unknown container", err, errdefs.IsNotFound)
	_, err = g.containers.Wait(ctx, &agent.WaitRequest{ContainerId: "unknown"})
	check(t, "wait for an unknown container", err, errdefs.IsNotFound)
	_, err = g.containers.Signal(ctx, &agent.SignalRequest{ContainerId: "dup", ExecId: "unknown", Signal: 9})
	check(t, "signal to an unknown exec", err, errdefs.IsNotFound)
	_, err = g.storage.Unmount(ctx, &agent.UnmountStorageRequest{StorageId: "base"})
	check(t, "unmount of a storage a container uses", err, errdefs.IsFailedPrecondition)

	// Still serving, and the failed creates left nothing behind.
	if r := g.run(t, "after", testSpec("echo", "still serving")); r.stdout != "still serving\n" {
		t.Errorf("after the errors: %+v", r)
	}
	for _, id := range []string{"nobin", "relcwd", "nostorage", "badjson"} {
		if err := create(id, testSpec("true")); err != nil {
			t.Errorf("id %s still taken after its failed create: %v", id, err)
		}
	}
}

func check(t *testing.T, what string, err error, is func(error) bool) {
	t.Helper()
	if !is(native(err)) {
		t.Errorf("%s: %v", what, err)
		return
	}
	t.Logf("%s: %v", what, err)
}
