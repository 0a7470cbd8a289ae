package integration

import (
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"
	runtime "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/caisson-containers/caisson/integration-tests/harness"
	"github.com/caisson-containers/caisson/shim/config"
	"github.com/caisson-containers/caisson/shim/pod"
)

// TestCRITemplate: with hypervisor.template, pods started at once share one template,
// made once; each is a VM of its own made from it, with its own network (host to pod and
// pod to pod TCP), its own random numbers (the guest's pool is reseeded with the host's),
// the host's wall clock, exec and its containers. No restore announces the pod's NIC
// (QEMU's RARPs after a migration, which the bridge would flood to every pod). Removing
// the pods leaves the template and nothing else.
func TestCRITemplate(t *testing.T) {
	c := harness.StartCRI(t, harness.Options{Runtime: func(cfg *config.Config) { cfg.Hypervisor.Template = true }})
	image := c.Pull(t, c.BusyboxRef, harness.Handler)
	rarp := harness.Sniff(t, unix.ETH_P_RARP)

	names := []string{"tmpl-a", "tmpl-b", "tmpl-c"}
	cfgs := make([]*runtime.PodSandboxConfig, len(names))
	pods := make([]string, len(names))
	var wg sync.WaitGroup
	for i, name := range names {
		cfgs[i] = c.PodConfig(name, nil)
		wg.Go(func() { pods[i] = c.RunPod(t, cfgs[i], harness.Handler) })
	}
	wg.Wait()
	if t.Failed() {
		t.FailNow()
	}
	time.Sleep(time.Second) // QEMU's announce, by default, ends 750 ms after the load
	if frames := rarp.Frames(t); len(frames) > 0 {
		t.Errorf("%d RARP frames on the host's interfaces while the pods started, the first from %s: the restores announced the pods' NICs",
			len(frames), net.HardwareAddr(frames[0][6:12]))
	}
	templates, _ := filepath.Glob(filepath.Join(c.Config.StateDir, pod.TemplatesDir, "*", "state"))
	if len(templates) != 1 {
		t.Fatalf("templates made for three pods of one shape: %v, want one", templates)
	}
	log, err := os.ReadFile(filepath.Join(c.Dir, "containerd.log"))
	if err != nil {
		t.Fatal(err)
	}
	if n := strings.Count(string(log), `msg="VM template made"`); n != 1 {
		t.Fatalf("the template was made %d times", n)
	}

	srv := make([]string, len(names))
	for i := range names {
		srv[i] = c.StartContainer(t, pods[i], cfgs[i], harness.ContainerConfig("server", image, tcpServer(8080, "pong-from-"+names[i])...))
	}
	randoms := map[string]bool{}
	for i, name := range names {
		ip := c.PodIP(t, pods[i])
		if got, err := dialLine(net.JoinHostPort(ip, "8080")); err != nil || got != "pong-from-"+name {
			t.Fatalf("host to pod %s at %s: %q, %v", name, ip, got, err)
		}
		out, errOut, code := c.Exec(t, srv[i], "sh", "-c", "head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'")
		if code != 0 || len(out) != 64 {
			t.Fatalf("random bytes in pod %s: %q %s (exit %d)", name, out, errOut, code)
		}
		randoms[out] = true
		out, _, _ = c.Exec(t, srv[i], "busybox", "date", "+%s")
		guest, err := strconv.ParseInt(strings.TrimSpace(out), 10, 64)
		if d := time.Since(time.Unix(guest, 0)); err != nil || d < -time.Minute || d > time.Minute {
			t.Fatalf("the guest clock of pod %s says %q, %v off the host's", name, out, d)
		}
	}
	if len(randoms) != len(names) {
		t.Fatalf("pods made from one template read the same random bytes: %v", randoms)
	}
	ipA := c.PodIP(t, pods[0])
	out, errOut, code := c.Exec(t, srv[1], "sh", "-c", "for i in 1 2 3 4 5; do nc "+ipA+" 8080 </dev/null && exit 0; sleep 1; done; exit 1")
	if code != 0 || strings.TrimSpace(out) != "pong-from-tmpl-a" {
		t.Fatalf("pod b to pod a: exit %d, %q, %s", code, out, errOut)
	}

	for _, p := range pods {
		c.RemovePod(t, p)
	}
	if left := c.Leftovers(); len(left) > 0 {
		t.Fatalf("after RemovePodSandbox:\n  %s", strings.Join(left, "\n  "))
	}
	if _, err := os.Stat(templates[0]); err != nil {
		t.Fatalf("the template went with the pods: %v", err)
	}
}
