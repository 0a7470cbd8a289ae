package test

import (
	"context"
	"crypto/rand"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"os"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	specs "github.com/opencontainers/runtime-spec/specs-go"
	"github.com/prometheus/procfs"
	"golang.org/x/sys/unix"

	agent "github.com/caisson-containers/caisson/api/agent/v1"
	"github.com/caisson-containers/caisson/internal/tcgprof"
	"github.com/caisson-containers/caisson/shim/vmm"
)

// containerSteps are the calls BenchmarkContainerStart times, in order, in a freshly
// booted guest: the pod, its pause container (the guest's first container) and an app
// container (its second), each created then started, and an exec in the app container
// (created, started, waited for and deleted; the median of -guest.start-execs). Before
// the app container, its writable disk is hot-plugged and mounted (app-disk), as the shim
// does for a pod's every container after the pause.
var containerSteps = []string{"sandbox", "pause-create", "pause-start", "app-disk", "app-create", "app-start", "exec"}

// startHotplugSlots are the guest's hot-plug slots in BenchmarkContainerStart: the
// shim's default, so the VM has the bridge a pod's VM has.
const startHotplugSlots = 16

// agentSplitLines are the agent's debug lines (caisson.debug) whose durations split a
// container's create in the guest, with the name each duration is reported under.
var agentSplitLines = []struct{ msg, field, name string }{
	{"rootfs assembled", "took", "rootfs"},
	{"container init process waits for start", "libcontainer_create", "lc-create"},
	{"container init process waits for start", "init_process", "init"},
	{"container created", "took", "total"},
}

var (
	logConsole  = flag.Bool("guest.log-console", false, "BenchmarkContainerStart: log each guest's console (with caisson.debug, the agent's and libcontainer's debug lines)")
	startParams = flag.String("guest.start-params", "", "BenchmarkContainerStart: kernel parameters added to every guest's, the comparisons' too (e.g. caisson.debug)")
	startExecs  = flag.Int("guest.start-execs", 5, "BenchmarkContainerStart: execs per guest; the exec step is their median")
	startInsns  = flag.Bool("guest.start-insns", false, "BenchmarkContainerStart: count the guest's instructions per step with the tcgprof plugin (STEP-insns, STEP-kernel-insns; with -v the functions that executed most, named with -guest.agent-symbols): the guest runs slower under the plugin")
	startWarmUp = flag.Bool("guest.start-warm-up", false, "BenchmarkContainerStart: the agent's warm-up first (Check with devices_ready, as before a VM template is saved: a throwaway container, the pod's namespaces prepared); the sandbox step is then a template pod's, the containers' are warmer than a template pod's (TCG's translations are not saved)")
)

// BenchmarkContainerStart splits what a container's create and start cost a booted
// guest under TCG, for the first container after boot (a pod's pause container) and a
// second one, as the shim asks for them. Per step (containerSteps), medians over the
// iterations, each a fresh boot:
//   - STEP-cpu-ms: QEMU's CPU time (the run time of all its threads, in ns from
//     /proc/PID/task/*/schedstat): the guest's work, whatever else the machine runs;
//   - STEP-ms: the call's wall time;
//   - boot-ms, boot-cpu-ms: the same from QEMU's start to the agent's first answer (what
//     a change to the agent's start costs);
//   - with caisson.debug on the guest's command line (-guest.start-params caisson.debug,
//     or a comparison -guest.compare-params 'debug=caisson.debug'), the agent's own
//     split of each create, read from its console: pause-rootfs-ms, pause-lc-create-ms,
//     pause-init-ms, pause-total-ms and the app's (wall times in the guest; the debug
//     console's output costs the guest too, about 0.2 s of CPU per create).
//
// Comparisons (-guest.compare-initramfs, -guest.compare-params; see BenchmarkGuestBoot)
// are booted in turn in every iteration and reported with their name as a prefix:
//
//	go test -tags seccomp ./guest/test -run '^$' -bench ContainerStart -benchtime 10x -v \
//		-args -guest.compare-initramfs before=/tmp/before/_output/guest/initramfs.cpio.lz4
//
// (-v logs each step's CPU samples.)
func BenchmarkContainerStart(b *testing.B) {
	runs := append([]*variant{{name: ""}}, parseVariants(b)...)
	disks := layerDisks(b)
	samples := make([]map[string][]time.Duration, len(runs))
	for i := range samples {
		samples[i] = map[string][]time.Duration{}
	}
	for range b.N {
		for i, v := range runs {
			for k, d := range measureContainerStart(b, disks, v) {
				samples[i][k] = append(samples[i][k], d)
			}
		}
	}
	for i, v := range runs {
		prefix := v.name
		if prefix != "" {
			prefix += "-"
		}
		keys := make([]string, 0, len(samples[i]))
		for k := range samples[i] {
			keys = append(keys, k)
		}
		slices.Sort(keys)
		for _, k := range keys {
			if strings.HasSuffix(k, "-insns") {
				b.ReportMetric(float64(median(samples[i][k])), prefix+k)
				continue
			}
			b.ReportMetric(float64(median(samples[i][k]).Microseconds())/1e3, prefix+k+"-ms")
			if strings.HasSuffix(k, "-cpu") {
				b.Logf("%s%s (ms): %v", prefix, k, msList(samples[i][k]))
			}
		}
	}
	b.ReportMetric(0, "ns/op")
}

// measureContainerStart boots the guest of v and times its steps: for each, the QEMU CPU
// time (KEY-cpu) and the wall time (KEY), and the agent's split when it logs debug lines.
func measureContainerStart(b *testing.B, disks []vmm.Disk, v *variant) map[string]time.Duration {
	params := append(slices.Clip(benchKernelParams), v.params...)
	params = append(params, strings.Fields(*startParams)...)
	var counter *insnCounter
	var plugins []string
	if *startInsns {
		counter = newInsnCounter(b, buildTCGProf(b))
		plugins = counter.plugins
	}
	appRW := emptyExt4(b, b.TempDir())
	start := time.Now()
	g := bootGuestWith(b, bootOptions{disks: disks, hotplug: startHotplugSlots, params: params, initramfs: v.initramfs, tcgPlugins: plugins})
	defer g.stop(b)
	out := map[string]time.Duration{"boot": time.Since(start)}
	cpu, err := runTime(g.vm.Pid())
	must(b, err)
	out["boot-cpu"] = cpu
	var booted tcgprof.Counts
	if counter != nil {
		// Everything since QEMU started: the firmware (unnamed), the kernel, the agent.
		booted = counter.dump()
		all, kernel := booted.Totals()
		out["boot-insns"], out["boot-kernel-insns"] = time.Duration(all), time.Duration(kernel)
	}
	g.mountLayers(b)
	var kallsyms, user *tcgprof.Symbols
	if counter != nil {
		kallsyms, user = g.kallsyms(b), agentSymbols(b)
		if testing.Verbose() {
			b.Logf("%s boot, instructions by function:\n%s", v.name, topFunctions(booted, kallsyms, user, 1))
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	if *startWarmUp {
		_, err := g.sandbox.Check(ctx, &agent.CheckRequest{DevicesReady: true})
		must(b, err)
	}
	// The boot's background work (modules, cgroup controllers) is over before the first
	// step: the storages were mounted, and the guest is left alone a moment.
	time.Sleep(time.Second)

	podSpec := func(args ...string) []byte {
		s := testSpec(args...)
		s.Hostname = "pod"
		for i := range s.Linux.Namespaces {
			if s.Linux.Namespaces[i].Type == specs.NetworkNamespace {
				s.Linux.Namespaces[i].Path = "/var/run/netns/cni-bench"
			}
		}
		return specJSON(b, s)
	}
	proc, err := json.Marshal(&specs.Process{Args: []string{"true"}, Cwd: "/", Env: []string{"PATH=/bin"}})
	must(b, err)
	createContainer := func(id string, rootfs *agent.Rootfs) func() error {
		return func() error {
			_, err := g.containers.Create(ctx, &agent.CreateContainerRequest{ContainerId: id, Spec: podSpec("sleep", "1000000"),
				Rootfs: rootfs, Stdio: &agent.Stdio{}})
			return err
		}
	}
	appRootfs := rootfsFor("app")
	appRootfs.Upper.StorageId, appRootfs.Work.StorageId = "app-rw", "app-rw"
	startContainer := func(id string) func() error {
		return func() error {
			_, err := g.containers.Start(ctx, &agent.StartContainerRequest{ContainerId: id})
			return err
		}
	}
	calls := map[string]func() error{
		"sandbox": func() error {
			// As the shim does: the host's randomness seeds the guest's (a booted guest's
			// kernel has had none of its own until then).
			seed := make([]byte, 64)
			if _, err := rand.Read(seed); err != nil {
				return err
			}
			_, err := g.sandbox.Create(ctx, &agent.CreateSandboxRequest{SandboxId: "pod", Hostname: "pod", Entropy: seed})
			return err
		},
		"pause-create": createContainer("pause", rootfsFor("pause")),
		"pause-start":  startContainer("pause"),
		"app-disk": func() error {
			addr, err := g.vm.AttachDisk(ctx, vmm.Disk{ID: "app-rw", Path: appRW, Kind: vmm.Block})
			if err != nil {
				return err
			}
			_, err = g.storage.Mount(ctx, &agent.MountStorageRequest{StorageId: "app-rw", Fstype: "ext4",
				Device: &agent.Device{Kind: agent.DeviceKind_DEVICE_KIND_BLOCK, PciPath: string(addr.PCIPath)}})
			return err
		},
		"app-create": createContainer("app", appRootfs),
		"app-start":  startContainer("app"),
		"exec": func() error {
			if _, err := g.exec.Create(ctx, &agent.CreateExecRequest{ContainerId: "app", ExecId: "true", Process: proc, Stdio: &agent.Stdio{}}); err != nil {
				return err
			}
			if _, err := g.exec.Start(ctx, &agent.StartExecRequest{ContainerId: "app", ExecId: "true"}); err != nil {
				return err
			}
			w, err := g.containers.Wait(ctx, &agent.WaitRequest{ContainerId: "app", ExecId: "true"})
			if err == nil && w.Exit.ExitStatus != 0 {
				err = fmt.Errorf("exit status %d", w.Exit.ExitStatus)
			}
			if err != nil {
				return err
			}
			_, err = g.exec.Delete(ctx, &agent.DeleteExecRequest{ContainerId: "app", ExecId: "true"})
			return err
		},
	}
	for _, step := range containerSteps {
		n := 1
		if step == "exec" {
			n = max(*startExecs, 1)
		}
		var before tcgprof.Counts
		if counter != nil {
			before = counter.dump()
		}
		var walls, cpus []time.Duration
		for range n {
			cpu0, err := runTime(g.vm.Pid())
			must(b, err)
			start = time.Now()
			if err := calls[step](); err != nil {
				b.Fatalf("%s %s: %v", v.name, step, err)
			}
			walls = append(walls, time.Since(start))
			cpu1, err := runTime(g.vm.Pid())
			must(b, err)
			cpus = append(cpus, cpu1-cpu0)
		}
		out[step], out[step+"-cpu"] = median(walls), median(cpus)
		if counter != nil {
			// Counts, not durations: reported as they are (-insns).
			d := counter.dump().Since(before)
			all, kernel := d.Totals()
			out[step+"-insns"] = time.Duration(all / uint64(n))
			out[step+"-kernel-insns"] = time.Duration(kernel / uint64(n))
			if testing.Verbose() {
				b.Logf("%s %s, instructions (per call), by function:\n%s", v.name, step, topFunctions(d, kallsyms, user, float64(n)))
			}
		}
	}
	console, err := os.ReadFile(g.console)
	must(b, err)
	if *logConsole {
		b.Logf("%s console:\n%s", v.name, console)
	}
	for k, d := range agentSplit(string(console)) {
		out[k] = d
	}
	return out
}

// runTime is the time QEMU's process pid has run on a CPU, all threads, in nanoseconds
// (/proc/PID/task/*/schedstat; /proc/PID/stat's utime and stime count 10 ms ticks, too
// coarse for one call).
func runTime(pid int) (time.Duration, error) {
	fs, err := procfs.NewDefaultFS()
	if err != nil {
		return 0, err
	}
	threads, err := fs.AllThreads(pid)
	if err != nil || len(threads) == 0 {
		return 0, fmt.Errorf("threads of process %d: %v", pid, err)
	}
	var sum time.Duration
	for _, t := range threads {
		st, err := t.Schedstat()
		if errors.Is(err, os.ErrNotExist) || errors.Is(err, unix.ESRCH) {
			continue // a thread that ended
		}
		if err != nil {
			return 0, fmt.Errorf("thread %d of process %d: %w", t.PID, pid, err)
		}
		sum += time.Duration(st.RunningNanoseconds)
	}
	return sum, nil
}

var logField = regexp.MustCompile(`(\w+)=("(?:[^"\\]|\\.)*"|\S+)`)

// agentSplit reads the agent's debug lines of the pause and app containers' creates from
// the console: ID-NAME for each of agentSplitLines.
func agentSplit(console string) map[string]time.Duration {
	out := map[string]time.Duration{}
	for _, line := range strings.Split(console, "\n") {
		fields := map[string]string{}
		for _, m := range logField.FindAllStringSubmatch(line, -1) {
			fields[m[1]] = strings.Trim(m[2], `"`)
		}
		id := fields["id"]
		if id != "pause" && id != "app" {
			continue
		}
		for _, s := range agentSplitLines {
			if fields["msg"] != s.msg {
				continue
			}
			if d, err := time.ParseDuration(fields[s.field]); err == nil {
				out[id+"-"+s.name] = d
			}
		}
	}
	return out
}

// msList is ds in milliseconds, sorted, for the log.
func msList(ds []time.Duration) []int64 {
	var out []int64
	for _, d := range ds {
		out = append(out, d.Milliseconds())
	}
	slices.Sort(out)
	return out
}
