package integration

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	runtime "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/caisson-containers/caisson/integration-tests/harness"
	"github.com/caisson-containers/caisson/shim/config"
)

// TestCRIVolumeRefresh changes, on the host, the sources of a running pod's
// copied volumes as the kubelet does (its atomic writer swaps "..data" to a new
// version directory; a plain file is rewritten) and waits for the containers to
// see the change: read-only copied mounts follow the host
// (guest.copied_mount_refresh_interval). A file the container holds open keeps its
// old content. (Copied volumes: guest.shared_fs = "copy"; shared ones follow the
// host through virtio-fs, TestCRISharedVolumes.)
func TestCRIVolumeRefresh(t *testing.T) {
	c := harness.StartCRI(t, harness.Options{Runtime: func(cfg *config.Config) {
		cfg.Guest.SharedFS = config.SharedFSCopy
		cfg.Guest.CopiedMountRefreshInterval = config.Duration(200 * time.Millisecond)
	}})
	ctx := c.Ctx(t)
	image := c.Pull(t, c.BusyboxRef, harness.Handler)
	host := t.TempDir()

	// A ConfigMap volume as the kubelet's atomic writer leaves it.
	cm := filepath.Join(host, "configmap")
	mustMkdir(t, cm)
	v1 := "..2026_11_23_17_00_00.1"
	mustMkdir(t, filepath.Join(cm, v1))
	mustWrite(t, filepath.Join(cm, v1, "key"), "old\n", 0o644)
	mustWrite(t, filepath.Join(cm, v1, "gone"), "deleted soon\n", 0o644)
	mustSymlink(t, v1, filepath.Join(cm, "..data"))
	mustSymlink(t, "..data/key", filepath.Join(cm, "key"))
	mustSymlink(t, "..data/gone", filepath.Join(cm, "gone"))
	// A file mounted as a file, and a plain tree.
	token := filepath.Join(host, "token")
	mustWrite(t, token, "token-1\n", 0o600)
	plain := filepath.Join(host, "plain")
	mustMkdir(t, plain)
	mustWrite(t, filepath.Join(plain, "a"), "a1\n", 0o644)

	podCfg := c.PodConfig("volume-refresh", func(p *runtime.PodSandboxConfig) {
		p.Linux.CgroupParent = harness.CgroupParent(t, "volume-refresh")
	})
	pod := c.RunPod(t, podCfg, harness.Handler)
	// The container's pid 1 holds /etc/cfg/key open on fd 3 from the start.
	cfg := harness.ContainerConfig("app", image, "sh", "-c", "exec 3</etc/cfg/key; exec sleep 100000")
	// A PID namespace of its own, as the kubelet asks by default (the CRI's default, POD,
	// would make the pause process its pid 1).
	cfg.Linux.SecurityContext = &runtime.LinuxContainerSecurityContext{
		NamespaceOptions: &runtime.NamespaceOption{Pid: runtime.NamespaceMode_CONTAINER},
	}
	cfg.Mounts = []*runtime.Mount{
		{HostPath: cm, ContainerPath: "/etc/cfg", Readonly: true},
		{HostPath: token, ContainerPath: "/var/run/token", Readonly: true},
		{HostPath: plain, ContainerPath: "/etc/plain", Readonly: true},
	}
	app := c.StartContainer(t, pod, podCfg, cfg)

	cat := func(p string) string {
		out, _, code := c.Exec(t, app, "cat", p)
		if code != 0 {
			return "<missing>"
		}
		return strings.TrimSpace(out)
	}
	// await waits (a minute at most) for path to hold want in the container, and
	// logs how long that took (the interval, the copy, and ExecSync's own latency).
	await := func(p, want string) {
		t.Helper()
		start := time.Now()
		deadline := start.Add(time.Minute)
		for {
			got := cat(p)
			if got == want {
				t.Logf("%s holds %q after %v", p, want, time.Since(start).Round(time.Millisecond))
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s in the container still holds %q, want %q", p, got, want)
			}
			time.Sleep(200 * time.Millisecond)
		}
	}
	for p, want := range map[string]string{"/etc/cfg/key": "old", "/etc/cfg/gone": "deleted soon", "/var/run/token": "token-1", "/etc/plain/a": "a1"} {
		if got := cat(p); got != want {
			t.Fatalf("%s holds %q before any change, want %q", p, got, want)
		}
	}

	t.Run("kubelet atomic update", func(t *testing.T) {
		// What the kubelet's atomic writer does: the new version in full, then one
		// rename of a "..data_tmp" link over "..data", then the keys' links, then
		// the old version removed.
		v2 := "..2026_11_23_17_05_00.2"
		mustMkdir(t, filepath.Join(cm, v2))
		mustWrite(t, filepath.Join(cm, v2, "key"), "new\n", 0o644)
		mustWrite(t, filepath.Join(cm, v2, "added"), "added\n", 0o644)
		mustSymlink(t, v2, filepath.Join(cm, "..data_tmp"))
		if err := os.Rename(filepath.Join(cm, "..data_tmp"), filepath.Join(cm, "..data")); err != nil {
			t.Fatal(err)
		}
		mustSymlink(t, "..data/added", filepath.Join(cm, "added"))
		if err := os.Remove(filepath.Join(cm, "gone")); err != nil {
			t.Fatal(err)
		}
		if err := os.RemoveAll(filepath.Join(cm, v1)); err != nil {
			t.Fatal(err)
		}

		await("/etc/cfg/key", "new")
		await("/etc/cfg/added", "added")
		await("/etc/cfg/gone", "<missing>")
		if got := cat("/etc/cfg/..data"); got != "<missing>" {
			t.Errorf("cat of a directory worked: %q", got)
		}
		out, _, _ := c.Exec(t, app, "busybox", "readlink", "/etc/cfg/..data")
		if strings.TrimSpace(out) != v2 {
			t.Errorf("/etc/cfg/..data links to %q, want %q", out, v2)
		}
		out, _, _ = c.Exec(t, app, "ls", "-a", "/etc/cfg")
		if strings.Contains(out, v1) || strings.Contains(out, "caisson_tmp") {
			t.Errorf("/etc/cfg holds leftovers:\n%s", out)
		}
		// The container's open descriptor still reads the version it opened.
		if got := cat("/proc/1/fd/3"); got != "old" {
			t.Errorf("fd 3 of pid 1 reads %q after the update, want the old content", got)
		}
	})

	t.Run("file mounted as a file", func(t *testing.T) {
		mustWrite(t, token, "token-2, longer\n", 0o600)
		await("/var/run/token", "token-2, longer")
		mustWrite(t, token, "token-3\n", 0o600) // shorter: the old tail must go
		await("/var/run/token", "token-3")
	})

	t.Run("plain tree", func(t *testing.T) {
		mustWrite(t, filepath.Join(plain, "a"), "a2\n", 0o644)
		mustWrite(t, filepath.Join(plain, "b"), "b1\n", 0o644)
		await("/etc/plain/a", "a2")
		await("/etc/plain/b", "b1")
		if err := os.Remove(filepath.Join(plain, "a")); err != nil {
			t.Fatal(err)
		}
		await("/etc/plain/a", "<missing>")
	})

	if _, err := c.Runtime.StopContainer(ctx, &runtime.StopContainerRequest{ContainerId: app, Timeout: 1}); err != nil {
		t.Fatal(err)
	}
	c.RemovePod(t, pod)
	if left := c.Leftovers(); len(left) > 0 {
		t.Fatalf("after RemovePodSandbox:\n  %s", strings.Join(left, "\n  "))
	}
}

func mustSymlink(t *testing.T, target, p string) {
	t.Helper()
	if err := os.Symlink(target, p); err != nil {
		t.Fatal(err)
	}
}
