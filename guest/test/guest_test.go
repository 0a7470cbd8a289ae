// Package test boots the real guest image (kernel, initramfs, caisson-agent as /init)
// under QEMU and drives the agent's API as the shim does: storages from virtio-blk and
// virtio-pmem disks, containers on an overlay of them, processes, streams and the pod.
package test

import (
	"context"
	"encoding/json"
	"io"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/containerd/errdefs"
	"github.com/opencontainers/runc/libcontainer/specconv"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"

	agent "github.com/caisson-containers/caisson/api/agent/v1"
	"github.com/caisson-containers/caisson/shim/vmm"
)

func ctxT(t testing.TB) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func testSpec(args ...string) *specs.Spec {
	s := specconv.Example()
	s.Root = &specs.Root{Path: "rootfs"}
	s.Process.Terminal = false
	s.Process.Args = args
	s.Process.Env = []string{"PATH=/bin", "HOME=/"}
	s.Hostname = "caisson-guest"
	return s
}

func specJSON(t testing.TB, s *specs.Spec) []byte {
	b, err := json.Marshal(s)
	must(t, err)
	return b
}

// layered mounts the three storages and returns a rootfs over them, with the writable
// layer's upper and work under dir.
func (g *guestVM) mountLayers(t testing.TB) {
	t.Helper()
	ctx := ctxT(t)
	for _, m := range []*agent.MountStorageRequest{
		{StorageId: "base", Device: &agent.Device{Kind: agent.DeviceKind_DEVICE_KIND_PMEM, PciPath: g.address(t, "base")}, Fstype: "erofs", Options: []string{"ro"}, Dax: true},
		{StorageId: "top", Device: &agent.Device{Kind: agent.DeviceKind_DEVICE_KIND_BLOCK, PciPath: g.address(t, "top")}, Fstype: "erofs", Options: []string{"ro"}},
		{StorageId: "rw", Device: &agent.Device{Kind: agent.DeviceKind_DEVICE_KIND_BLOCK, PciPath: g.address(t, "rw")}, Fstype: "ext4"},
	} {
		resp, err := g.storage.Mount(ctx, m)
		if err != nil {
			t.Fatalf("mount %s: %v", m.StorageId, err)
		}
		t.Logf("storage %s: %s on %s", m.StorageId, resp.DevicePath, resp.MountPoint)
		if m.Dax && !strings.HasPrefix(resp.DevicePath, "/dev/pmem") || !m.Dax && !strings.HasPrefix(resp.DevicePath, "/dev/vd") {
			t.Errorf("storage %s is on %s", m.StorageId, resp.DevicePath)
		}
	}
}

func rootfsFor(id string) *agent.Rootfs {
	return &agent.Rootfs{
		Lower: []*agent.StoragePath{{StorageId: "top"}, {StorageId: "base"}},
		Upper: &agent.StoragePath{StorageId: "rw", Path: id + "/upper"},
		Work:  &agent.StoragePath{StorageId: "rw", Path: id + "/work"},
	}
}

type result struct {
	stdout, stderr string
	exit           uint32
}

// run creates, starts and waits for a container, reading its output to EOF.
func (g *guestVM) run(t testing.TB, id string, spec *specs.Spec) result {
	t.Helper()
	ctx := ctxT(t)
	if _, err := g.containers.Create(ctx, &agent.CreateContainerRequest{
		ContainerId: id, Spec: specJSON(t, spec), Rootfs: rootfsFor(id), Stdio: &agent.Stdio{Stdout: true, Stderr: true},
	}); err != nil {
		t.Fatalf("create %s: %v", id, err)
	}
	stdout := readAll(g.stdio(t, id, "", agent.StreamKind_STREAM_KIND_STDOUT))
	stderr := readAll(g.stdio(t, id, "", agent.StreamKind_STREAM_KIND_STDERR))
	if _, err := g.containers.Start(ctx, &agent.StartContainerRequest{ContainerId: id}); err != nil {
		t.Fatalf("start %s: %v", id, err)
	}
	w, err := g.containers.Wait(ctx, &agent.WaitRequest{ContainerId: id})
	if err != nil {
		t.Fatalf("wait %s: %v", id, err)
	}
	r := result{stdout: <-stdout, stderr: <-stderr, exit: w.Exit.ExitStatus}
	g.delete(t, id)
	return r
}

func (g *guestVM) delete(t testing.TB, id string) {
	t.Helper()
	if _, err := g.containers.Delete(ctxT(t), &agent.DeleteContainerRequest{ContainerId: id}); err != nil {
		t.Fatalf("delete %s: %v", id, err)
	}
}

// start creates and starts a long-running container without attached streams.
func (g *guestVM) start(t testing.TB, id string, spec *specs.Spec, stdio *agent.Stdio) {
	t.Helper()
	ctx := ctxT(t)
	if _, err := g.containers.Create(ctx, &agent.CreateContainerRequest{
		ContainerId: id, Spec: specJSON(t, spec), Rootfs: rootfsFor(id), Stdio: stdio,
	}); err != nil {
		t.Fatalf("create %s: %v", id, err)
	}
	if _, err := g.containers.Start(ctx, &agent.StartContainerRequest{ContainerId: id}); err != nil {
		t.Fatalf("start %s: %v", id, err)
	}
}

func layerDisks(t testing.TB) []vmm.Disk {
	dir := t.TempDir()
	base, top, rw := busyboxLayers(t, dir)
	return []vmm.Disk{
		{ID: "base", Path: base, ReadOnly: true, Kind: vmm.PMEM},
		{ID: "top", Path: top, ReadOnly: true, Kind: vmm.Block},
		{ID: "rw", Path: rw, Kind: vmm.Block},
	}
}

func TestGuestContainers(t *testing.T) {
	g := bootGuest(t, layerDisks(t), 0)
	g.mountLayers(t)
	ctx := ctxT(t)

	v, err := g.sandbox.Version(ctx, &agent.VersionRequest{})
	if err != nil || v.ApiVersion != agent.APIVersion || v.AgentVersion == "" || !strings.HasSuffix(v.KernelRelease, "-cloud-amd64") {
		t.Errorf("version %v (%v)", v, err)
	}

	t.Run("echo", func(t *testing.T) {
		r := g.run(t, "echo", testSpec("echo", "hello"))
		if r.stdout != "hello\n" || r.stderr != "" || r.exit != 0 {
			t.Errorf("got %+v", r)
		}
	})
	t.Run("script exit 3", func(t *testing.T) {
		r := g.run(t, "script", testSpec("sh", "-c", "cat /etc/layer; echo to-stderr >&2; exit 3"))
		if r.stdout != "top\n" || r.stderr != "to-stderr\n" || r.exit != 3 {
			t.Errorf("got %+v", r)
		}
	})
	t.Run("no byte lost at exit", func(t *testing.T) {
		// Output much larger than the pipes and the transport's windows, written just
		// before the process exits, arrives whole on both streams.
		r := g.run(t, "bulk", testSpec("sh", "-c", `head -c 400000 /dev/zero | tr '\0' a; head -c 150000 /dev/zero | tr '\0' b >&2; exit 4`))
		if r.exit != 4 || r.stdout != strings.Repeat("a", 400000) || r.stderr != strings.Repeat("b", 150000) {
			t.Errorf("exit %d, stdout %d bytes, stderr %d bytes (want 4, 400000 a, 150000 b)", r.exit, len(r.stdout), len(r.stderr))
		}
	})
	t.Run("overlay on the attached devices", func(t *testing.T) {
		// Without its own PID namespace the container sees the agent's mounts in /proc/1.
		spec := testSpec("sh", "-c", "grep ' / ' /proc/self/mounts; cat /proc/1/mounts")
		var nss []specs.LinuxNamespace
		for _, ns := range spec.Linux.Namespaces {
			if ns.Type != specs.PIDNamespace {
				nss = append(nss, ns)
			}
		}
		spec.Linux.Namespaces = nss
		r := g.run(t, "mounts", spec)
		if r.exit != 0 {
			t.Fatalf("got %+v", r)
		}
		lines := strings.Split(r.stdout, "\n")
		root := lines[0]
		if !strings.HasPrefix(root, "overlay / overlay ") || !strings.Contains(root, "lowerdir=/run/caisson/storage/top:/run/caisson/storage/base") ||
			!strings.Contains(root, "upperdir=/run/caisson/storage/rw/mounts/upper") {
			t.Errorf("container root: %q", root)
		}
		var pmem, blk bool
		for _, l := range lines[1:] {
			f := strings.Fields(l)
			if len(f) < 4 {
				continue
			}
			switch f[1] {
			case "/run/caisson/storage/base":
				pmem = strings.HasPrefix(f[0], "/dev/pmem") && f[2] == "erofs" && strings.Contains(f[3], "dax=always")
			case "/run/caisson/storage/top":
				blk = strings.HasPrefix(f[0], "/dev/vd") && f[2] == "erofs"
			}
		}
		if !pmem || !blk {
			t.Errorf("layer mounts in the guest (pmem with dax %v, virtio-blk %v):\n%s", pmem, blk, r.stdout)
		}
	})
	t.Run("kill and exec", func(t *testing.T) {
		g.start(t, "sleeper", testSpec("sleep", "1000"), &agent.Stdio{})
		proc, _ := json.Marshal(&specs.Process{Args: []string{"sh", "-c", "echo exec-ok; cat /etc/layer"}, Cwd: "/", Env: []string{"PATH=/bin"}})
		if _, err := g.exec.Create(ctx, &agent.CreateExecRequest{ContainerId: "sleeper", ExecId: "e1", Process: proc, Stdio: &agent.Stdio{Stdout: true}}); err != nil {
			t.Fatal(err)
		}
		out := readAll(g.stdio(t, "sleeper", "e1", agent.StreamKind_STREAM_KIND_STDOUT))
		if _, err := g.exec.Start(ctx, &agent.StartExecRequest{ContainerId: "sleeper", ExecId: "e1"}); err != nil {
			t.Fatal(err)
		}
		w, err := g.containers.Wait(ctx, &agent.WaitRequest{ContainerId: "sleeper", ExecId: "e1"})
		if err != nil {
			t.Fatal(err)
		}
		if s := <-out; s != "exec-ok\ntop\n" || w.Exit.ExitStatus != 0 {
			t.Errorf("exec: %q, exit %d", s, w.Exit.ExitStatus)
		}
		if _, err := g.exec.Delete(ctx, &agent.DeleteExecRequest{ContainerId: "sleeper", ExecId: "e1"}); err != nil {
			t.Fatal(err)
		}
		pids, err := g.containers.Pids(ctx, &agent.PidsRequest{ContainerId: "sleeper"})
		if err != nil || len(pids.Processes) != 1 {
			t.Errorf("pids %v (%v)", pids, err)
		}
		if _, err := g.containers.Stats(ctx, &agent.StatsRequest{ContainerId: "sleeper"}); err != nil {
			t.Errorf("stats: %v", err)
		}
		if _, err := g.containers.Delete(ctx, &agent.DeleteContainerRequest{ContainerId: "sleeper"}); !errdefs.IsFailedPrecondition(native(err)) {
			t.Errorf("delete of a running container: %v, want FailedPrecondition", err)
		}
		if _, err := g.containers.Signal(ctx, &agent.SignalRequest{ContainerId: "sleeper", Signal: uint32(unix.SIGKILL)}); err != nil {
			t.Fatal(err)
		}
		w, err = g.containers.Wait(ctx, &agent.WaitRequest{ContainerId: "sleeper"})
		if err != nil || w.Exit.ExitStatus != 137 {
			t.Errorf("killed: %v (%v), want 137", w, err)
		}
		g.delete(t, "sleeper")
	})
	t.Run("tty with resize", func(t *testing.T) {
		spec := testSpec("sh", "-c", "read line; stty size; echo got $line")
		spec.Process.Terminal = true
		if _, err := g.containers.Create(ctx, &agent.CreateContainerRequest{
			ContainerId: "tty", Spec: specJSON(t, spec), Rootfs: rootfsFor("tty"), Stdio: &agent.Stdio{Terminal: true, Stdin: true, Stdout: true},
		}); err != nil {
			t.Fatal(err)
		}
		in := g.stdio(t, "tty", "", agent.StreamKind_STREAM_KIND_STDIN)
		out := readAll(g.stdio(t, "tty", "", agent.StreamKind_STREAM_KIND_STDOUT))
		if _, err := g.io.ResizePty(ctx, &agent.ResizePtyRequest{ContainerId: "tty", Width: 120, Height: 33}); err != nil {
			t.Fatal(err)
		}
		if _, err := g.containers.Start(ctx, &agent.StartContainerRequest{ContainerId: "tty"}); err != nil {
			t.Fatal(err)
		}
		if _, err := io.WriteString(in, "typed\n"); err != nil {
			t.Fatal(err)
		}
		w, err := g.containers.Wait(ctx, &agent.WaitRequest{ContainerId: "tty"})
		if err != nil || w.Exit.ExitStatus != 0 {
			t.Fatalf("wait: %v %v", w, err)
		}
		s := strings.ReplaceAll(<-out, "\r", "")
		if !strings.Contains(s, "33 120\n") || !strings.Contains(s, "got typed\n") {
			t.Errorf("terminal output %q", s)
		}
		g.delete(t, "tty")
	})
	t.Run("stdin EOF", func(t *testing.T) {
		if _, err := g.containers.Create(ctx, &agent.CreateContainerRequest{
			ContainerId: "cat", Spec: specJSON(t, testSpec("sh", "-c", "cat; echo done")), Rootfs: rootfsFor("cat"),
			Stdio: &agent.Stdio{Stdin: true, Stdout: true},
		}); err != nil {
			t.Fatal(err)
		}
		in := g.stdio(t, "cat", "", agent.StreamKind_STREAM_KIND_STDIN)
		out := readAll(g.stdio(t, "cat", "", agent.StreamKind_STREAM_KIND_STDOUT))
		if _, err := g.containers.Start(ctx, &agent.StartContainerRequest{ContainerId: "cat"}); err != nil {
			t.Fatal(err)
		}
		if _, err := io.WriteString(in, "through stdin\n"); err != nil {
			t.Fatal(err)
		}
		in.Close() // EOF: the agent closes the process's stdin
		w, err := g.containers.Wait(ctx, &agent.WaitRequest{ContainerId: "cat"})
		if err != nil || w.Exit.ExitStatus != 0 {
			t.Fatalf("wait: %v %v", w, err)
		}
		if s := <-out; s != "through stdin\ndone\n" {
			t.Errorf("stdout %q", s)
		}
		g.delete(t, "cat")
	})
	t.Run("seccomp, user, capabilities, read-only rootfs", func(t *testing.T) {
		// The agent is a static binary with libseccomp linked in: filters load in the guest.
		spec := testSpec("sh", "-c", `mkdir /tmp/d 2>/dev/null || echo mkdir-denied; id -u; grep CapEff /proc/self/status; touch /x 2>/dev/null || echo ro`)
		spec.Linux.Seccomp = &specs.LinuxSeccomp{DefaultAction: specs.ActAllow, Syscalls: []specs.LinuxSyscall{
			{Names: []string{"mkdir", "mkdirat"}, Action: specs.ActErrno}}}
		spec.Process.User = specs.User{UID: 1234, GID: 1234}
		spec.Process.Capabilities = &specs.LinuxCapabilities{}
		spec.Root.Readonly = true
		r := g.run(t, "confined", spec)
		if want := "mkdir-denied\n1234\nCapEff:\t0000000000000000\nro\n"; r.stdout != want || r.exit != 0 {
			t.Errorf("got %+v, want stdout %q", r, want)
		}
	})
	t.Run("writes land in the writable layer", func(t *testing.T) {
		r := g.run(t, "writer", testSpec("sh", "-c", "echo new > /etc/new && cat /etc/new"))
		if r.stdout != "new\n" || r.exit != 0 {
			t.Errorf("got %+v", r)
		}
	})
	if _, err := g.storage.Unmount(ctx, &agent.UnmountStorageRequest{StorageId: "top"}); err != nil {
		t.Errorf("unmount a storage no container uses: %v", err)
	}
	_ = filepath.Join
}
