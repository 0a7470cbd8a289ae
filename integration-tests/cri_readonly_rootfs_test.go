package integration

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/containerd/containerd/v2/pkg/namespaces"
	runtime "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/caisson-containers/caisson/integration-tests/harness"
)

// TestCRIReadOnlyRootfs: a container with readOnlyRootFilesystem, on runc (the control)
// and on Caisson: its rootfs cannot be written nor remounted writable, a volume at a
// path its image does not have is there (runc made the mount point before it made the
// rootfs read-only), and its /dev/shm stays writable. On Caisson its writable layer is a
// tmpfs in the guest: its snapshot's writable image is never made (docs/mounts.md).
func TestCRIReadOnlyRootfs(t *testing.T) {
	c := harness.StartCRI(t, harness.Options{})
	for _, handler := range []string{harness.RuncHandler, harness.Handler} {
		t.Run(handler, func(t *testing.T) {
			image := c.Pull(t, c.BusyboxRef, handler)
			vol := t.TempDir()
			if err := os.WriteFile(filepath.Join(vol, "hello"), []byte("from the host\n"), 0o644); err != nil {
				t.Fatal(err)
			}
			cfg := c.PodConfig("readonly-"+handler, nil)
			pod := c.RunPod(t, cfg, handler)
			defer c.RemovePod(t, pod)
			cc := withMounts(harness.ContainerConfig("ro", image, "sleep", "600"),
				&runtime.Mount{HostPath: vol, ContainerPath: "/new/volume", Readonly: true})
			cc.Linux.SecurityContext = &runtime.LinuxContainerSecurityContext{ReadonlyRootfs: true}
			id := c.StartContainer(t, pod, cfg, cc)

			for _, cmd := range []string{"touch /x", "mkdir /tmp/x", "mount -o remount,rw /"} {
				if _, errOut, code := c.Exec(t, id, "sh", "-c", cmd); code == 0 {
					t.Errorf("%q in a read-only rootfs succeeded", cmd)
				} else if cmd != "mount -o remount,rw /" && !strings.Contains(errOut, "Read-only file system") {
					t.Errorf("%q: exit %d, %q; want Read-only file system", cmd, code, errOut)
				}
			}
			if out, errOut, code := c.Exec(t, id, "cat", "/new/volume/hello"); code != 0 || out != "from the host\n" {
				t.Errorf("the volume at a path the image has not: %q %q exit %d", out, errOut, code)
			}
			if _, errOut, code := c.Exec(t, id, "sh", "-c", "echo ok > /dev/shm/ok && cat /dev/shm/ok"); code != 0 {
				t.Errorf("/dev/shm is not writable: %s", errOut)
			}
			if handler != harness.Handler {
				return
			}
			mounts, err := c.Client.SnapshotService("caisson").Mounts(namespaces.WithNamespace(c.Ctx(t), "k8s.io"), id)
			if err != nil {
				t.Fatalf("mounts of the container's snapshot: %v", err)
			}
			var made bool
			for _, m := range mounts {
				if m.Type == "mkfs/ext4" {
					if _, err := os.Stat(m.Source); !os.IsNotExist(err) {
						made = true
					}
				}
			}
			if made {
				t.Errorf("the read-only container's writable image was made (mounts %+v)", mounts)
			}
		})
	}
}
