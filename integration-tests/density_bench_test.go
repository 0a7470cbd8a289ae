package integration

import (
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"text/tabwriter"
	"time"

	"github.com/prometheus/procfs"
	runtime "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/caisson-containers/caisson/guest/initramfs"
	"github.com/caisson-containers/caisson/integration-tests/harness"
	"github.com/caisson-containers/caisson/internal/testutil"
	"github.com/caisson-containers/caisson/shim/config"
	"github.com/caisson-containers/caisson/shim/pod"
	"github.com/caisson-containers/caisson/shim/template"
	"github.com/caisson-containers/caisson/shim/vmm"
	"github.com/caisson-containers/caisson/shim/vmm/qemu"
)

// Parameters of BenchmarkCRIDensity.
const (
	// densityPodsEnv sets how many pods each runtime configuration starts (default 100).
	densityPodsEnv     = "DENSITY_PODS"
	densityDefaultPods = 100
	// densityConfigsEnv picks the runtime configurations, comma-separated, in order, of
	// densityConfigs: "booted" and "template" (the default, both), and either with
	// "-askguest" (stats reuse off). 100 booted pods need more memory than some machines
	// have; the template run alone still answers for 100 pods.
	densityConfigsEnv = "DENSITY_CONFIGS"
	// densityStatsPeriodEnv, if set, is the test containerd's stats_collect_period (the
	// CRI runtime plugin's; containerd 2.4 polls every container's CPU every 1 s by
	// default, most of an idle pod's CPU under TCG), e.g. "10s": what a node that polls
	// less often pays for its idle pods.
	densityStatsPeriodEnv = "DENSITY_STATS_PERIOD"
	// densityTCGCacheEnv, if set, is the runtime configuration's
	// hypervisor.tcg_translation_cache_mib (default 128) for every configuration: a
	// booted pod's boot and first container translate about 84 MiB of code, which
	// stays resident in its QEMU while the pod idles.
	densityTCGCacheEnv = "DENSITY_TCG_CACHE_MIB"
	// densitySettle is how long the pods (and the bare guest) idle after the last start
	// before their memory is read and their CPU counted: long enough for the guest's
	// boot-time work (deferred initcalls, the agent's first timers) to be over.
	densitySettle = 10 * time.Second
	// densityWindow is the span over which idle CPU is counted. /proc counts CPU time in
	// 10 ms ticks: over 30 s, a resolution of 0.03 % of a core.
	densityWindow = 30 * time.Second
	// densityExecs execs run in random pods while all run; each must finish within
	// densityExecLimit (issue 15: every pod stays responsive).
	densityExecs     = 10
	densityExecLimit = 2 * time.Second
	// densityReserve is the host memory the benchmark never starts a pod into: below
	// it plus twice the last pod's cost, it stops starting pods (the machine is shared
	// and has no swap).
	densityReserve = 3 << 30
)

// densityPodCount is DENSITY_PODS, or the default.
func densityPodCount(b *testing.B) int {
	s := os.Getenv(densityPodsEnv)
	if s == "" {
		return densityDefaultPods
	}
	n, err := strconv.Atoi(s)
	if err != nil || n < 1 {
		b.Fatalf("%s=%q: want a number of pods, at least 1", densityPodsEnv, s)
	}
	return n
}

// densityConfig is one runtime configuration the benchmark measures.
type densityConfig struct {
	name, handler string
	template      bool
}

// densityConfigs are the configurations DENSITY_CONFIGS names, in its order: booted
// and template pods, and each with guest.stats_reuse_vcpu_time = 0 ("-askguest"), the
// baseline of the stats reuse (every stats call asks the guest).
var densityConfigs = []densityConfig{
	{name: "booted", handler: harness.Handler},
	{name: "template", handler: templateHandler, template: true},
	{name: "booted-askguest", handler: askGuestHandler},
	{name: "template-askguest", handler: templateAskGuestHandler, template: true},
}

// templateAskGuestHandler runs template pods with the stats reuse off (askGuestHandler
// the booted ones).
const templateAskGuestHandler = "caisson-template-askguest"

// densityConfigsOf are the configurations of DENSITY_CONFIGS (default booted,template).
func densityConfigsOf(b *testing.B) []densityConfig {
	s := os.Getenv(densityConfigsEnv)
	if s == "" {
		s = "booted,template"
	}
	var out []densityConfig
	for _, name := range strings.Split(s, ",") {
		name = strings.TrimSpace(name)
		i := slices.IndexFunc(densityConfigs, func(c densityConfig) bool { return c.name == name })
		if i < 0 || slices.ContainsFunc(out, func(c densityConfig) bool { return c.name == name }) {
			var known []string
			for _, c := range densityConfigs {
				known = append(known, c.name)
			}
			b.Fatalf("%s=%q: want some of %s, comma-separated, each once", densityConfigsEnv, s, strings.Join(known, ", "))
		}
		out = append(out, densityConfigs[i])
	}
	return out
}

// densityPod is one idle pod: a sandbox and one sleeping container, and its host
// processes.
type densityPod struct {
	id, ctr string
	// start is RunPodSandbox → the app container Running; began, sandboxDone and ended
	// are when RunPodSandbox was called and returned and when the container ran (for the
	// start's phases, see shimPhases).
	start                     time.Duration
	began, sandboxDone, ended time.Time
	shim, qemu                int
	virtiofsd                 []int
}

// podMemory is one pod's PSS, split by what holds it.
type podMemory struct {
	// tcg is QEMU's TCG translation cache (see qemuMemory), ram the guest's RAM as
	// QEMU maps it, qemu the rest of QEMU (its heap, libraries, device state).
	tcg, ram, qemu  int64
	shim, virtiofsd int64
}

func (m podMemory) total() int64 { return m.tcg + m.ram + m.qemu + m.shim + m.virtiofsd }

// withoutTCG is what the pod would hold under KVM, which has no translation cache: the
// figure that compares across accelerators.
func (m podMemory) withoutTCG() int64 { return m.total() - m.tcg }

// podCPU is one pod's CPU use over the idle window, in % of one core, by process.
type podCPU struct{ qemu, shim, virtiofsd float64 }

func (c podCPU) total() float64 { return c.qemu + c.shim + c.virtiofsd }

// densityResult is what one runtime configuration's run measured.
type densityResult struct {
	name     string
	template bool // pods from a VM template
	// wanted pods, and those started before the memory guard stopped (stopped says why).
	wanted  int
	pods    []densityPod
	stopped string
	// unresponsive names an exec over densityExecLimit.
	unresponsive string
	// load is the host's 1-minute load average at the end of the idle window: the
	// machine is shared, and its other work slows starts and execs.
	load float64
	// hostPerPod is how much lower MemAvailable is once the pods settled than before
	// the first pod and after the last one's removal (their mean), over the pods.
	hostPerPod float64
	mem        []podMemory
	cpu        []podCPU
	node       nodeCPU // the whole machine over the idle window
	execMax    time.Duration
	removeAll  time.Duration
	// templateMade is the start of the pod that made the template, templateFile what the
	// template's memory file holds (once per node and VM shape); template runs only.
	templateMade time.Duration
	templateFile int64
	// firstPhases and lastPhases are the start phases (phaseNames) of the first and the
	// last growthSample pods, one list per phase: which part of a start grows as the
	// pods add up.
	firstPhases, lastPhases [][]time.Duration
}

// growthSample is how many of the first and of the last pods the start's growth is
// measured over (medians): the ratio, the last pod over the first, rests on two
// starts, each moved by whatever else the machine did at that moment.
const growthSample = 10

// sampleSize is how many of n pods are the first and the last growthSample: as many,
// or half of n if fewer, at least one.
func sampleSize(n int) int { return max(1, min(growthSample, n/2)) }

// bareResult is the baseline guest: the pod VM's kernel, CPUs, memory and accelerator
// with a trivial init instead of the agent.
type bareResult struct {
	boot time.Duration // QEMU start → the init powered the VM off, median of 3
	cpu  float64       // % of one core while idle, over densityWindow
	mem  podMemory     // QEMU's only
}

// BenchmarkCRIDensity (make bench-density) starts DENSITY_PODS idle pods (default 100)
// one after another through the CRI of the harness's containerd, each a pause sandbox and
// one `sleep` container of the test busybox image, first booted and then from a VM
// template (hypervisor.template), removing all between (DENSITY_CONFIGS picks one or
// both; DENSITY_STATS_PERIOD sets containerd's CRI stats_collect_period). While they all
// run it reports, for each configuration:
//   - host memory per pod: MemAvailable's drop over the number of pods, once they settled,
//     from the mean of its readings before the first pod and after the last removal;
//   - PSS per pod (median), split: TCG's translation cache, the guest's RAM, the rest of
//     QEMU, the shim, virtiofsd (if any); and without the translation cache, which KVM
//     does not have;
//   - idle CPU per pod over 30 s, as % of one core (median and max, and the median of each
//     process kind);
//   - the first and the last pod's start (RunPodSandbox → container Running), their ratio,
//     and the same for the medians of the first and the last ten, with the phases of
//     those starts (phaseNames): which part of a start grows as the pods add up;
//   - the slowest of 10 execs (ExecSync `true`) in random pods: over 2 s fails the
//     benchmark (once the figures are reported), since every pod must stay responsive;
//   - the time to stop and remove them all; then nothing of them may be left.
//
// Against baselines measured in the same run (the machine is shared, so only same-run
// ratios mean much): a bare guest of the same kernel and VM shape whose init does nothing
// (the pods' start, idle CPU and PSS are reported over its boot, idle CPU and PSS); and,
// for the start's growth, the same number of pods run by containerd's runc on the same
// containerd, CNI and image, one after another, then removed (runc-*): what of the
// growth is the node's (containerd, CNI, the host's own work) rather than Caisson's.
//
// Before each pod it checks the host's MemAvailable: under 3 GiB plus twice the last
// pod's cost, it starts no more pods, measures those that run, and fails.
func BenchmarkCRIDensity(b *testing.B) {
	n := densityPodCount(b)
	configs := densityConfigsOf(b)
	noReuse := func(c *config.Config) { c.Guest.StatsReuseVCPUTime = 0 }
	o := harness.Options{Handlers: map[string]func(*config.Config){
		templateHandler:         func(c *config.Config) { c.Hypervisor.Template = true },
		askGuestHandler:         noReuse,
		templateAskGuestHandler: func(c *config.Config) { c.Hypervisor.Template = true; noReuse(c) },
	}}
	statsPeriod := os.Getenv(densityStatsPeriodEnv)
	if statsPeriod != "" {
		if d, err := time.ParseDuration(statsPeriod); err != nil || d <= 0 {
			b.Fatalf("%s=%q: want a duration such as 10s", densityStatsPeriodEnv, statsPeriod)
		}
		o.ContainerdConfig = func(cfg map[string]any) {
			plugins := cfg["plugins"].(map[string]any)
			plugins["io.containerd.cri.v1.runtime"].(map[string]any)["stats_collect_period"] = statsPeriod
		}
	}
	if s := os.Getenv(densityTCGCacheEnv); s != "" {
		mib, err := strconv.Atoi(s)
		if err != nil || mib < 1 {
			b.Fatalf("%s=%q: want a size in MiB, at least 1", densityTCGCacheEnv, s)
		}
		o.Runtime = func(c *config.Config) { c.Hypervisor.TCGTranslationCacheMiB = mib }
	}
	c := harness.StartCRI(b, o)
	image := c.Pull(b, c.BusyboxRef, harness.Handler)
	// The sandbox image too: the first RunPodSandbox would pull it, and the first pod's
	// start would count the pull.
	c.Pull(b, c.PauseRef, harness.Handler)
	runcImage := c.Pull(b, c.BusyboxRef, harness.RuncHandler)
	c.Pull(b, c.PauseRef, harness.RuncHandler)

	bare := measureBare(b, c)
	runc := measureRunc(b, c, runcImage, n)
	var results []densityResult
	for _, cfg := range configs {
		results = append(results, runDensity(b, c, cfg, image, n))
	}

	b.ReportMetric(0, "ns/op")
	b.ReportMetric(bare.boot.Seconds(), "bare-boot-s")
	b.ReportMetric(bare.cpu, "bare-idle-cpu-%")
	b.ReportMetric(mib(bare.mem.total()), "bare-PSS-MiB")
	rg := growthOf(runc)
	b.ReportMetric(runc[0].Seconds(), "runc-first-start-s")
	b.ReportMetric(rg.lastRatio, "runc-last/first-start")
	b.ReportMetric(rg.lastKRatio, "runc-last-ten/first-ten-start")
	for _, r := range results {
		reportDensity(b, r, bare)
	}
	fmt.Print(densityTable(c, n, statsPeriod, bare, runc, results))
	for _, r := range results {
		for _, failure := range []string{r.stopped, r.unresponsive} {
			if failure != "" {
				b.Errorf("%s: %s", r.name, failure)
			}
		}
	}
}

// runDensity starts n pods of the configuration, measures them, removes them and checks
// that nothing of them is left.
func runDensity(b *testing.B, c *harness.CRI, cfg densityConfig, image string, n int) densityResult {
	b.Helper()
	handler := cfg.handler
	r := densityResult{name: cfg.name, template: cfg.template, wanted: n}
	if cfg.template {
		// The first pod of a VM shape on the node makes its template, once: a pod
		// before the measured ones makes it, and its memory file is node overhead.
		p := startDensityPod(b, c, handler, image, "density-template-maker")
		r.templateMade = p.start
		c.RemovePod(b, p.id)
		// Its VM must be gone before the host's memory is read.
		if left := densityLeftovers(c, []densityPod{p}); len(left) > 0 {
			b.Fatalf("after removing the pod that made the template, left behind:\n  %s", strings.Join(left, "\n  "))
		}
		infos, err := template.List(pod.TemplatesRoot(c.Config))
		if err != nil || len(infos) != 1 {
			b.Fatalf("templates after the first template pod: %v %v", infos, err)
		}
		r.templateFile = infos[0].Resident
	}

	before := memAvailable(b)
	// The first pod's cost is not known yet: assume the most its QEMU could touch, the
	// VM's memory and TCG's translation cache.
	last := int64(c.Config.Hypervisor.MemoryMiB+c.Config.Hypervisor.TCGTranslationCacheMiB) << 20
	for i := range n {
		avail := memAvailable(b)
		if avail < densityReserve+2*last {
			r.stopped = fmt.Sprintf("stopped after %d of %d pods: MemAvailable %.0f MiB is under 3 GiB + 2 × the last pod's %.0f MiB",
				i, n, mib(avail), mib(last))
			break
		}
		p := startDensityPod(b, c, handler, image, fmt.Sprintf("density-%s-%03d", r.name, i))
		findPodProcesses(b, c, &p)
		r.pods = append(r.pods, p)
		// Other work on the machine moves MemAvailable both ways: the pod's own PSS is
		// the floor of what it cost.
		last = max(avail-memAvailable(b), podMemoryOf(b, c, p).total())
	}
	if len(r.pods) == 0 {
		b.Fatalf("%s: no pod started: %s", r.name, r.stopped)
	}
	time.Sleep(densitySettle)
	running := memAvailable(b)
	for _, p := range r.pods {
		r.mem = append(r.mem, podMemoryOf(b, c, p))
	}
	r.cpu, r.node = idleCPU(b, r.pods)
	r.load = loadAverage(b)
	r.execMax, r.unresponsive = execRandom(b, c, r.pods)
	k := sampleSize(len(r.pods))
	r.firstPhases, r.lastPhases = startPhases(b, c, r.pods[:k]), startPhases(b, c, r.pods[len(r.pods)-k:])

	start := time.Now()
	for _, p := range r.pods {
		c.RemovePod(b, p.id)
	}
	r.removeAll = time.Since(start)
	if left := densityLeftovers(c, r.pods); len(left) > 0 {
		b.Fatalf("%s: after removing %d pods, left behind:\n  %s", r.name, len(r.pods), strings.Join(left, "\n  "))
	}
	// The machine is shared: other work moves MemAvailable while the pods run. Against
	// the mean of the readings before the first pod and after the last one's removal,
	// drift that is steady over the run cancels.
	after := memAvailable(b)
	r.hostPerPod = (float64(before+after)/2 - float64(running)) / float64(len(r.pods))
	return r
}

// startDensityPod runs a pod with one sleeping container and waits for it to run.
func startDensityPod(b *testing.B, c *harness.CRI, handler, image, name string) densityPod {
	b.Helper()
	ctx := c.Ctx(b)
	cfg := c.PodConfig(name, nil)
	if err := os.MkdirAll(cfg.LogDirectory, 0o755); err != nil {
		b.Fatal(err)
	}
	start := time.Now()
	resp, err := c.Runtime.RunPodSandbox(ctx, &runtime.RunPodSandboxRequest{Config: cfg, RuntimeHandler: handler})
	if err != nil {
		b.Fatalf("RunPodSandbox %s (%s): %v", name, handler, err)
	}
	sandboxDone := time.Now()
	ctr, err := c.CreateContainer(ctx, resp.PodSandboxId, cfg, harness.ContainerConfig("app", image, "sleep", "100000"))
	if err != nil {
		b.Fatalf("CreateContainer in %s (%s): %v", name, handler, err)
	}
	if _, err := c.Runtime.StartContainer(ctx, &runtime.StartContainerRequest{ContainerId: ctr}); err != nil {
		b.Fatalf("StartContainer in %s (%s): %v", name, handler, err)
	}
	st, err := c.Runtime.ContainerStatus(ctx, &runtime.ContainerStatusRequest{ContainerId: ctr})
	end := time.Now()
	if err != nil || st.Status.State != runtime.ContainerState_CONTAINER_RUNNING {
		b.Fatalf("app container of %s (%s) after StartContainer: %v %v", name, handler, st.GetStatus(), err)
	}
	return densityPod{id: resp.PodSandboxId, ctr: ctr, start: end.Sub(start), began: start, sandboxDone: sandboxDone, ended: end}
}

// startPhases are the start phases of pods, one list per phase name, from one read of
// containerd's log.
func startPhases(b *testing.B, c *harness.CRI, pods []densityPod) [][]time.Duration {
	b.Helper()
	ids := make([]string, len(pods))
	for i, p := range pods {
		ids[i] = p.id
	}
	marks := shimMarks(b, c, ids...)
	phases := make([][]time.Duration, len(phaseNames))
	for _, p := range pods {
		addPhases(phases, phasesOf(b, p.id, marks[p.id], p.began, p.sandboxDone, p.ended))
	}
	return phases
}

// measureRunc starts n pods of image with containerd's runc, one after another as the
// Caisson pods start, removes them, and returns their starts: the control of the
// start's growth, the same number of pods of the same image on the same containerd and
// CNI.
func measureRunc(b *testing.B, c *harness.CRI, image string, n int) []time.Duration {
	b.Helper()
	var starts []time.Duration
	var pods []densityPod
	for i := range n {
		p := startDensityPod(b, c, harness.RuncHandler, image, fmt.Sprintf("density-runc-%03d", i))
		pods = append(pods, p)
		starts = append(starts, p.start)
	}
	for _, p := range pods {
		c.RemovePod(b, p.id)
	}
	return starts
}

// startGrowth is how a run's starts grew: the median start of the first and of the last
// sampleSize pods, and the last pod's over the first's and the median of the last ones
// over that of the first ones.
type startGrowth struct {
	firstK, lastK         time.Duration
	lastRatio, lastKRatio float64
}

func growthOf(starts []time.Duration) startGrowth {
	k := sampleSize(len(starts))
	g := startGrowth{firstK: median(starts[:k]), lastK: median(starts[len(starts)-k:])}
	g.lastRatio = float64(starts[len(starts)-1]) / float64(starts[0])
	g.lastKRatio = float64(g.lastK) / float64(g.firstK)
	return g
}

func (r densityResult) starts() []time.Duration {
	s := make([]time.Duration, len(r.pods))
	for i, p := range r.pods {
		s[i] = p.start
	}
	return s
}

// findPodProcesses finds the pod's shim (started with the sandbox's id, unless p.shim
// is set: the warm shim that took the pod) and, below it, its QEMU and virtiofsd.
func findPodProcesses(b *testing.B, c *harness.CRI, p *densityPod) {
	b.Helper()
	if p.shim == 0 {
		p.shim = shimPid(b, p.id)
	}
	for _, s := range c.QEMUs() {
		if pid, _ := strconv.Atoi(s); harness.DescendsFrom(pid, p.shim) {
			p.qemu = pid
		}
	}
	if p.qemu == 0 {
		b.Fatalf("pod %s: no QEMU below its shim %d", p.id, p.shim)
	}
	for _, s := range c.Virtiofsds() {
		if pid, _ := strconv.Atoi(s); harness.DescendsFrom(pid, p.shim) {
			p.virtiofsd = append(p.virtiofsd, pid)
		}
	}
}

// qemuMemory splits a QEMU's PSS into TCG's translation cache, the guest's RAM and
// the rest, from /proc/PID/smaps.
//
// TCG's translation cache: QEMU 7.2 (tcg/region.c, alloc_code_gen_buffer_anon) maps its
// code buffer as one anonymous PROT_READ|WRITE|EXEC private mapping of tb-size (the
// shim's tcg_translation_cache_mib), then makes the last page of each of its regions a
// guard page (PROT_NONE), which splits it into "rwxp" mappings each followed by a 4 KiB
// "---p" one. In a pod's QEMU here (QEMU 7.2, x86_64 host, Debian 12, 1 vCPU: one region)
// /proc/PID/smaps shows exactly one anonymous executable mapping, rwxp of tb-size less
// 4 KiB, then its guard page; QEMU's own code is file-backed (r-xp). That is how it was
// identified, and the benchmark fails unless the rwxp mappings and their guard pages
// span exactly tb-size, so a QEMU that maps its cache another way (split-wx, a memfd)
// is noticed rather than misreported. Under KVM there is no such mapping.
//
// The guest's RAM is the mapping of exactly the VM's memory size: anonymous (booted
// with guest.shared_fs = copy), a shared memfd (virtio-fs, the default) or a private
// mapping of the template's memory file.
func qemuMemory(b *testing.B, pid int, memoryMiB, tbSizeMiB int) (tcg, ram, rest int64) {
	b.Helper()
	maps, err := harness.Smaps(pid)
	if err != nil {
		b.Fatal(err)
	}
	var tcgSpan uint64
	for i, m := range maps {
		switch {
		case m.Perms == "rwxp" && m.Path == "":
			tcg += m.PSS
			tcgSpan += m.Size
			// The guard page after a region.
			if i+1 < len(maps) && maps[i+1].Perms == "---p" && maps[i+1].Path == "" && maps[i+1].Size == 4096 {
				tcgSpan += 4096
			}
		case m.Size == uint64(memoryMiB)<<20 && ram == 0:
			ram = m.PSS
		default:
			rest += m.PSS
		}
	}
	if tbSizeMiB > 0 && tcgSpan != uint64(tbSizeMiB)<<20 {
		b.Fatalf("QEMU %d: its rwx anonymous mappings span %d bytes, not tb-size (%d MiB): TCG's translation cache is not where this benchmark looks for it", pid, tcgSpan, tbSizeMiB)
	}
	return tcg, ram, rest
}

func podMemoryOf(b *testing.B, c *harness.CRI, p densityPod) podMemory {
	b.Helper()
	var m podMemory
	h := c.Config.Hypervisor
	m.tcg, m.ram, m.qemu = qemuMemory(b, p.qemu, h.MemoryMiB, h.TCGTranslationCacheMiB)
	m.shim = pss(b, p.shim)
	for _, v := range p.virtiofsd {
		m.virtiofsd += pss(b, v)
	}
	return m
}

// idleCPU counts the CPU time each pod's processes use over densityWindow (a pod
// without a shim, as the bare guest, counts QEMU's only), and the whole machine's over
// the same window: both from the same two readings of /proc.
func idleCPU(b *testing.B, pods []densityPod) ([]podCPU, nodeCPU) {
	b.Helper()
	start := time.Now()
	m0 := machineCPU(b)
	time.Sleep(densityWindow)
	m1 := machineCPU(b)
	window := time.Since(start).Seconds()
	pct := func(d float64) float64 { return 100 * d / window }
	used := func(pid int) float64 {
		p0, ok0 := m0.procs[pid]
		p1, ok1 := m1.procs[pid]
		if !ok0 || !ok1 {
			b.Fatalf("CPU time of %d: it did not run through the idle window", pid)
		}
		return pct(p1.Seconds - p0.Seconds)
	}
	cpu := make([]podCPU, len(pods))
	for i, p := range pods {
		cpu[i].qemu = used(p.qemu)
		if p.shim != 0 {
			cpu[i].shim = used(p.shim)
		}
		for _, v := range p.virtiofsd {
			cpu[i].virtiofsd += used(v)
		}
	}
	return cpu, nodeCPUOf(cpu, m0, m1, pct)
}

// nodeCPU is the whole machine's CPU over the idle window, in % of one core, split by
// who used it: what a pod started then would compete with. On a machine of few cores
// the later pods' starts slow with all of it, not only with the pods' own.
type nodeCPU struct {
	busy       float64 // all of it (/proc/stat)
	pods       float64 // the pods' processes (podCPU)
	containerd float64 // containerd and the snapshotter
	kernel     float64 // kernel threads
	// topKernel is the busiest kernel thread, and topKernelCPU its share.
	topKernel    string
	topKernelCPU float64
}

// rest is what processes outside the pods, containerd and the kernel's threads used,
// and processes that ended within the window.
func (n nodeCPU) rest() float64 { return n.busy - n.pods - n.containerd - n.kernel }

// machineReading is harness.MachineCPU's answer.
type machineReading struct {
	busy  float64
	procs map[int]harness.ProcessCPU
}

func machineCPU(b *testing.B) machineReading {
	b.Helper()
	busy, procs, err := harness.MachineCPU()
	if err != nil {
		b.Fatalf("the machine's CPU time: %v", err)
	}
	return machineReading{busy: busy, procs: procs}
}

// containerdComms are the command names (15 characters at most) of the test containerd
// and its snapshotter plugin.
var containerdComms = []string{"containerd", "caisson-snapsho"}

func nodeCPUOf(cpu []podCPU, m0, m1 machineReading, pct func(float64) float64) nodeCPU {
	n := nodeCPU{busy: pct(m1.busy - m0.busy)}
	for _, c := range cpu {
		n.pods += c.total()
	}
	// The pods' own processes (QEMU, the shim, virtiofsd) are neither kernel threads nor
	// containerd's: they fall in no class below.
	kernel := map[string]float64{}
	for pid, p1 := range m1.procs {
		p0, ok := m0.procs[pid]
		if !ok || p0.Comm != p1.Comm {
			continue // it began within the window, or its pid is another command's: in the rest
		}
		d := pct(p1.Seconds - p0.Seconds)
		switch {
		case p1.Kernel:
			n.kernel += d
			kernel[p1.Comm] += d
		case slices.Contains(containerdComms, p1.Comm):
			n.containerd += d
		}
	}
	for name, d := range kernel {
		if d > n.topKernelCPU {
			n.topKernel, n.topKernelCPU = name, d
		}
	}
	return n
}

func memAvailable(b *testing.B) int64 {
	b.Helper()
	m, err := harness.MemAvailable()
	if err != nil {
		b.Fatal(err)
	}
	return m
}

// execRandom runs `true` in the containers of random pods while all run, and returns
// the slowest and, if one took over densityExecLimit, a failure naming it: the caller
// fails the benchmark with it once the figures are reported.
func execRandom(b *testing.B, c *harness.CRI, pods []densityPod) (slowest time.Duration, failure string) {
	b.Helper()
	ctx := c.Ctx(b)
	for range densityExecs {
		p := pods[rand.IntN(len(pods))]
		start := time.Now()
		resp, err := c.Runtime.ExecSync(ctx, &runtime.ExecSyncRequest{ContainerId: p.ctr, Cmd: []string{"true"}, Timeout: 60})
		took := time.Since(start)
		if err != nil || resp.ExitCode != 0 {
			b.Fatalf("ExecSync true in pod %s: %v (exit %d, %s)", p.id, err, resp.GetExitCode(), resp.GetStderr())
		}
		if took > densityExecLimit && failure == "" {
			failure = fmt.Sprintf("ExecSync true in pod %s took %v with %d pods running: over %v, the pod is not responsive", p.id, took, len(pods), densityExecLimit)
		}
		slowest = max(slowest, took)
	}
	return slowest, failure
}

// densityLeftovers is what the removed pods left: the harness's leftover checks (QEMU,
// mounts, loop devices, pod state, network namespaces, veths), and their shims and
// virtiofsd, each with harness.LeftoverGrace to finish stopping.
func densityLeftovers(c *harness.CRI, pods []densityPod) []string {
	left := c.Leftovers()
	deadline := time.Now().Add(harness.LeftoverGrace)
	for {
		var procs []string
		for _, p := range pods {
			for _, s := range shimPids(p.id) {
				procs = append(procs, "shim "+s+" of pod "+p.id)
			}
		}
		for _, v := range c.Virtiofsds() {
			procs = append(procs, "virtiofsd "+v)
		}
		if len(procs) == 0 || time.Now().After(deadline) {
			return append(left, procs...)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// measureBare boots the baseline guest: three boots to power-off for its boot time, then
// one that stays idle, for its CPU over densityWindow and its PSS.
func measureBare(b *testing.B, c *harness.CRI) bareResult {
	b.Helper()
	var r bareResult
	off := bareInitramfs(b, "/bin/busybox poweroff -f")
	var boots []time.Duration
	for range 3 {
		boots = append(boots, bareBoot(b, c, off))
	}
	r.boot = median(boots)

	// The idle guest says it is up on its console, then sleeps.
	const ready = "caisson-bare-guest-idle"
	idle := bareInitramfs(b, "/bin/busybox mount -t devtmpfs dev /dev\n"+
		"echo "+ready+" >/dev/ttyS0\n"+
		"exec /bin/busybox sleep 2147483647")
	console := filepath.Join(b.TempDir(), "console.log")
	vm := newBareVM(b, c, idle, console)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	if err := vm.Start(ctx); err != nil {
		b.Fatal(err)
	}
	defer vm.Stop(context.Background())
	for {
		if out, _ := os.ReadFile(console); strings.Contains(string(out), ready) {
			break
		}
		select {
		case <-vm.Done():
			out, _ := os.ReadFile(console)
			b.Fatalf("the idle bare guest ended: %v\n%s", vm.Wait(), out)
		case <-ctx.Done():
			b.Fatal("the idle bare guest did not come up within 2 minutes")
		case <-time.After(50 * time.Millisecond):
		}
	}
	time.Sleep(densitySettle)
	h := c.Config.Hypervisor
	r.mem.tcg, r.mem.ram, r.mem.qemu = qemuMemory(b, vm.Pid(), h.MemoryMiB, h.TCGTranslationCacheMiB)
	cpu, _ := idleCPU(b, []densityPod{{qemu: vm.Pid()}})
	r.cpu = cpu[0].qemu
	return r
}

func loadAverage(b *testing.B) float64 {
	b.Helper()
	fs, err := procfs.NewDefaultFS()
	if err != nil {
		b.Fatal(err)
	}
	l, err := fs.LoadAvg()
	if err != nil {
		b.Fatal(err)
	}
	return l.Load1
}

func mib(n int64) float64 { return float64(n) / (1 << 20) }

// medianBy is the median of f over xs.
func medianBy[T any](xs []T, f func(T) float64) float64 {
	v := make([]float64, len(xs))
	for i, x := range xs {
		v[i] = f(x)
	}
	return median(v)
}

func reportDensity(b *testing.B, r densityResult, bare bareResult) {
	m := func(name string, v float64) { b.ReportMetric(v, r.name+"-"+name) }
	m("pods", float64(len(r.pods)))
	m("host-MiB/pod", r.hostPerPod/(1<<20))
	m("PSS-MiB/pod", medianBy(r.mem, func(p podMemory) float64 { return mib(p.total()) }))
	m("PSS-without-tcg-MiB/pod", medianBy(r.mem, func(p podMemory) float64 { return mib(p.withoutTCG()) }))
	m("tcg-PSS-MiB/pod", medianBy(r.mem, func(p podMemory) float64 { return mib(p.tcg) }))
	m("guest-RAM-PSS-MiB/pod", medianBy(r.mem, func(p podMemory) float64 { return mib(p.ram) }))
	m("qemu-other-PSS-MiB/pod", medianBy(r.mem, func(p podMemory) float64 { return mib(p.qemu) }))
	m("shim-PSS-MiB/pod", medianBy(r.mem, func(p podMemory) float64 { return mib(p.shim) }))
	m("virtiofsd-PSS-MiB/pod", medianBy(r.mem, func(p podMemory) float64 { return mib(p.virtiofsd) }))
	m("idle-cpu-%/pod", medianBy(r.cpu, podCPU.total))
	m("idle-cpu-max-%", slices.Max(cpuTotals(r.cpu)))
	m("qemu-cpu-%/pod", medianBy(r.cpu, func(c podCPU) float64 { return c.qemu }))
	m("shim-cpu-%/pod", medianBy(r.cpu, func(c podCPU) float64 { return c.shim }))
	m("virtiofsd-cpu-%/pod", medianBy(r.cpu, func(c podCPU) float64 { return c.virtiofsd }))
	m("node-idle-cpu-%", r.node.busy)
	m("node-idle-cpu-pods-%", r.node.pods)
	m("node-idle-cpu-containerd-%", r.node.containerd)
	m("node-idle-cpu-kernel-%", r.node.kernel)
	m("node-idle-cpu-rest-%", r.node.rest())
	first, last := r.pods[0].start, r.pods[len(r.pods)-1].start
	g := growthOf(r.starts())
	m("first-start-s", first.Seconds())
	m("last-start-s", last.Seconds())
	m("last/first-start", g.lastRatio)
	m("first-ten-start-s", g.firstK.Seconds())
	m("last-ten-start-s", g.lastK.Seconds())
	m("last-ten/first-ten-start", g.lastKRatio)
	for j, name := range phaseNames {
		m("first-ten-"+name+"-s", median(r.firstPhases[j]).Seconds())
		m("last-ten-"+name+"-s", median(r.lastPhases[j]).Seconds())
	}
	m("exec-max-s", r.execMax.Seconds())
	m("remove-all-s", r.removeAll.Seconds())
	m("start-vs-bare-boot", float64(first)/float64(bare.boot))
	if bare.cpu > 0 {
		m("idle-cpu-vs-bare", medianBy(r.cpu, podCPU.total)/bare.cpu)
	}
	m("PSS-vs-bare", medianBy(r.mem, func(p podMemory) float64 { return float64(p.total()) })/float64(bare.mem.total()))
	m("host-mem-vs-bare-PSS", r.hostPerPod/float64(bare.mem.total()))
	if r.template {
		m("made-template-start-s", r.templateMade.Seconds())
		m("template-file-MiB", mib(r.templateFile))
	}
}

func cpuTotals(cpu []podCPU) []float64 {
	v := make([]float64, len(cpu))
	for i, c := range cpu {
		v[i] = c.total()
	}
	return v
}

// densityTable is the readable report: one column per configuration, the bare guest's
// baseline beside.
func densityTable(c *harness.CRI, n int, statsPeriod string, bare bareResult, runc []time.Duration, rs []densityResult) string {
	var sb strings.Builder
	h := c.Config.Hypervisor
	if statsPeriod == "" {
		statsPeriod = "containerd's default"
	}
	fmt.Fprintf(&sb, "\ndensity: %d idle pods wanted per configuration (%s), one sleeping busybox container each; VM %d vCPU, %d MiB, accelerator %s, TCG cache bound %d MiB; CRI stats_collect_period %s; medians over the pods unless said\n",
		n, densityPodsEnv, h.VCPUs, h.MemoryMiB, h.Accelerator, h.TCGTranslationCacheMiB, statsPeriod)
	w := tabwriter.NewWriter(&sb, 0, 0, 2, ' ', tabwriter.AlignRight)
	row := func(label string, f func(r densityResult) string, baseline string) {
		fmt.Fprintf(w, "%s\t", label)
		for _, r := range rs {
			fmt.Fprintf(w, "%s\t", f(r))
		}
		fmt.Fprintf(w, "%s\t\n", baseline)
	}
	med := func(f func(podMemory) int64) func(densityResult) string {
		return func(r densityResult) string {
			return fmt.Sprintf("%.1f", medianBy(r.mem, func(p podMemory) float64 { return mib(f(p)) }))
		}
	}
	cpu := func(f func(podCPU) float64) func(densityResult) string {
		return func(r densityResult) string { return fmt.Sprintf("%.2f", medianBy(r.cpu, f)) }
	}
	header := func(r densityResult) string { return r.name }
	row("", header, "bare guest")
	row("pods running", func(r densityResult) string { return strconv.Itoa(len(r.pods)) }, "1")
	row("host memory per pod, MiB (MemAvailable drop / pods)", func(r densityResult) string { return fmt.Sprintf("%.1f", r.hostPerPod/(1<<20)) }, "")
	row("PSS per pod, MiB", med(podMemory.total), fmt.Sprintf("%.1f", mib(bare.mem.total())))
	row("  QEMU: TCG translation cache", med(func(p podMemory) int64 { return p.tcg }), fmt.Sprintf("%.1f", mib(bare.mem.tcg)))
	row("  QEMU: guest RAM", med(func(p podMemory) int64 { return p.ram }), fmt.Sprintf("%.1f", mib(bare.mem.ram)))
	row("  QEMU: the rest", med(func(p podMemory) int64 { return p.qemu }), fmt.Sprintf("%.1f", mib(bare.mem.qemu)))
	row("  shim", med(func(p podMemory) int64 { return p.shim }), "")
	row("  virtiofsd", med(func(p podMemory) int64 { return p.virtiofsd }), "")
	row("PSS per pod without the TCG cache (as under KVM), MiB", med(podMemory.withoutTCG), fmt.Sprintf("%.1f", mib(bare.mem.withoutTCG())))
	row("pod PSS / bare guest PSS", func(r densityResult) string {
		return fmt.Sprintf("%.2f", medianBy(r.mem, func(p podMemory) float64 { return float64(p.total()) })/float64(bare.mem.total()))
	}, "")
	row("idle CPU per pod over 30 s, % of a core", cpu(podCPU.total), fmt.Sprintf("%.2f", bare.cpu))
	row("  max over the pods", func(r densityResult) string { return fmt.Sprintf("%.2f", slices.Max(cpuTotals(r.cpu))) }, "")
	row("  QEMU", cpu(func(c podCPU) float64 { return c.qemu }), "")
	row("  shim", cpu(func(c podCPU) float64 { return c.shim }), "")
	row("  virtiofsd", cpu(func(c podCPU) float64 { return c.virtiofsd }), "")
	row("the machine's CPU over the idle window, % of a core", func(r densityResult) string { return fmt.Sprintf("%.1f", r.node.busy) }, "")
	row("  all the pods", func(r densityResult) string { return fmt.Sprintf("%.1f", r.node.pods) }, "")
	row("  containerd and the snapshotter", func(r densityResult) string { return fmt.Sprintf("%.1f", r.node.containerd) }, "")
	row("  kernel threads (the busiest)", func(r densityResult) string {
		return fmt.Sprintf("%.1f (%s %.1f)", r.node.kernel, r.node.topKernel, r.node.topKernelCPU)
	}, "")
	row("  the rest (other processes, ended ones)", func(r densityResult) string { return fmt.Sprintf("%.1f", r.node.rest()) }, "")
	row("pod idle CPU / bare guest's", func(r densityResult) string {
		if bare.cpu == 0 {
			return "bare used none"
		}
		return fmt.Sprintf("%.1f", medianBy(r.cpu, podCPU.total)/bare.cpu)
	}, "")
	row("first pod start, s (bare: boot)", func(r densityResult) string { return fmt.Sprintf("%.2f", r.pods[0].start.Seconds()) }, fmt.Sprintf("%.2f", bare.boot.Seconds()))
	row("last pod start, s", func(r densityResult) string { return fmt.Sprintf("%.2f", r.pods[len(r.pods)-1].start.Seconds()) }, "")
	row("last / first", func(r densityResult) string {
		return fmt.Sprintf("%.2f", growthOf(r.starts()).lastRatio)
	}, "")
	row("first pod start / bare boot", func(r densityResult) string { return fmt.Sprintf("%.2f", float64(r.pods[0].start)/float64(bare.boot)) }, "")
	row(fmt.Sprintf("first %d pods' start, median, s", sampleSize(n)), func(r densityResult) string { return fmt.Sprintf("%.2f", growthOf(r.starts()).firstK.Seconds()) }, "")
	row(fmt.Sprintf("last %d pods' start, median, s", sampleSize(n)), func(r densityResult) string { return fmt.Sprintf("%.2f", growthOf(r.starts()).lastK.Seconds()) }, "")
	row("  last ones / first ones", func(r densityResult) string { return fmt.Sprintf("%.2f", growthOf(r.starts()).lastKRatio) }, "")
	for j, name := range phaseNames {
		row("  "+name+", first → last ones, s", func(r densityResult) string {
			return fmt.Sprintf("%.2f → %.2f", median(r.firstPhases[j]).Seconds(), median(r.lastPhases[j]).Seconds())
		}, "")
	}
	row("slowest of 10 execs, s (limit 2)", func(r densityResult) string { return fmt.Sprintf("%.2f", r.execMax.Seconds()) }, "")
	row("host load average (1 min) after the idle window", func(r densityResult) string { return fmt.Sprintf("%.1f", r.load) }, "")
	row("remove all pods, s", func(r densityResult) string { return fmt.Sprintf("%.1f", r.removeAll.Seconds()) }, "")
	row("the template's start and memory file", func(r densityResult) string {
		if !r.template {
			return "-"
		}
		return fmt.Sprintf("%.2f s, %.0f MiB", r.templateMade.Seconds(), mib(r.templateFile))
	}, "")
	w.Flush()
	rg := growthOf(runc)
	fmt.Fprintf(&sb, "control: %d pods of the same image with containerd's runc, on this containerd and CNI, one after another: first %.2f s, last %.2f s (%.2f×); the first %d's median %.2f s, the last %d's %.2f s (%.2f×)\n",
		len(runc), runc[0].Seconds(), runc[len(runc)-1].Seconds(), rg.lastRatio,
		sampleSize(len(runc)), rg.firstK.Seconds(), sampleSize(len(runc)), rg.lastK.Seconds(), rg.lastKRatio)
	for _, r := range rs {
		var starts []string
		for _, p := range r.pods {
			starts = append(starts, fmt.Sprintf("%.1f", p.start.Seconds()))
		}
		fmt.Fprintf(&sb, "%s pods' start, s, in order: %s\n", r.name, strings.Join(starts, " "))
	}
	for _, r := range rs {
		for _, failure := range []string{r.stopped, r.unresponsive} {
			if failure != "" {
				fmt.Fprintf(&sb, "%s: %s\n", r.name, failure)
			}
		}
	}
	return sb.String()
}

// bareInitramfs is a busybox initramfs whose /init runs script.
func bareInitramfs(b *testing.B, script string) string {
	b.Helper()
	a := initramfs.NewArchive()
	if err := a.CopyFile("bin/busybox", 0o755, testutil.RequireBinary(b, "busybox")); err != nil {
		b.Fatal(err)
	}
	if err := a.Dir("dev", 0o755); err != nil {
		b.Fatal(err)
	}
	if err := a.File("init", 0o755, []byte("#!/bin/busybox sh\n"+script+"\n")); err != nil {
		b.Fatal(err)
	}
	p := filepath.Join(b.TempDir(), "bare.cpio.gz")
	f, err := os.Create(p)
	if err != nil {
		b.Fatal(err)
	}
	defer f.Close()
	if _, err := a.WriteTo(f); err != nil {
		b.Fatal(err)
	}
	return p
}

// newBareVM is a VM of the pod VM's kernel, CPUs, memory and accelerator booting initrd
// (see bareInitramfs) instead of the agent's, its console into console ("" for the
// default, in its state directory).
func newBareVM(b *testing.B, c *harness.CRI, initrd, console string) *qemu.VM {
	b.Helper()
	h := c.Config.Hypervisor
	vm, err := qemu.New(vmm.Config{Kernel: c.Config.Guest.Kernel, Initramfs: initrd, Accelerator: h.Accelerator,
		VCPUs: h.VCPUs, MemoryMiB: h.MemoryMiB, StateDir: testutil.ShortTempDir(b), KernelParams: []string{"quiet"}, ConsoleLog: console},
		// The shim's accelerator probe cache: the probe is not part of a boot.
		qemu.Config{Path: h.Path, TCGTranslationCacheMiB: h.TCGTranslationCacheMiB, AccelCacheDir: filepath.Join(c.Config.StateDir, "probes")})
	if err != nil {
		b.Fatal(err)
	}
	return vm
}
