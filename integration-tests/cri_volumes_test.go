package integration

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	runtime "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/caisson-containers/caisson/integration-tests/harness"
	"github.com/caisson-containers/caisson/shim/config"
)

// TestCRIVolumes runs a pod that copies host paths into its VM (guest.shared_fs =
// "copy") whose containers have the host bind mounts the kubelet gives pods: a
// ConfigMap-like read-only tree is copied into the VM when the container's task is
// created (the CRI's StartContainer); a writable emptyDir, whose writes would never
// reach the host, is refused saying so, and so is a tree over the copy limit. Then
// nothing of the pod is left. (Shared volumes, the default: TestCRISharedVolumes.)
func TestCRIVolumes(t *testing.T) {
	c := harness.StartCRI(t, harness.Options{Runtime: func(cfg *config.Config) {
		cfg.Guest.SharedFS = config.SharedFSCopy
	}})
	ctx := c.Ctx(t)
	image := c.Pull(t, c.BusyboxRef, harness.Handler)
	host := t.TempDir()

	// A ConfigMap-like tree: two files and a symlink.
	cmTree := filepath.Join(host, "config")
	mustMkdir(t, cmTree)
	mustWrite(t, filepath.Join(cmTree, "a.txt"), "alpha\n", 0o644)
	mustWrite(t, filepath.Join(cmTree, "b.txt"), "beta\n", 0o600)
	if err := os.Symlink("a.txt", filepath.Join(cmTree, "link")); err != nil {
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

	writer := c.StartContainer(t, pod, podCfg, withMounts(harness.ContainerConfig("writer", image, "sleep", "100000"),
		&runtime.Mount{HostPath: cmTree, ContainerPath: "/etc/config", Readonly: true}))

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

	t.Run("a writable tree is refused", func(t *testing.T) {
		id, err := c.CreateContainer(ctx, pod, podCfg, withMounts(harness.ContainerConfig("rw", image, "true"),
			&runtime.Mount{HostPath: cache, ContainerPath: "/cache"}))
		if err == nil {
			_, err = c.Runtime.StartContainer(ctx, &runtime.StartContainerRequest{ContainerId: id})
			if _, rerr := c.Runtime.RemoveContainer(ctx, &runtime.RemoveContainerRequest{ContainerId: id}); rerr != nil {
				t.Errorf("RemoveContainer: %v", rerr)
			}
		}
		if err == nil || !strings.Contains(err.Error(), cache) || !strings.Contains(err.Error(), "its writes would never reach the host") {
			t.Fatalf("a writable copied mount: %v, want an error naming %s and why", err, cache)
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
