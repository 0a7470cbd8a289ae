package integration

import (
	"bufio"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/containerd/v2/pkg/shim"

	"github.com/caisson-containers/caisson/integration-tests/harness"
	"github.com/caisson-containers/caisson/internal/testutil"
	"github.com/caisson-containers/caisson/shim/config"
	"github.com/caisson-containers/caisson/shim/pod"
	"github.com/caisson-containers/caisson/shim/warm"
)

// matrixVersions are the containerd versions of containerd-versions.txt.
func matrixVersions(t *testing.T) []string {
	f, err := os.Open(filepath.Join(testutil.RepoRoot(t), "integration-tests", "containerd-versions.txt"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var versions []string
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if line := strings.TrimSpace(sc.Text()); line != "" && !strings.HasPrefix(line, "#") {
			versions = append(versions, line)
		}
	}
	return versions
}

// legacySocketDir is where the shim puts its socket for containerd 1.7–2.2, whose
// start protocol names no socket directory (shim/launch).
const legacySocketDir = "/run/containerd/s"

// TestContainerdVersions is the version matrix: one shim binary and one snapshotter
// under each containerd of containerd-versions.txt (built from the Go module proxy by
// hack/build-containerd.sh) and the pinned one, each from the contrib configuration of
// its schema (version 2 for containerd 1.7, 3 for 2.x). On each: that containerd's own
// ctr pulls an image and unpacks it into the caisson snapshotter, `ctr run` runs a
// container in a VM (its output is the guest kernel's release, its exit status comes
// back); through the CRI a pod runs two containers in one VM, an exec answers in it,
// and the pod is removed; nothing is left: no VM, mount, loop device, pod state, network
// namespace, or shim socket.
func TestContainerdVersions(t *testing.T) {
	versions := append(matrixVersions(t), "pinned")
	for _, v := range versions {
		t.Run(v, func(t *testing.T) {
			var cd *harness.Containerd
			if v != "pinned" {
				cd = harness.MatrixContainerd(t, v)
			}
			smokeTest(t, cd)
		})
	}
}

func smokeTest(t *testing.T, cd *harness.Containerd) {
	// The shims' sockets, by the legacy protocol's names (shim/launch): checked once
	// the environment's own cleanup has run (this is registered first, so it runs
	// last), when containerd is gone and the shims, which remove their sockets as
	// they exit, should be too.
	var sockets []string
	t.Cleanup(func() {
		deadline := time.Now().Add(harness.LeftoverGrace)
		for {
			var left []string
			for _, s := range sockets {
				if _, err := os.Stat(s); err == nil {
					left = append(left, s)
				}
			}
			if len(left) == 0 {
				return
			}
			if time.Now().After(deadline) {
				t.Errorf("shim sockets left: %v", left)
				return
			}
			time.Sleep(100 * time.Millisecond)
		}
	})
	o := harness.Options{Containerd: cd, Handlers: map[string]func(*config.Config){
		warmHandler:       func(c *config.Config) { c.Hypervisor.Template, c.Hypervisor.WarmVMs = true, 1 },
		warmBootedHandler: func(c *config.Config) { c.Hypervisor.WarmVMs = 1 },
	}}
	if cd != nil && cd.Older(2, 0) {
		o.ContribConfig = "config-v2.toml"
	}
	c := harness.StartCRI(t, o)
	t.Logf("containerd %s", c.Containerd.Version)
	// containerd < 2.3 starts the shim with the legacy protocol (shim/launch).
	legacy := c.Containerd.Older(2, 3)
	socket := func(namespace, id string) string {
		a, err := shim.CreateSocketAddress(namespaces.WithNamespace(context.Background(), namespace), legacySocketDir, c.Address, id, false)
		if err != nil {
			t.Fatal(err)
		}
		return strings.TrimPrefix(a, "unix://")
	}

	// ctr: pull and unpack into caisson, then a container in a VM of its own.
	if out, errOut, code := c.Ctr(t, "images", "pull", "--plain-http", "--snapshotter", "caisson", c.BusyboxRef); code != 0 {
		t.Fatalf("ctr images pull (exit %d):\n%s%s", code, out, errOut)
	}
	out, errOut, code := c.Ctr(t, "snapshots", "--snapshotter", "caisson", "ls")
	if code != 0 || !regexp.MustCompile(`(?m)Committed\s*$`).MatchString(out) {
		t.Fatalf("caisson snapshots after the pull (exit %d):\n%s%s", code, out, errOut)
	}
	out, errOut, code = c.Ctr(t, "run", "--rm", "--runtime", "io.containerd.caisson.v2", "--snapshotter", "caisson",
		c.BusyboxRef, "smoke-ctr", "sh", "-c", "uname -r; exit 3")
	if code != 3 || strings.TrimSpace(out) != guestRelease {
		t.Fatalf("ctr run: exit %d, output %q (stderr %q); want exit 3 and the guest's %s", code, out, errOut, guestRelease)
	}
	if legacy {
		sockets = append(sockets, socket(harness.Namespace, "smoke-ctr"))
	}
	if out, _, _ := c.Ctr(t, "containers", "ls", "-q"); strings.TrimSpace(out) != "" {
		t.Errorf("containers left after ctr run --rm: %s", out)
	}

	// CRI: one pod, two containers in its VM, an exec, removal.
	image := c.Pull(t, c.BusyboxRef, harness.Handler)
	podCfg := c.PodConfig("smoke", nil)
	smokePod := c.RunPod(t, podCfg, harness.Handler)
	if legacy {
		// The pod's shim is where the legacy protocol puts it (so the check at the end
		// looks at the right name).
		sockets = append(sockets, socket("k8s.io", smokePod))
		if _, err := os.Stat(sockets[len(sockets)-1]); err != nil {
			t.Errorf("the pod's shim socket: %v", err)
		}
	}
	web := c.StartContainer(t, smokePod, podCfg, harness.ContainerConfig("web", image, "sleep", "100000"))
	shell := c.StartContainer(t, smokePod, podCfg, harness.ContainerConfig("shell", image, "sh", "-c", "echo hello >/tmp/x; sleep 100000"))
	if out, _, code := c.Exec(t, web, "uname", "-r"); code != 0 || strings.TrimSpace(out) != guestRelease {
		t.Fatalf("exec uname -r = %q (exit %d), want the guest's %s", out, code, guestRelease)
	}
	if out, _, code := c.Exec(t, shell, "cat", "/tmp/x"); code != 0 || strings.TrimSpace(out) != "hello" {
		t.Errorf("exec cat /tmp/x = %q (exit %d)", out, code)
	}
	if n := len(c.QEMUs()); n != 1 {
		t.Errorf("%d QEMU processes for one pod of two containers", n)
	}
	c.RemovePod(t, smokePod)
	if left := c.Leftovers(); len(left) > 0 {
		t.Errorf("left after the pod: %v", left)
	}

	// Warm VMs (hypervisor.warm_vms), from a template and booted: the first pod fills
	// the pool, the second starts in the warm VM, whose shim this containerd's start
	// protocol handed the pod.
	for _, handler := range []string{warmHandler, warmBootedHandler} {
		var warmPods []string
		for i := range 2 {
			if i == 1 {
				waitWarm(t, c.StateDir, 1)
			}
			cfg := c.PodConfig(fmt.Sprintf("smoke-%s-%d", handler, i), nil)
			p := c.RunPod(t, cfg, handler)
			warmPods = append(warmPods, p)
			if legacy {
				sockets = append(sockets, socket("k8s.io", p))
			}
			if taken := strings.Contains(podLog(t, c, p), `msg="warm VM taken"`); taken != (i == 1) {
				t.Fatalf("%s pod %d: took a warm VM: %v", handler, i, taken)
			}
			ctr := c.StartContainer(t, p, cfg, harness.ContainerConfig("app", image, "sleep", "100000"))
			if out, _, code := c.Exec(t, ctr, "uname", "-r"); code != 0 || strings.TrimSpace(out) != guestRelease {
				t.Fatalf("exec in %s pod %d: %q (exit %d)", handler, i, out, code)
			}
		}
		for _, p := range warmPods {
			c.RemovePod(t, p)
		}
		if n, err := warm.Drain(c.StateDir, 10*time.Second, pod.ReleaseWarmSlot); err != nil || n != 1 {
			t.Errorf("caisson warm remove (%s): %d ended, %v", handler, n, err)
		}
		if left := c.Leftovers(); len(left) > 0 {
			t.Errorf("left after the %s pods: %v", handler, left)
		}
	}
}
