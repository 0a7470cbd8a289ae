package integration

import (
	"bufio"
	"context"
	"flag"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	runtime "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/caisson-containers/caisson/integration-tests/harness"
	"github.com/caisson-containers/caisson/internal/testutil"
	"github.com/caisson-containers/caisson/shim/config"
)

// phases of a Caisson pod start, from the shim's debug log (containerd's log): CRI to
// QEMU started, QEMU started to the agent answering (the guest's boot), the sandbox and
// the pause container's storages set up in the guest, the pause container created and
// started, and the app container (create and start, with its disk hot-plug).
var phaseNames = []string{"cri-to-qemu", "boot-to-agent", "sandbox-and-storages", "pause-container", "app-container"}

// shimPhases finds, in containerd's log, when the shim of pod started QEMU, the agent
// answered and the pod's VM was ready, and returns the phases of a pod start that ran
// from start to end, RunPodSandbox returning at sandboxDone.
func shimPhases(b *testing.B, c *harness.CRI, pod string, start, sandboxDone, end time.Time) []time.Duration {
	b.Helper()
	return phasesOf(b, pod, shimMarks(b, c, pod)[pod], start, sandboxDone, end)
}

// shimMarkers are the shim's debug log messages a start's phases are read from.
var shimMarkers = []string{"qemu started", "agent ready", "pod VM ready", "warm VM taken"}

// shimMarks reads containerd's log once and returns, for each of pods, when its shim
// first logged each of shimMarkers.
func shimMarks(b *testing.B, c *harness.CRI, pods ...string) map[string]map[string]time.Time {
	b.Helper()
	f, err := os.Open(filepath.Join(c.Dir, "containerd.log"))
	if err != nil {
		b.Fatal(err)
	}
	defer f.Close()
	marks := map[string]map[string]time.Time{}
	for _, pod := range pods {
		marks[pod] = map[string]time.Time{}
	}
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		i := slices.IndexFunc(shimMarkers, func(msg string) bool { return strings.Contains(line, `msg="`+msg+`"`) })
		if i < 0 {
			continue
		}
		msg := shimMarkers[i]
		for _, pod := range pods {
			if _, seen := marks[pod][msg]; seen || !strings.Contains(line, "container="+pod) {
				continue
			}
			ts, ok := strings.CutPrefix(line, `time="`)
			if !ok {
				continue
			}
			ts, _, _ = strings.Cut(ts, `"`)
			if t, err := time.Parse(time.RFC3339Nano, ts); err == nil {
				marks[pod][msg] = t
			}
		}
	}
	if err := sc.Err(); err != nil {
		b.Fatalf("reading containerd's log: %v", err)
	}
	return marks
}

// phasesOf turns a pod's marks (see shimMarks) into the phases of its start, which ran
// from start to end, RunPodSandbox returning at sandboxDone.
func phasesOf(b *testing.B, pod string, marks map[string]time.Time, start, sandboxDone, end time.Time) []time.Duration {
	b.Helper()
	at := maps.Clone(marks)
	// A pod that started in a warm VM (hypervisor.warm_vms) took a VM whose agent
	// answers: its devices' hot-plugs end cri-to-qemu, and boot-to-agent is nil.
	if taken, ok := at["warm VM taken"]; ok {
		at["qemu started"], at["agent ready"] = taken, taken
		delete(at, "warm VM taken")
	}
	if len(at) != 3 {
		b.Fatalf("pod %s: the shim's debug log has only %v of qemu started, agent ready, pod VM ready", pod, at)
	}
	return []time.Duration{
		at["qemu started"].Sub(start),
		at["agent ready"].Sub(at["qemu started"]),
		at["pod VM ready"].Sub(at["agent ready"]),
		sandboxDone.Sub(at["pod VM ready"]),
		end.Sub(sandboxDone),
	}
}

// podStart runs a pod with the handler and one app container, and returns the time from
// RunPodSandbox until the app container is Running (as the kubelet sees it), and for
// Caisson the phases of it (see phaseNames). The pod is removed afterwards, untimed.
func podStart(b *testing.B, c *harness.CRI, handler, image string, i int) (time.Duration, []time.Duration) {
	return podStartWith(b, c, handler, image, fmt.Sprint(i), nil)
}

// podStartWith is podStart with the app container's configuration adjusted.
func podStartWith(b *testing.B, c *harness.CRI, handler, image, name string, adjust func(*runtime.ContainerConfig)) (time.Duration, []time.Duration) {
	b.Helper()
	ctx := c.Ctx(b)
	cfg := c.PodConfig(fmt.Sprintf("bench-%s-%s", handler, name), nil)
	if err := os.MkdirAll(cfg.LogDirectory, 0o755); err != nil {
		b.Fatal(err)
	}
	start := time.Now()
	resp, err := c.Runtime.RunPodSandbox(ctx, &runtime.RunPodSandboxRequest{Config: cfg, RuntimeHandler: handler})
	if err != nil {
		b.Fatalf("RunPodSandbox (%s): %v", handler, err)
	}
	sandboxDone := time.Now()
	app := harness.ContainerConfig("app", image, "sleep", "100000")
	if adjust != nil {
		adjust(app)
	}
	id, err := c.CreateContainer(ctx, resp.PodSandboxId, cfg, app)
	if err != nil {
		b.Fatalf("CreateContainer (%s): %v", handler, err)
	}
	if _, err := c.Runtime.StartContainer(ctx, &runtime.StartContainerRequest{ContainerId: id}); err != nil {
		b.Fatalf("StartContainer (%s): %v", handler, err)
	}
	st, err := c.Runtime.ContainerStatus(ctx, &runtime.ContainerStatusRequest{ContainerId: id})
	end := time.Now()
	if err != nil || st.Status.State != runtime.ContainerState_CONTAINER_RUNNING {
		b.Fatalf("app container (%s) after StartContainer: %v %v", handler, st.GetStatus(), err)
	}
	var phases []time.Duration
	if handler != harness.RuncHandler {
		phases = shimPhases(b, c, resp.PodSandboxId, start, sandboxDone, end)
	}
	c.RemovePod(b, resp.PodSandboxId)
	return end.Sub(start), phases
}

// bareBoot boots the same kernel, with the pod VM's memory, CPUs and accelerator, into a
// busybox initramfs whose /init powers off at once, and returns QEMU start → exit.
func bareBoot(b *testing.B, c *harness.CRI, initrd string) time.Duration {
	b.Helper()
	vm := newBareVM(b, c, initrd, "")
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	start := time.Now()
	if err := vm.Start(ctx); err != nil {
		b.Fatal(err)
	}
	defer vm.Stop(context.Background())
	select {
	case <-vm.Done():
	case <-ctx.Done():
		b.Fatal("the bare guest did not power off")
	}
	return time.Since(start)
}

// BenchmarkCRIPodStart (make bench-cri) reports, as medians over b.N rounds, each round
// one pod of each kind in turn on the same containerd (the caisson pod's phases too, see
// phaseNames, which need the shim's debug log the harness turns on):
//   - caisson-s, runc-s: RunPodSandbox → the first app container Running, with the caisson
//     handler and with runc (CNI networking in both), and their ratio;
//   - bare-boot-s: a bare boot of the same kernel (QEMU start → a trivial /init powered
//     the VM off), and caisson-vs-bare, the pod start over it (target ≤ 1.5);
//   - template-s, and its phases: a pod from a VM template; template-readonly-s and
//     its phases: the same with the app container's rootfs read-only
//     (readOnlyRootFilesystem), which writes to a tmpfs in the guest instead of a disk of
//     its own (docs/mounts.md);
//   - warm-s, and its phases: a pod that started in a warm VM (hypervisor.warm_vms = 1),
//     with warm-vs-template; warm-booted-s, and its phases: the same without a template
//     (the warm VMs boot), with warm-booted-vs-caisson. Each round waits, untimed, for
//     the pools to be full again before each warm pod and after it, so that no warm-up
//     runs beside a timed start.
//
// With -cri.compare-initramfs NAME=PATH,..., each round also starts a pod of a handler
// like caisson's that boots the initramfs at PATH (e.g. the image before a change,
// built from a clean export), and one from a template of it, reported as NAME-s,
// NAME-vs-bare, NAME-vs-caisson and NAME's phases, and NAME-template-s and the rest
// (NAME-template-vs-template): a before and after in the same run, on the same
// containerd. -cri.compare-shim NAME=PATH does the same with another build of the shim
// (containerd's runtime_path), whose pods keep their state and templates apart.
func BenchmarkCRIPodStart(b *testing.B) {
	handlers := map[string]func(*config.Config){
		templateHandler:   func(c *config.Config) { c.Hypervisor.Template = true },
		warmHandler:       func(c *config.Config) { c.Hypervisor.Template, c.Hypervisor.WarmVMs = true, 1 },
		warmBootedHandler: func(c *config.Config) { c.Hypervisor.WarmVMs = 1 },
	}
	variants := append(compareVariants(b, *compareInitramfsFlag, "-cri.compare-initramfs", false),
		compareVariants(b, *compareShimFlag, "-cri.compare-shim", true)...)
	for _, v := range variants {
		if _, dup := handlers[v.handler]; dup {
			b.Fatalf("two comparisons named %s", strings.TrimPrefix(v.handler, "caisson-"))
		}
		handlers[v.handler] = func(c *config.Config) {
			if v.initramfs != "" {
				c.Guest.Initramfs = v.initramfs
			}
			if v.stateDir != "" {
				c.StateDir = v.stateDir
			}
			c.Hypervisor.Template = v.template
		}
	}
	c := harness.StartCRI(b, harness.Options{Handlers: handlers, ContainerdConfig: func(cfg map[string]any) {
		for _, v := range variants {
			if v.shim != "" {
				harness.CRIRuntimes(cfg)[v.handler].(map[string]any)["runtime_path"] = v.shim
			}
		}
	}})
	imgCaisson := c.Pull(b, c.BusyboxRef, harness.Handler)
	imgRunc := c.Pull(b, c.BusyboxRef, harness.RuncHandler)
	// The template is made by the first pod of its shape on the node, once: a pod
	// before the timed ones makes it.
	made, _ := podStart(b, c, templateHandler, imgCaisson, -1)
	// The warm handlers' first pods start without a warm VM and fill their pools.
	podStart(b, c, warmHandler, imgCaisson, -1)
	podStart(b, c, warmBootedHandler, imgCaisson, -1)
	const pools = 2
	for _, v := range variants {
		if v.template {
			podStart(b, c, v.handler, imgCaisson, -1)
		}
	}

	initrd := bareInitramfs(b, "/bin/busybox poweroff -f")

	var ours, fromTemplate, readOnly, warmed, warmBooted, runc, bare []time.Duration
	phases := make([][]time.Duration, len(phaseNames))
	warmPhases := make([][]time.Duration, len(phaseNames))
	warmBootedPhases := make([][]time.Duration, len(phaseNames))
	templatePhases := make([][]time.Duration, len(phaseNames))
	readOnlyPhases := make([][]time.Duration, len(phaseNames))
	readOnlyApp := func(cc *runtime.ContainerConfig) {
		cc.Linux.SecurityContext = &runtime.LinuxContainerSecurityContext{ReadonlyRootfs: true}
	}
	for i := 0; i < b.N; i++ {
		r, _ := podStart(b, c, harness.RuncHandler, imgRunc, i)
		runc = append(runc, r)
		o, ph := podStart(b, c, harness.Handler, imgCaisson, i)
		ours = append(ours, o)
		addPhases(phases, ph)
		t, ph := podStart(b, c, templateHandler, imgCaisson, i)
		fromTemplate = append(fromTemplate, t)
		addPhases(templatePhases, ph)
		t, ph = podStartWith(b, c, templateHandler, imgCaisson, fmt.Sprintf("ro-%d", i), readOnlyApp)
		readOnly = append(readOnly, t)
		addPhases(readOnlyPhases, ph)
		for _, v := range variants {
			t, ph := podStart(b, c, v.handler, imgCaisson, i)
			v.starts = append(v.starts, t)
			addPhases(v.phases, ph)
		}
		waitWarm(b, c.StateDir, pools)
		t, ph = podStart(b, c, warmHandler, imgCaisson, i)
		warmed = append(warmed, t)
		addPhases(warmPhases, ph)
		waitWarm(b, c.StateDir, pools)
		t, ph = podStart(b, c, warmBootedHandler, imgCaisson, i)
		warmBooted = append(warmBooted, t)
		addPhases(warmBootedPhases, ph)
		waitWarm(b, c.StateDir, pools)
		bare = append(bare, bareBoot(b, c, initrd))
	}
	mo, mr, mb := median(ours), median(runc), median(bare)
	b.ReportMetric(mo.Seconds(), "caisson-s")
	b.ReportMetric(mr.Seconds(), "runc-s")
	b.ReportMetric(float64(mo)/float64(mr), "caisson-vs-runc")
	b.ReportMetric(mb.Seconds(), "bare-boot-s")
	b.ReportMetric(float64(mo)/float64(mb), "caisson-vs-bare")
	b.ReportMetric(0, "ns/op")
	mt := median(fromTemplate)
	b.ReportMetric(mt.Seconds(), "template-s")
	b.ReportMetric(float64(mt)/float64(mb), "template-vs-bare")
	b.ReportMetric(made.Seconds(), "template-made-s")
	breakdown := func(phases [][]time.Duration, prefix string) string {
		var out []string
		for j, name := range phaseNames {
			m := median(phases[j])
			b.ReportMetric(m.Seconds(), prefix+name+"-s")
			out = append(out, fmt.Sprintf("%s %.2f s", name, m.Seconds()))
		}
		return strings.Join(out, ", ")
	}
	fmt.Printf("CRI pod start (RunPodSandbox → first app container Running), median of %d: caisson %.2f s, runc %.2f s (%.1f×); bare guest boot %.2f s, caisson pod start %.2f× of it (target ≤ 1.5×)\n",
		b.N, mo.Seconds(), mr.Seconds(), float64(mo)/float64(mr), mb.Seconds(), float64(mo)/float64(mb))
	fmt.Printf("with hypervisor.template: %.2f s, %.2f× the bare boot (%.1f× runc); the pod that made the template: %.2f s\n",
		mt.Seconds(), float64(mt)/float64(mb), float64(mt)/float64(mr), made.Seconds())
	fmt.Printf("caisson pod start, median of each phase: %s\n", breakdown(phases, ""))
	fmt.Printf("with hypervisor.template, median of each phase (boot-to-agent is restore-to-agent): %s\n", breakdown(templatePhases, "template-"))
	mro := median(readOnly)
	b.ReportMetric(mro.Seconds(), "template-readonly-s")
	b.ReportMetric(float64(mro)/float64(mt), "template-readonly-vs-template")
	fmt.Printf("with hypervisor.template and the app container's rootfs read-only: %.2f s (%.2f× the template's); median of each phase: %s\n",
		mro.Seconds(), float64(mro)/float64(mt), breakdown(readOnlyPhases, "template-readonly-"))
	mw := median(warmed)
	b.ReportMetric(mw.Seconds(), "warm-s")
	b.ReportMetric(float64(mw)/float64(mb), "warm-vs-bare")
	b.ReportMetric(float64(mw)/float64(mt), "warm-vs-template")
	fmt.Printf("with hypervisor.warm_vms = 1 (a warm VM waiting): %.2f s, %.2f× the template's (target ≤ 0.8× a bare boot: %.2f×); median of each phase (cri-to-qemu ends when the warm VM has the pod's devices): %s\n",
		mw.Seconds(), float64(mw)/float64(mt), float64(mw)/float64(mb), breakdown(warmPhases, "warm-"))
	mwb := median(warmBooted)
	b.ReportMetric(mwb.Seconds(), "warm-booted-s")
	b.ReportMetric(float64(mwb)/float64(mb), "warm-booted-vs-bare")
	b.ReportMetric(float64(mwb)/float64(mo), "warm-booted-vs-caisson")
	fmt.Printf("with hypervisor.warm_vms = 1 and no template (a booted warm VM waiting): %.2f s, %.2f× a booted pod's (target ≤ 1.5× a bare boot: %.2f×); median of each phase: %s\n",
		mwb.Seconds(), float64(mwb)/float64(mo), float64(mwb)/float64(mb), breakdown(warmBootedPhases, "warm-booted-"))
	for _, v := range variants {
		m := median(v.starts)
		ours, kind := mo, "caisson"
		if v.template {
			ours, kind = mt, "template"
		}
		b.ReportMetric(m.Seconds(), v.name+"-s")
		b.ReportMetric(float64(m)/float64(mb), v.name+"-vs-bare")
		b.ReportMetric(float64(m)/float64(ours), v.name+"-vs-"+kind)
		what := "initramfs " + v.name + " (" + v.initramfs + ")"
		if v.shim != "" {
			what = "shim " + v.name + " (" + v.shim + ")"
		}
		fmt.Printf("with %s: %.2f s, %.2f× the bare boot, %.2f× this tree's %s pod; median of each phase: %s\n",
			what, m.Seconds(), float64(m)/float64(mb), float64(m)/float64(ours), kind, breakdown(v.phases, v.name+"-"))
	}
}

var (
	compareInitramfsFlag = flag.String("cri.compare-initramfs", "", "comma-separated NAME=PATH: other guest initramfs images whose pod starts BenchmarkCRIPodStart times beside the built one's")
	compareShimFlag      = flag.String("cri.compare-shim", "", "comma-separated NAME=PATH: other builds of containerd-shim-caisson-v2 whose pod starts BenchmarkCRIPodStart times beside the built one's")
)

// podStartVariant is a pod start with another guest initramfs or another shim, booted or
// from a template, under a handler of its own.
type podStartVariant struct {
	name, handler string
	initramfs     string // the guest initramfs ("": the built one)
	shim          string // the shim binary ("": the built one)
	stateDir      string // the runtime's state_dir ("": the harness's)
	template      bool
	starts        []time.Duration
	phases        [][]time.Duration
}

// compareVariants are the variants the flag named flagName asks for (value: NAME=PATH,...):
// initramfs images, or shim binaries if shims. Each gives a booted and a template variant.
func compareVariants(b *testing.B, value, flagName string, shims bool) []*podStartVariant {
	var vs []*podStartVariant
	for _, f := range strings.Split(value, ",") {
		if f == "" {
			continue
		}
		name, path, ok := strings.Cut(f, "=")
		if !ok || name == "" {
			b.Fatalf("%s %q: want NAME=PATH", flagName, f)
		}
		if _, err := os.Stat(path); err != nil {
			b.Fatalf("%s %s: %v", flagName, name, err)
		}
		base := podStartVariant{name: name, handler: "caisson-" + name}
		if shims {
			// Its own state and templates: another build may make templates this one
			// cannot use, and the other way round.
			base.shim, base.stateDir = path, testutil.ShortTempDir(b)
		} else {
			base.initramfs = path
		}
		for _, template := range []bool{false, true} {
			v := base
			v.template, v.phases = template, make([][]time.Duration, len(phaseNames))
			if template {
				v.name += "-template"
				v.handler += "-template"
			}
			vs = append(vs, &v)
		}
	}
	return vs
}

// templateHandler is a CRI runtime handler like caisson's whose pods start from a VM
// template (hypervisor.template).
const templateHandler = "caisson-template"

// addPhases appends the phases ph of one pod start to phases, one list per phase name.
func addPhases(phases [][]time.Duration, ph []time.Duration) {
	for j, d := range ph {
		phases[j] = append(phases[j], d)
	}
}

// warmHandler is the handler whose pods start in warm VMs (hypervisor.warm_vms = 1).
const warmHandler = "caisson-warm"

// warmBootedHandler is the handler whose pods start in warm VMs that boot (warm_vms = 1,
// no template).
const warmBootedHandler = "caisson-warm-booted"
