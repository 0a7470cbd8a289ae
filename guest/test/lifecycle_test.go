package test

import (
	"encoding/json"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/containerd/cgroups/v3/cgroup2/stats"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"
	"google.golang.org/protobuf/types/known/timestamppb"

	agent "github.com/caisson-containers/caisson/api/agent/v1"
	"github.com/caisson-containers/caisson/shim/vmm"
)

// TestGuestLifecycle covers what a running pod goes through: a layer hot-plugged and
// mounted at once (the agent waits for the device), stats, resource updates, an OOM
// kill reported as an event, the guest clock, and reusing an exec id.
func TestGuestLifecycle(t *testing.T) {
	g := bootGuest(t, layerDisks(t), 1)
	g.mountLayers(t)
	ctx := ctxT(t)

	t.Run("hot-plugged layer", func(t *testing.T) {
		dir := t.TempDir()
		src := filepath.Join(dir, "src")
		must(t, os.MkdirAll(src, 0o755))
		must(t, os.WriteFile(filepath.Join(src, "hot"), []byte("plugged\n"), 0o644))
		img := filepath.Join(dir, "hot.erofs")
		if out, err := execCommand("mkfs.erofs", img, src); err != nil {
			t.Fatalf("mkfs.erofs: %v: %s", err, out)
		}
		padTo(t, img, vmm.PMEMAlignment)
		addr, err := g.vm.AttachDisk(ctx, vmm.Disk{ID: "hot", Path: img, ReadOnly: true, Kind: vmm.PMEM})
		if err != nil {
			t.Fatal(err)
		}
		resp, err := g.storage.Mount(ctx, &agent.MountStorageRequest{StorageId: "hot", Fstype: "erofs", Dax: true,
			Device: &agent.Device{Kind: agent.DeviceKind_DEVICE_KIND_PMEM, PciPath: string(addr.PCIPath)}})
		if err != nil {
			t.Fatal(err)
		}
		if !strings.HasPrefix(resp.DevicePath, "/dev/pmem") {
			t.Errorf("hot-plugged pmem is %s", resp.DevicePath)
		}
		spec := testSpec("cat", "/hot")
		if _, err := g.containers.Create(ctx, &agent.CreateContainerRequest{ContainerId: "hot", Spec: specJSON(t, spec),
			Rootfs: &agent.Rootfs{Lower: []*agent.StoragePath{{StorageId: "hot"}, {StorageId: "base"}}}, Stdio: &agent.Stdio{Stdout: true}}); err != nil {
			t.Fatal(err)
		}
		out := readAll(g.stdio(t, "hot", "", agent.StreamKind_STREAM_KIND_STDOUT))
		if _, err := g.containers.Start(ctx, &agent.StartContainerRequest{ContainerId: "hot"}); err != nil {
			t.Fatal(err)
		}
		if s := <-out; s != "plugged\n" {
			t.Errorf("read from the hot-plugged layer: %q", s)
		}
		if _, err := g.containers.Wait(ctx, &agent.WaitRequest{ContainerId: "hot"}); err != nil {
			t.Fatal(err)
		}
		g.delete(t, "hot")
		if _, err := g.storage.Unmount(ctx, &agent.UnmountStorageRequest{StorageId: "hot"}); err != nil {
			t.Fatal(err)
		}
	})

	t.Run("disk by serial", func(t *testing.T) {
		addr, err := g.vm.Address("top")
		if err != nil || addr.Serial == "" {
			t.Fatalf("address of top: %+v, %v", addr, err)
		}
		resp, err := g.storage.Mount(ctx, &agent.MountStorageRequest{StorageId: "top-by-serial", Fstype: "erofs", Options: []string{"ro"},
			Device: &agent.Device{Kind: agent.DeviceKind_DEVICE_KIND_BLOCK, Serial: addr.Serial}})
		if err != nil {
			t.Fatal(err)
		}
		byPath, err := g.storage.Mount(ctx, &agent.MountStorageRequest{StorageId: "top-by-path", Fstype: "erofs", Options: []string{"ro"},
			Device: &agent.Device{Kind: agent.DeviceKind_DEVICE_KIND_BLOCK, PciPath: string(addr.PCIPath)}})
		if err != nil {
			t.Fatal(err)
		}
		if resp.DevicePath != byPath.DevicePath {
			t.Errorf("serial %q found %s, PCI path %s found %s", addr.Serial, resp.DevicePath, addr.PCIPath, byPath.DevicePath)
		}
		for _, id := range []string{"top-by-serial", "top-by-path"} {
			if _, err := g.storage.Unmount(ctx, &agent.UnmountStorageRequest{StorageId: id}); err != nil {
				t.Fatal(err)
			}
		}
	})

	t.Run("stats, update and OOM", func(t *testing.T) {
		events, err := g.containers.Events(ctx, &agent.EventsRequest{})
		if err != nil {
			t.Fatal(err)
		}
		spec := testSpec("sleep", "1000")
		// As containerd does on cgroup v2: the container sees its own cgroup.
		spec.Linux.Namespaces = append(spec.Linux.Namespaces, specs.LinuxNamespace{Type: specs.CgroupNamespace})
		g.start(t, "limited", spec, &agent.Stdio{})
		resp, err := g.containers.Stats(ctx, &agent.StatsRequest{ContainerId: "limited"})
		if err != nil {
			t.Fatal(err)
		}
		var m stats.Metrics
		if err := resp.Metrics.UnmarshalTo(&m); err != nil {
			t.Fatal(err)
		}
		if m.GetPids().GetCurrent() == 0 || m.GetMemory().GetUsage() == 0 {
			t.Errorf("stats: pids %d memory %d", m.GetPids().GetCurrent(), m.GetMemory().GetUsage())
		}
		// One call reads the other containers it is asked for too; an unknown one, and the
		// container itself, are left out of Also.
		g.start(t, "neighbour", testSpec("sleep", "1000"), &agent.Stdio{})
		resp, err = g.containers.Stats(ctx, &agent.StatsRequest{ContainerId: "limited", Also: []string{"neighbour", "limited", "no-such"}})
		if err != nil {
			t.Fatal(err)
		}
		if len(resp.Also) != 1 || resp.Also["neighbour"] == nil || resp.Metrics == nil {
			t.Fatalf("stats with also: metrics %v, also %v; want limited's and neighbour's alone", resp.Metrics != nil, resp.Also)
		}
		var n stats.Metrics
		if err := resp.Also["neighbour"].UnmarshalTo(&n); err != nil || n.GetPids().GetCurrent() == 0 {
			t.Errorf("neighbour's stats: %v (%v), want its processes", n.GetPids(), err)
		}
		g.containers.Signal(ctx, &agent.SignalRequest{ContainerId: "neighbour", Signal: uint32(unix.SIGKILL), All: true})
		g.containers.Wait(ctx, &agent.WaitRequest{ContainerId: "neighbour"})
		g.delete(t, "neighbour")
		limit := int64(24 << 20)
		res, _ := json.Marshal(&specs.LinuxResources{Memory: &specs.LinuxMemory{Limit: &limit}})
		if _, err := g.containers.Update(ctx, &agent.UpdateContainerRequest{ContainerId: "limited", Resources: res}); err != nil {
			t.Fatal(err)
		}
		if out := g.execOutput(t, "limited", "max", "cat", "/sys/fs/cgroup/memory.max"); out != "25165824\n" {
			t.Errorf("memory.max after update: %q", out)
		}
		// A shell that grows past the limit is killed by the OOM killer.
		proc, _ := json.Marshal(&specs.Process{Args: []string{"sh", "-c", `x=a; while :; do x="$x$x"; done`}, Cwd: "/", Env: []string{"PATH=/bin"}})
		if _, err := g.exec.Create(ctx, &agent.CreateExecRequest{ContainerId: "limited", ExecId: "hog", Process: proc, Stdio: &agent.Stdio{}}); err != nil {
			t.Fatal(err)
		}
		if _, err := g.exec.Start(ctx, &agent.StartExecRequest{ContainerId: "limited", ExecId: "hog"}); err != nil {
			t.Fatal(err)
		}
		w, err := g.containers.Wait(ctx, &agent.WaitRequest{ContainerId: "limited", ExecId: "hog"})
		if err != nil || w.Exit.ExitStatus != 128+uint32(unix.SIGKILL) {
			t.Errorf("memory hog: %v (%v), want killed", w, err)
		}
		ev, err := events.Recv()
		if err != nil || ev.ContainerId != "limited" || ev.GetOom() == nil {
			t.Errorf("event %v (%v), want an OOM of limited", ev, err)
		}
		// The exec id can be used again once deleted.
		if _, err := g.exec.Delete(ctx, &agent.DeleteExecRequest{ContainerId: "limited", ExecId: "hog"}); err != nil {
			t.Fatal(err)
		}
		if out := g.execOutput(t, "limited", "hog", "echo", "again"); out != "again\n" {
			t.Errorf("reused exec id: %q", out)
		}
		if _, err := g.containers.Signal(ctx, &agent.SignalRequest{ContainerId: "limited", Signal: uint32(unix.SIGKILL), All: true}); err != nil {
			t.Fatal(err)
		}
		if w, err := g.containers.Wait(ctx, &agent.WaitRequest{ContainerId: "limited"}); err != nil || w.Exit.ExitStatus != 128+uint32(unix.SIGKILL) {
			t.Errorf("SIGKILL to all: %v (%v)", w, err)
		}
		g.delete(t, "limited")
	})

	t.Run("clock", func(t *testing.T) {
		want := time.Date(2031, 5, 6, 7, 8, 9, 0, time.UTC)
		if _, err := g.sandbox.SetTime(ctx, &agent.SetTimeRequest{Time: timestamppb.New(want)}); err != nil {
			t.Fatal(err)
		}
		if r := g.run(t, "date", testSpec("date", "-u", "+%Y-%m-%d")); r.stdout != "2031-05-06\n" {
			t.Errorf("guest date %q", r.stdout)
		}
		if _, err := g.sandbox.SetTime(ctx, &agent.SetTimeRequest{Time: timestamppb.Now()}); err != nil {
			t.Fatal(err)
		}
	})
}

// execOutput runs a process in a running container and returns its stdout.
func (g *guestVM) execOutput(t testing.TB, container, execID string, args ...string) string {
	t.Helper()
	ctx := ctxT(t)
	proc, _ := json.Marshal(&specs.Process{Args: args, Cwd: "/", Env: []string{"PATH=/bin"}})
	if _, err := g.exec.Create(ctx, &agent.CreateExecRequest{ContainerId: container, ExecId: execID, Process: proc, Stdio: &agent.Stdio{Stdout: true}}); err != nil {
		t.Fatal(err)
	}
	out := readAll(g.stdio(t, container, execID, agent.StreamKind_STREAM_KIND_STDOUT))
	if _, err := g.exec.Start(ctx, &agent.StartExecRequest{ContainerId: container, ExecId: execID}); err != nil {
		t.Fatal(err)
	}
	if _, err := g.containers.Wait(ctx, &agent.WaitRequest{ContainerId: container, ExecId: execID}); err != nil {
		t.Fatal(err)
	}
	s := <-out
	if _, err := g.exec.Delete(ctx, &agent.DeleteExecRequest{ContainerId: container, ExecId: execID}); err != nil {
		t.Fatal(err)
	}
	return s
}

// TestGuestReconnect: the shim goes away and comes back (a shim restart); the agent
// serves it again at its first attempt and the pod's containers kept running. The
// agent's session may not have seen the previous shim go when the next one connects
// (virtio-serial reports a disconnect as an event the agent reads too late): the
// transport's handshake must tie the new connection to a fresh session anyway. The
// first reconnects follow the close at once (the agent cannot have noticed), the last
// one after a pause (it has).
func TestGuestReconnect(t *testing.T) {
	g := bootGuest(t, layerDisks(t), 0)
	g.mountLayers(t)
	g.start(t, "long", testSpec("sleep", "1000"), &agent.Stdio{})
	ctx := ctxT(t)
	for i, pause := range []time.Duration{0, 0, 0, 2 * time.Second} {
		g.closeConn()
		time.Sleep(pause)
		if err := g.connect(ctx); err != nil {
			t.Fatalf("reconnect %d: %v", i, err)
		}
	}
	pids, err := g.containers.Pids(ctx, &agent.PidsRequest{ContainerId: "long"})
	if err != nil || len(pids.Processes) != 1 {
		t.Fatalf("after reconnecting: pids %v (%v)", pids, err)
	}
	if out := g.execOutput(t, "long", "e", "echo", "still here"); out != "still here\n" {
		t.Errorf("exec after reconnecting: %q", out)
	}
}

// BenchmarkGuestReconnect: what a shim's reconnect costs (dial the port, the transport's
// handshake with a fresh agent session, the first call), against the same call on a
// connection that is already up, measured in the same run: ns/op is the reconnect,
// "x-call" its ratio to the call.
func BenchmarkGuestReconnect(b *testing.B) {
	g := bootGuest(b, nil, 0)
	ctx := ctxT(b)
	const calls = 20
	call := make([]time.Duration, calls)
	for i := range call {
		start := time.Now()
		if _, err := g.sandbox.Check(ctx, &agent.CheckRequest{}); err != nil {
			b.Fatal(err)
		}
		call[i] = time.Since(start)
	}
	slices.Sort(call)
	b.ResetTimer()
	for range b.N {
		g.closeConn()
		if err := g.connect(ctx); err != nil {
			b.Fatal(err)
		}
	}
	b.StopTimer()
	median := call[calls/2]
	b.ReportMetric(float64(b.Elapsed())/float64(b.N)/float64(median), "x-call")
	b.ReportMetric(float64(median.Microseconds()), "call-µs")
}
