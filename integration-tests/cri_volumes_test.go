package integration

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	runtime "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/caisson-containers/caisson/integration-tests/harness"
)

// TestCRIVolumes runs a pod whose containers have the host bind mounts the kubelet
// gives pods (a ConfigMap-like read-only tree, an emptyDir shared by two containers):
// their content is copied into the VM when the container's task is created (the CRI's
// StartContainer). A tree over the copy limit fails it, saying so. Then nothing of the pod is left.
func TestCRIVolumes(t *testing.T) {
	c := harness.StartCRI(t, harness.Options{})
	ctx := c.Ctx(t)
	image := c.Pull(t, c.BusyboxRef, harness.Handler)
	host := t.TempDir()

	// A ConfigMap-like tree: two files and a symlink.
	config := filepath.Join(host, "config")
	mustMkdir(t, config)
	mustWrite(t, filepath.Join(config, "a.txt"), "alpha\n", 0o644)
	mustWrite(t, filepath.Join(config, "b.txt"), "beta\n", 0o600)
	if err := os.Symlink("a.txt", filepath.Join(config, "link")); err != nil {
		t.Fatal(err)
	}
	// An emptyDir-like directory, read-write.
	cache := filepath.Join(host, "cache")
	mustMkdir(t, cache)
	// A tree one byte over the default limit (1 MiB).
	big := filepath.Join(host, "big")
	mustMkdir(t, big)
	mustWrite(t, filepath.Join(big, "blob"), strings.Repeat("x", 1<<20+1), 0o644)

	podCfg := c.PodConfig("volumes", func(p *runtime.PodSandboxConfig) {
		p.Linux.CgroupParent = harness.CgroupParent(t, "volumes")
	})
	pod := c.RunPod(t, podCfg, harness.Handler)

	withMounts := func(cfg *runtime.ContainerConfig, mounts ...*runtime.Mount) *runtime.ContainerConfig {
		cfg.Mounts = mounts
		return cfg
	}
	writer := c.StartContainer(t, pod, podCfg, withMounts(harness.ContainerConfig("writer", image, "sleep", "100000"),
		&runtime.Mount{HostPath: config, ContainerPath: "/etc/config", Readonly: true},
		&runtime.Mount{HostPath: cache, ContainerPath: "/cache"}))
	reader := c.StartContainer(t, pod, podCfg, withMounts(harness.ContainerConfig("reader", image, "sleep", "100000"),
		&runtime.Mount{HostPath: cache, ContainerPath: "/data"}))

	t.Run("read-only tree", func(t *testing.T) {
		for file, want := range map[string]string{"a.txt": "alpha", "b.txt": "beta", "link": "alpha"} {
			out, errOut, code := c.Exec(t, writer, "cat", "/etc/config/"+file)
			if code != 0 || strings.TrimSpace(out) != want {
				t.Errorf("cat /etc/config/%s: %q (exit %d, %s), want %q", file, out, code, errOut, want)
			}
		}
		if out, _, code := c.Exec(t, writer, "busybox", "readlink", "/etc/config/link"); code != 0 || strings.TrimSpace(out) != "a.txt" {
			t.Errorf("readlink /etc/config/link: %q (exit %d), want a.txt", out, code)
		}
		if out, _, _ := c.Exec(t, writer, "busybox", "stat", "-c", "%a", "/etc/config/b.txt"); strings.TrimSpace(out) != "600" {
			t.Errorf("mode of /etc/config/b.txt: %q, want 600", out)
		}
		_, errOut, code := c.Exec(t, writer, "sh", "-c", "echo x > /etc/config/new")
		if code == 0 || !strings.Contains(errOut, "Read-only file system") {
			t.Errorf("writing into the read-only mount: exit %d, %q; want a read-only failure", code, errOut)
		}
	})

	t.Run("read-write tree shared by two containers", func(t *testing.T) {
		if _, errOut, code := c.Exec(t, writer, "sh", "-c", "echo from-writer > /cache/f"); code != 0 {
			t.Fatalf("write /cache/f: exit %d, %s", code, errOut)
		}
		if out, _, code := c.Exec(t, reader, "cat", "/data/f"); code != 0 || strings.TrimSpace(out) != "from-writer" {
			t.Fatalf("reader's /data/f: %q (exit %d), want the writer's", out, code)
		}
		// Writes stay in the guest.
		if _, err := os.Stat(filepath.Join(cache, "f")); !os.IsNotExist(err) {
			t.Fatalf("the write reached the host: %v", err)
		}
		// The copy outlives a container that used it while another still does.
		if _, err := c.Runtime.StopContainer(ctx, &runtime.StopContainerRequest{ContainerId: writer, Timeout: 1}); err != nil {
			t.Fatal(err)
		}
		if _, err := c.Runtime.RemoveContainer(ctx, &runtime.RemoveContainerRequest{ContainerId: writer}); err != nil {
			t.Fatal(err)
		}
		if out, _, code := c.Exec(t, reader, "cat", "/data/f"); code != 0 || strings.TrimSpace(out) != "from-writer" {
			t.Fatalf("reader's /data/f after the writer was removed: %q (exit %d)", out, code)
		}
	})

	t.Run("over the limit", func(t *testing.T) {
		// containerd's CRI creates the task, which the shim refuses, at StartContainer.
		id, err := c.CreateContainer(ctx, pod, podCfg, withMounts(harness.ContainerConfig("big", image, "true"),
			&runtime.Mount{HostPath: big, ContainerPath: "/big", Readonly: true}))
		if err == nil {
			_, err = c.Runtime.StartContainer(ctx, &runtime.StartContainerRequest{ContainerId: id})
			if _, rerr := c.Runtime.RemoveContainer(ctx, &runtime.RemoveContainerRequest{ContainerId: id}); rerr != nil {
				t.Errorf("RemoveContainer: %v", rerr)
			}
		}
		if err == nil {
			t.Fatal("a container with a mount over the limit started")
		}
		for _, w := range []string{big, "1048577 bytes", "guest.copied_mount_limit_bytes"} {
			if !strings.Contains(err.Error(), w) {
				t.Fatalf("error %q does not say %q", err, w)
			}
		}
		t.Log(err)
	})

	c.RemovePod(t, pod)
	if left := c.Leftovers(); len(left) > 0 {
		t.Fatalf("after RemovePodSandbox:\n  %s", strings.Join(left, "\n  "))
	}
}

func mustMkdir(t *testing.T, p string) {
	t.Helper()
	if err := os.Mkdir(p, 0o755); err != nil {
		t.Fatal(err)
	}
}

func mustWrite(t *testing.T, p, data string, mode os.FileMode) {
	t.Helper()
	if err := os.WriteFile(p, []byte(data), mode); err != nil {
		t.Fatal(err)
	}
}
