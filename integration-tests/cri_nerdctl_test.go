package integration

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	containerd "github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/core/containers"
	"github.com/containerd/containerd/v2/pkg/cio"
	"github.com/containerd/containerd/v2/pkg/oci"
	"github.com/opencontainers/runtime-spec/specs-go"

	"github.com/caisson-containers/caisson/integration-tests/harness"
)

// loggerScript is a logging binary in containerd's binary:// protocol, as nerdctl's own
// json-file logger is: stdout on fd 3, stderr on fd 4, and fd 5 closed once it is ready.
const loggerScript = `#!/bin/sh
dir=$2
exec 5>&-
cat <&3 >"$dir/stdout" &
cat <&4 >"$dir/stderr"
wait
`

// TestNerdctlRunCalls makes the containerd calls `nerdctl run --runtime
// io.containerd.caisson.v2 --snapshotter caisson --net none IMAGE CMD` makes (nerdctl is
// not on the Go module proxy): a pull unpacked into the caisson snapshotter; a container
// with that runtime and no runtime options (nerdctl sends none to non-runc runtimes),
// nerdctl's cgroup path, its /etc/hosts, /etc/resolv.conf and /etc/hostname bind mounts
// from its data directory and its OCI hooks (nerdctl-shaped, integration-tests/nerdctlhook,
// which do nothing for --net none); a task whose output goes to a binary:// logger. The
// container runs in the guest kernel, sees its hostname, and its output reaches the logger.
// (TestNerdctlNetwork covers nerdctl's default bridge network.)
func TestNerdctlRunCalls(t *testing.T) {
	reg := harness.StartRegistry(t)
	ref := reg.Push(t, "caisson-test/busybox:1", harness.BusyboxImage(t, "sh"))
	e := harness.Start(t, harness.Options{})
	ctx := e.Context(t)

	// nerdctl pull: unpack into the snapshotter --snapshotter names.
	image, err := e.Client.Pull(ctx, ref, containerd.WithPullUnpack, containerd.WithPullSnapshotter(snapshotter))
	if err != nil {
		t.Fatalf("pull %s: %v", ref, err)
	}

	// nerdctl's data directory for this container: hosts, resolv.conf, hostname.
	const id = "nerdctl-run"
	data := t.TempDir()
	files := map[string]string{"hosts": "127.0.0.1 localhost\n", "resolv.conf": "nameserver 10.4.0.1\n", "hostname": "nerd\n"}
	var mounts []specs.Mount
	for name, content := range files {
		p := filepath.Join(data, name)
		if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
		mounts = append(mounts, specs.Mount{Type: "bind", Source: p, Destination: "/etc/" + name, Options: []string{"bind", "rprivate"}})
	}
	logDir := t.TempDir()
	logger := filepath.Join(t.TempDir(), "logger")
	if err := os.WriteFile(logger, []byte(loggerScript), 0o755); err != nil {
		t.Fatal(err)
	}

	hook := buildNerdctlHook(t)
	hookArgs := func(event string) []string {
		return []string{hook, "--cni-path", t.TempDir(), "--cni-netconfpath", t.TempDir(), "--data-root", t.TempDir(), event}
	}

	c, err := e.Client.NewContainer(ctx, id,
		containerd.WithImage(image),
		containerd.WithSnapshotter(snapshotter),
		containerd.WithNewSnapshot(id, image),
		containerd.WithRuntime(runtimeName, nil),
		containerd.WithContainerLabels(map[string]string{"nerdctl/name": id, "nerdctl/hostname": "nerd"}),
		containerd.WithNewSpec(
			oci.WithDefaultSpec(), oci.WithDefaultUnixDevices,
			oci.WithImageConfigArgs(image, []string{"sh", "-c", "uname -r; hostname; cat /etc/resolv.conf; echo to-stderr >&2"}),
			oci.WithHostname("nerd"),
			oci.WithMounts(mounts),
			oci.WithCgroup("/"+harness.Namespace+"/"+id),
			// nerdctl's hooks and the annotations they read; the shim runs them on the host.
			oci.WithAnnotations(map[string]string{"nerdctl/namespace": harness.Namespace, "nerdctl/networks": `["none"]`}),
			func(_ context.Context, _ oci.Client, _ *containers.Container, s *specs.Spec) error {
				s.Hooks = &specs.Hooks{
					CreateRuntime: []specs.Hook{{Path: hook, Args: hookArgs("createRuntime"), Env: os.Environ()}},
					Poststop:      []specs.Hook{{Path: hook, Args: hookArgs("postStop"), Env: os.Environ()}},
				}
				return nil
			},
		))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Delete(context.WithoutCancel(ctx), containerd.WithSnapshotCleanup)
	task, err := c.NewTask(ctx, cio.BinaryIO(logger, map[string]string{"dir": logDir}))
	if err != nil {
		t.Fatalf("new task: %v", err)
	}
	defer task.Delete(context.WithoutCancel(ctx), containerd.WithProcessKill)
	exit, err := task.Wait(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := task.Start(ctx); err != nil {
		t.Fatal(err)
	}
	select {
	case st := <-exit:
		if st.ExitCode() != 0 {
			t.Fatalf("exit %d", st.ExitCode())
		}
	case <-time.After(2 * time.Minute):
		t.Fatal("the container did not exit")
	}
	if _, err := task.Delete(ctx); err != nil {
		t.Fatal(err)
	}
	out, _ := os.ReadFile(filepath.Join(logDir, "stdout"))
	errOut, _ := os.ReadFile(filepath.Join(logDir, "stderr"))
	lines := strings.Split(strings.TrimSpace(string(out)), "\n")
	if len(lines) < 2 || lines[0] != guestRelease || lines[1] != "nerd" {
		t.Fatalf("logged stdout %q, want the guest kernel %s and hostname nerd", out, guestRelease)
	}
	if strings.TrimSpace(string(errOut)) != "to-stderr" {
		t.Fatalf("logged stderr %q, want to-stderr", errOut)
	}
	// The guest's resolv.conf, which replaces the bind mount, says what nerdctl's did.
	if !strings.Contains(string(out), "nameserver 10.4.0.1") {
		t.Fatalf("resolv.conf in the guest lacks nerdctl's nameserver 10.4.0.1:\n%s", out)
	}
}
