package integration

import (
	"crypto/sha256"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	runtime "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/caisson-containers/caisson/integration-tests/harness"
)

func withMounts(cfg *runtime.ContainerConfig, mounts ...*runtime.Mount) *runtime.ContainerConfig {
	cfg.Mounts = mounts
	return cfg
}

// TestCRISharedVolumes: host directories a pod mounts (hostPath, PersistentVolume,
// emptyDir, ConfigMap) reach its containers through virtio-fs (guest.shared_fs, the
// default): the pod's writes, large and many, land on the host intact and stay after
// the pod is gone; a file the host adds appears in the pod; a read-only mount cannot be
// written; a ConfigMap-style atomic update (the kubelet's ..data symlink swap) is seen;
// an emptyDir is shared by two containers. Then nothing of the pod is left but the
// volumes' data.
func TestCRISharedVolumes(t *testing.T) {
	c := harness.StartCRI(t, harness.Options{})
	ctx := c.Ctx(t)
	image := c.Pull(t, c.BusyboxRef, harness.Handler)
	host := t.TempDir()
	pv := filepath.Join(host, "pv")
	empty := filepath.Join(host, "empty")
	cm := filepath.Join(host, "configmap")
	for _, d := range []string{pv, empty, cm} {
		mustMkdir(t, d)
	}
	// The kubelet's atomic writer: files are symlinks into ..data, itself a symlink
	// to a timestamped directory swapped by rename.
	mustMkdir(t, filepath.Join(cm, "..v1"))
	mustWrite(t, filepath.Join(cm, "..v1", "key"), "v1\n", 0o644)
	if err := os.Symlink("..v1", filepath.Join(cm, "..data")); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink("..data/key", filepath.Join(cm, "key")); err != nil {
		t.Fatal(err)
	}

	podCfg := c.PodConfig("shared-volumes", nil)
	pod := c.RunPod(t, podCfg, harness.Handler)
	db := c.StartContainer(t, pod, podCfg, withMounts(harness.ContainerConfig("db", image, "sleep", "100000"),
		&runtime.Mount{HostPath: pv, ContainerPath: "/var/lib/db"},
		&runtime.Mount{HostPath: empty, ContainerPath: "/scratch"},
		&runtime.Mount{HostPath: cm, ContainerPath: "/etc/config", Readonly: true}))
	side := c.StartContainer(t, pod, podCfg, withMounts(harness.ContainerConfig("sidecar", image, "sleep", "100000"),
		&runtime.Mount{HostPath: empty, ContainerPath: "/shared"}))
	sh := func(id, script string) string {
		t.Helper()
		out, errOut, code := c.Exec(t, id, "sh", "-c", script)
		if code != 0 {
			t.Fatalf("%s: exit %d: %s", script, code, errOut)
		}
		return strings.TrimSpace(out)
	}

	t.Run("writes land on the host", func(t *testing.T) {
		start := time.Now()
		sh(db, "dd if=/dev/urandom of=/var/lib/db/big bs=1M count=1024 2>/dev/null && sync")
		t.Logf("1 GiB written through virtio-fs in %s", time.Since(start).Round(time.Millisecond))
		guestSum := strings.Fields(sh(db, "sha256sum /var/lib/db/big"))[0]
		if got := fileSHA256(t, filepath.Join(pv, "big")); got != guestSum {
			t.Fatalf("host's copy of the 1 GiB file: sha256 %s, the guest's %s", got, guestSum)
		}
		start = time.Now()
		sh(db, "mkdir /var/lib/db/many && cd /var/lib/db/many && i=0; while [ $i -lt 10000 ]; do echo $i > f$i; i=$((i+1)); done")
		t.Logf("10,000 files created through virtio-fs in %s", time.Since(start).Round(time.Millisecond))
		entries, err := os.ReadDir(filepath.Join(pv, "many"))
		if err != nil || len(entries) != 10000 {
			t.Fatalf("host sees %d files, %v; want 10000", len(entries), err)
		}
		if b, _ := os.ReadFile(filepath.Join(pv, "many", "f9999")); string(b) != "9999\n" {
			t.Fatalf("host's f9999: %q", b)
		}
	})

	t.Run("host changes reach the pod", func(t *testing.T) {
		mustWrite(t, filepath.Join(pv, "from-host"), "hello from the host\n", 0o644)
		if got := sh(db, "cat /var/lib/db/from-host"); got != "hello from the host" {
			t.Fatalf("pod reads %q", got)
		}
		// The kubelet's update: a new timestamped directory, ..data swapped by rename.
		mustMkdir(t, filepath.Join(cm, "..v2"))
		mustWrite(t, filepath.Join(cm, "..v2", "key"), "v2\n", 0o644)
		if err := os.Symlink("..v2", filepath.Join(cm, "..data_tmp")); err != nil {
			t.Fatal(err)
		}
		if err := os.Rename(filepath.Join(cm, "..data_tmp"), filepath.Join(cm, "..data")); err != nil {
			t.Fatal(err)
		}
		deadline := time.Now().Add(10 * time.Second)
		for {
			got := sh(db, "cat /etc/config/key")
			if got == "v2" {
				break
			}
			if got != "v1" || time.Now().After(deadline) {
				t.Fatalf("ConfigMap key after the swap: %q, want v2 (or v1 until it is seen)", got)
			}
			time.Sleep(200 * time.Millisecond)
		}
	})

	t.Run("read-only mounts stay read-only", func(t *testing.T) {
		_, errOut, code := c.Exec(t, db, "sh", "-c", "echo x > /etc/config/new")
		if code == 0 || !strings.Contains(errOut, "Read-only file system") {
			t.Fatalf("writing into the read-only mount: exit %d, %q", code, errOut)
		}
		if _, err := os.Stat(filepath.Join(cm, "new")); !os.IsNotExist(err) {
			t.Fatalf("the write reached the host: %v", err)
		}
	})

	t.Run("an emptyDir is shared by two containers", func(t *testing.T) {
		sh(db, "echo from-db > /scratch/f")
		if got := sh(side, "cat /shared/f"); got != "from-db" {
			t.Fatalf("sidecar reads %q", got)
		}
		sh(side, "echo from-sidecar > /shared/g")
		if got := sh(db, "cat /scratch/g"); got != "from-sidecar" {
			t.Fatalf("db reads %q", got)
		}
	})

	c.RemovePod(t, pod)
	if left := c.Leftovers(); len(left) > 0 {
		t.Fatalf("after RemovePodSandbox:\n  %s", strings.Join(left, "\n  "))
	}
	// The volumes are the host's: everything written is still there.
	if n, err := os.ReadDir(filepath.Join(pv, "many")); err != nil || len(n) != 10000 {
		t.Fatalf("after the pod: %d files, %v", len(n), err)
	}
	if fi, err := os.Stat(filepath.Join(pv, "big")); err != nil || fi.Size() != 1<<30 {
		t.Fatalf("after the pod: big is %v, %v", fi, err)
	}
	_ = ctx
}

// TestCRISharedVolumesBadInput: a socket and a FIFO as a volume each fail the container
// with an error naming it, and leave nothing. (A host path that does not exist never
// reaches the runtime through the CRI, which creates it as a directory, for runc too;
// the shim's refusal of one is shim/virtiofs's TestShareRejects.)
func TestCRISharedVolumesBadInput(t *testing.T) {
	c := harness.StartCRI(t, harness.Options{})
	ctx := c.Ctx(t)
	image := c.Pull(t, c.BusyboxRef, harness.Handler)
	host := t.TempDir()
	sock := filepath.Join(host, "app.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	fifo := filepath.Join(host, "fifo")
	if err := syscall.Mkfifo(fifo, 0o600); err != nil {
		t.Fatal(err)
	}
	podCfg := c.PodConfig("bad-volumes", nil)
	pod := c.RunPod(t, podCfg, harness.Handler)
	for _, tc := range []struct{ name, path, want string }{
		{"socket", sock, "is a socket, which a VM cannot share"},
		{"fifo", fifo, "is a FIFO, which a VM cannot share"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			id, err := c.CreateContainer(ctx, pod, podCfg, withMounts(harness.ContainerConfig(tc.name, image, "true"),
				&runtime.Mount{HostPath: tc.path, ContainerPath: "/vol"}))
			if err == nil {
				_, err = c.Runtime.StartContainer(ctx, &runtime.StartContainerRequest{ContainerId: id})
				c.Runtime.RemoveContainer(ctx, &runtime.RemoveContainerRequest{ContainerId: id})
			}
			if err == nil || !strings.Contains(err.Error(), tc.path) || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("error %v, want one naming %s and saying %q", err, tc.path, tc.want)
			}
		})
	}
	// The pod still works.
	ok := c.StartContainer(t, pod, podCfg, harness.ContainerConfig("ok", image, "sleep", "1000"))
	if out, _, code := c.Exec(t, ok, "echo", "alive"); code != 0 || strings.TrimSpace(out) != "alive" {
		t.Fatalf("the pod after the refused containers: %q exit %d", out, code)
	}
	c.RemovePod(t, pod)
	if left := c.Leftovers(); len(left) > 0 {
		t.Fatalf("after RemovePodSandbox:\n  %s", strings.Join(left, "\n  "))
	}
}

func fileSHA256(t *testing.T, path string) string {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		t.Fatal(err)
	}
	return fmt.Sprintf("%x", h.Sum(nil))
}
