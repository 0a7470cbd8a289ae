package integration

import (
	"os"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	runtime "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/caisson-containers/caisson/integration-tests/harness"
)

// TestCRIMountFlags: a host path with a tmpfs mounted below it, mounted into containers
// the ways the kubelet can ask, on runc (the control) and on Caisson:
//   - read-only, not recursively: the top cannot be written, the tmpfs below can (as
//     with critest's non-recursive "ro" spec);
//   - recursively read-only (rro, which containerd allows only for a runtime whose
//     features say so): neither can;
//   - rslave and rshared propagation: a mount the host makes below the path after the
//     container started is seen in the container.
//
// The one difference, asserted so that the docs must change with it: with rshared, a
// mount the container makes reaches the host on runc, and cannot on Caisson (it is
// made by the guest's kernel; docs/volumes.md).
func TestCRIMountFlags(t *testing.T) {
	c := harness.StartCRI(t, harness.Options{})
	for _, handler := range []string{harness.RuncHandler, harness.Handler} {
		t.Run(handler, func(t *testing.T) {
			image := c.Pull(t, c.BusyboxRef, handler)
			vol := filepath.Join(t.TempDir(), "volume")
			sub := filepath.Join(vol, "tmpfs")
			later := filepath.Join(vol, "later")
			for _, d := range []string{sub, later} {
				if err := os.MkdirAll(d, 0o755); err != nil {
					t.Fatal(err)
				}
			}
			mountTmpfs(t, sub)
			// The kubelet makes a path shared before it offers it with propagation.
			if err := syscall.Mount(vol, vol, "", syscall.MS_BIND|syscall.MS_REC, ""); err != nil {
				t.Fatal(err)
			}
			defer syscall.Unmount(vol, syscall.MNT_DETACH)
			if err := syscall.Mount("", vol, "", syscall.MS_SHARED|syscall.MS_REC, ""); err != nil {
				t.Fatal(err)
			}

			cfg := c.PodConfig("mountflags-"+handler, nil)
			pod := c.RunPod(t, cfg, handler)
			start := func(name string, m *runtime.Mount) string {
				m.HostPath, m.ContainerPath = vol, "/data"
				cc := withMounts(harness.ContainerConfig(name, image, "sleep", "600"), m)
				// To mount in the container (the rshared case).
				cc.Linux.SecurityContext = &runtime.LinuxContainerSecurityContext{
					Capabilities: &runtime.Capability{AddCapabilities: []string{"SYS_ADMIN"}},
				}
				return c.StartContainer(t, pod, cfg, cc)
			}
			canWrite := func(id, path string) bool {
				_, _, code := c.Exec(t, id, "touch", path)
				return code == 0
			}

			ro := start("ro", &runtime.Mount{Readonly: true})
			rro := start("rro", &runtime.Mount{Readonly: true, RecursiveReadOnly: true})
			for _, tc := range []struct {
				id, path string
				want     bool
			}{
				{ro, "/data/top-ro", false},
				{ro, "/data/tmpfs/sub-ro", true},
				{rro, "/data/top-rro", false},
				{rro, "/data/tmpfs/sub-rro", false},
			} {
				if got := canWrite(tc.id, tc.path); got != tc.want {
					t.Errorf("write %s: %v, want %v", tc.path, got, tc.want)
				}
			}
			if _, err := os.Stat(filepath.Join(sub, "sub-ro")); err != nil {
				t.Errorf("the write to the writable tmpfs below a read-only mount is not on the host: %v", err)
			}

			slave := start("rslave", &runtime.Mount{Propagation: runtime.MountPropagation_PROPAGATION_HOST_TO_CONTAINER})
			shared := start("rshared", &runtime.Mount{Propagation: runtime.MountPropagation_PROPAGATION_BIDIRECTIONAL})
			mountTmpfs(t, later)
			if err := os.WriteFile(filepath.Join(later, "flag"), []byte("from the host"), 0o644); err != nil {
				t.Fatal(err)
			}
			for _, id := range []string{slave, shared} {
				if !eventually(func() bool {
					out, _, code := c.Exec(t, id, "cat", "/data/later/flag")
					return code == 0 && out == "from the host"
				}) {
					t.Errorf("container %s does not see the host's later mount", id)
				}
			}

			// rshared, container to host.
			if _, stderr, code := c.Exec(t, shared, "sh", "-c", "mkdir -p /data/back && mount -t tmpfs tmpfs /data/back && touch /data/back/flag"); code != 0 {
				t.Fatalf("mount in the rshared container: %s", stderr)
			}
			defer syscall.Unmount(filepath.Join(vol, "back"), syscall.MNT_DETACH)
			_, err := os.Stat(filepath.Join(vol, "back", "flag"))
			switch handler {
			case harness.RuncHandler:
				if err != nil {
					t.Errorf("runc: the container's mount did not reach the host: %v", err)
				}
			default:
				if err == nil {
					t.Errorf("Caisson: the container's mount reached the host: docs/volumes.md says it cannot")
				}
			}
			c.RemovePod(t, pod)
		})
	}
	if left := c.Leftovers(); len(left) > 0 {
		t.Errorf("left after the pods: %v", left)
	}
}

// mountTmpfs mounts a small tmpfs at dir until the test ends.
func mountTmpfs(t *testing.T, dir string) {
	t.Helper()
	if err := syscall.Mount("tmpfs", dir, "tmpfs", 0, "size=4m"); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { syscall.Unmount(dir, syscall.MNT_DETACH) })
}

// eventually reports whether ok holds within 10 s (a share's host changes reach the
// guest within virtiofsd's cache timeout).
func eventually(ok func() bool) bool {
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(200 * time.Millisecond) {
		if ok() {
			return true
		}
		if time.Now().After(deadline) {
			return false
		}
	}
}
