package integration

import (
	"fmt"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/containerd/log"
	"github.com/sirupsen/logrus"

	"github.com/caisson-containers/caisson/integration-tests/harness"
	"github.com/caisson-containers/caisson/internal/testutil"
	"github.com/caisson-containers/caisson/shim/config"
	caissonpod "github.com/caisson-containers/caisson/shim/pod"
	"github.com/caisson-containers/caisson/shim/vmm/hypervisor"
)

// TestDemo is the quickstart's walkthrough (hack/demo.sh runs it with -test.v and shows
// what it prints): a private containerd, a demo image built and served locally, a pod VM
// started through the CRI with two containers, what the pod sees (the guest kernel, the
// rootfs devices, the DAX mount, TCP between its containers and from the host), a pod
// started from a VM template, and everything removed, the host's IP forwarding included.
// As a test it checks each of those, and runs with the others (make test) so that what
// the README says the demo does stays true.
func TestDemo(t *testing.T) {
	began := time.Now()
	step := func(format string, a ...any) {
		fmt.Printf("\033[1m>> "+format+"\033[0m\n", a...)
	}
	timed := func(what string, f func()) {
		fmt.Printf("   %s ...", what)
		start := time.Now()
		f()
		fmt.Printf(" %.1f s\n", time.Since(start).Seconds())
	}
	show := func(title, out string) {
		fmt.Printf("   %s\n", title)
		for _, l := range strings.Split(strings.TrimRight(out, "\n"), "\n") {
			fmt.Printf("     | %s\n", l)
		}
	}

	// The CNI bridge turns the host's IP forwarding on; the harness puts it back when the
	// environment goes. Registered first, this runs after that.
	forwarding := harness.Forwarding()
	t.Cleanup(func() {
		if diff := forwarding.Diff(harness.Forwarding()); diff != "" {
			t.Errorf("the host's IP forwarding is not as the demo found it: %s", diff)
			return
		}
		fmt.Printf("   the host's %d IP forwarding sysctls as the demo found them\n", len(forwarding))
	})

	step("starting a private containerd (its own root, state and socket under a temporary directory), caisson-snapshotter, a CNI bridge and an image registry on 127.0.0.1")
	var c *harness.CRI
	tmplCfg := func(cfg *config.Config) { cfg.Hypervisor.Template = true }
	timed("starting", func() {
		c = harness.StartCRI(t, harness.Options{Handlers: map[string]func(*config.Config){templateHandler: tmplCfg}})
	})
	fmt.Printf("   containerd socket %s\n   pod VM state %s\n", c.Address, c.StateDir)

	step("pulling the demo image (busybox, built by the demo and pushed to the local registry) through the CRI into the caisson snapshotter (EROFS layers)")
	var image string
	timed("pulling "+c.BusyboxRef, func() { image = c.Pull(t, c.BusyboxRef, harness.Handler) })

	step("RunPodSandbox with runtime handler %q: one VM for the pod, its network from CNI", harness.Handler)
	podCfg := c.PodConfig("demo", nil)
	var pod string
	booted := time.Now()
	timed("booting the pod VM (a few seconds under TCG, well under one with KVM)", func() { pod = c.RunPod(t, podCfg, harness.Handler) })
	bootedTook := time.Since(booted)
	ip := c.PodIP(t, pod)
	fmt.Printf("   pod %.12s, IP %s\n", pod, ip)

	step("two containers in the pod's VM")
	var web, shell string
	timed("web (a TCP server on :8080)", func() {
		web = c.StartContainer(t, pod, podCfg, harness.ContainerConfig("web", image, tcpServer(8080, "hello-from-a-caisson-pod")...))
	})
	timed("shell", func() {
		shell = c.StartContainer(t, pod, podCfg, harness.ContainerConfig("shell", image, "sleep", "100000"))
	})

	step("what the pod sees")
	host, _ := exec.Command("uname", "-r").Output()
	out, _, _ := c.Exec(t, shell, "uname", "-r")
	show(fmt.Sprintf("kernel: the guest's, not the host's (%s)", strings.TrimSpace(string(host))), out)
	if strings.TrimSpace(out) != guestRelease {
		t.Errorf("guest kernel %q, want %s", out, guestRelease)
	}
	out, _, _ = c.Exec(t, shell, "sh", "-c", "for d in /sys/block/*; do printf '%s dax=%s size=%s\\n' ${d##*/} $(cat $d/queue/dax) $(cat $d/size); done")
	show("block devices of the VM: image layers as virtio-pmem (pmemN, DAX) and the writable layer as virtio-blk (vdN)", out)
	if !strings.Contains(out, "pmem0 dax=1") || !strings.Contains(out, "vda") {
		t.Errorf("want a DAX pmem0 and a vda:\n%s", out)
	}
	out, _, _ = c.Exec(t, shell, "sh", "-c", "grep ' / / ' /proc/self/mountinfo | tr ',' '\\n'")
	show("the container's root: an overlay of the image's EROFS layers (the agent mounts /dev/pmemN with dax=always) under the ext4 writable disk's upper dir", out)
	qemus := c.QEMUs()
	if len(qemus) != 1 {
		t.Fatalf("%d QEMU processes for one pod", len(qemus))
	}
	maps, _ := os.ReadFile("/proc/" + qemus[0] + "/maps")
	var dax []string
	for _, l := range strings.Split(string(maps), "\n") {
		if strings.HasSuffix(l, "layer.erofs") {
			f := strings.Fields(l)
			dax = append(dax, f[0]+" "+f[1]+" "+f[len(f)-1])
		}
	}
	show(fmt.Sprintf("DAX on the host: QEMU (pid %s) maps the layer files themselves into guest memory, so the guest reads the host's page cache without a copy", qemus[0]), strings.Join(dax, "\n"))
	if len(dax) == 0 {
		t.Errorf("QEMU maps no layer.erofs file")
	}
	out, _, _ = c.Exec(t, shell, "sh", "-c", fmt.Sprintf("nc %s 8080 </dev/null", ip))
	show("shell -> web over the pod network", out)
	if strings.TrimSpace(out) != "hello-from-a-caisson-pod" {
		t.Errorf("shell to web: %q", out)
	}
	got, err := dialLine(ip + ":8080")
	show("host -> web at the pod IP", got)
	if err != nil || got != "hello-from-a-caisson-pod" {
		t.Errorf("host to pod: %q, %v", got, err)
	}

	step("removing the pod")
	timed("StopPodSandbox + RemovePodSandbox", func() { c.RemovePod(t, pod) })
	if left := c.Leftovers(); len(left) > 0 {
		t.Fatalf("left behind:\n  %s", strings.Join(left, "\n  "))
	}
	fmt.Println("   no QEMU, network namespace, veth, mount or pod state left")
	_ = web

	step("faster pod starts: a VM template (hypervisor.template = true, off by default; docs/cri.md)")
	tc := c.Config
	tmplCfg(&tc)
	var dir string
	timed("making the template once: a VM booted and saved when its agent is ready (`caisson template create`, or the first pod)", func() {
		var err error
		quiet := logrus.New() // the demo prints its own lines (the TCG warning was the first pod's)
		quiet.SetLevel(logrus.ErrorLevel)
		hv, err := hypervisor.New(tc)
		if err != nil {
			t.Fatal(err)
		}
		if dir, err = caissonpod.Template(log.WithLogger(c.Ctx(t), logrus.NewEntry(quiet)), tc, hv); err != nil {
			t.Fatal(err)
		}
	})
	fmt.Printf("   %s\n", dir)
	fromTemplate := time.Now()
	timed(fmt.Sprintf("RunPodSandbox with handler %q: the pod VM resumes the template instead of booting", templateHandler), func() {
		pod = c.RunPod(t, c.PodConfig("demo-template", nil), templateHandler)
	})
	fmt.Printf("   %.1f s from the template, %.1f s booted\n", time.Since(fromTemplate).Seconds(), bootedTook.Seconds())
	timed("StopPodSandbox + RemovePodSandbox (the template stays for the next pods)", func() { c.RemovePod(t, pod) })
	if left := c.Leftovers(); len(left) > 0 {
		t.Fatalf("left behind:\n  %s", strings.Join(left, "\n  "))
	}
	t.Cleanup(func() {
		step("stopped containerd and the snapshotter, removed their directories (%.0f s in all)", time.Since(began).Seconds())
	})
}

// TestDemoLeavesHostForwarding: the README says the demo changes nothing outside the
// checkout, yet the CNI bridge plugin turns the host's IP forwarding on for its gateway
// bridge and never off. The harness the demo runs on puts the forwarding sysctls back
// (harness.NewCNI). So that there is something to put back, this test turns
// net.ipv4.ip_forward off first (the host's own values return at its end), runs a pod
// through the CRI as the demo does, checks that forwarding was on while the pod ran, and
// that every forwarding sysctl is as before once the environment is gone.
func TestDemoLeavesHostForwarding(t *testing.T) {
	testutil.RequireRoot(t)
	const ipForward = "/proc/sys/net/ipv4/ip_forward"
	host := harness.Forwarding()
	t.Cleanup(func() {
		if err := host.Restore(); err != nil {
			t.Errorf("put back the host's IP forwarding: %v", err)
		}
	})
	if err := os.WriteFile(ipForward, []byte("0\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	before := harness.Forwarding()
	podRan := false
	t.Run("pod", func(t *testing.T) {
		c := harness.StartCRI(t, harness.Options{})
		c.Pull(t, c.BusyboxRef, harness.Handler)
		pod := c.RunPod(t, c.PodConfig("forwarding", nil), harness.Handler)
		b, err := os.ReadFile(ipForward)
		if err != nil {
			t.Fatal(err)
		}
		if v := strings.TrimSpace(string(b)); v != "1" {
			t.Fatalf("net.ipv4.ip_forward = %s with a pod on the bridge: the bridge plugin no longer turns it on, so this test shows nothing", v)
		}
		c.RemovePod(t, pod)
		podRan = true
	})
	if !podRan {
		return // the subtest failed or was skipped, and said why
	}
	if diff := before.Diff(harness.Forwarding()); diff != "" {
		t.Errorf("after the environment is gone: %s", diff)
	}
}
