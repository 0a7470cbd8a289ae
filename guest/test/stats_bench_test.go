package test

import (
	"context"
	"flag"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	specs "github.com/opencontainers/runtime-spec/specs-go"
	"github.com/prometheus/procfs"
	"golang.org/x/sys/unix"

	agent "github.com/caisson-containers/caisson/api/agent/v1"
	"github.com/caisson-containers/caisson/shim/vmm"
)

var (
	statsCalls = flag.Int("guest.stats-calls", 60, "BenchmarkGuestStats: calls of each kind per guest, in 4 rounds")
	statsProbe = flag.String("guest.stats-probe", "", "BenchmarkGuestStats: a shell script run in the container before the rounds, its output logged (e.g. to time reads of the container's cgroup files)")
	// containerd's CRI collects every second (stats_collect_period); a guest that sleeps
	// longer between calls may pay more to wake than one called more often.
	statsPeriod = flag.Duration("guest.stats-period", time.Second, "BenchmarkGuestStats: the pause between two calls (an idle guest sleeps in between, as between containerd's collections)")
)

// BenchmarkGuestStats splits what containerd's stats collection costs an idle pod under
// TCG: one idle container, then Containers.Stats calls, Sandbox.Check calls (a call that
// does nothing in the guest: what the transport and the agent's wake-up cost alone) and
// no calls, each at the same pace, in alternating rounds. For each, per call, with the
// no-call rate subtracted:
//   - stats-qemu-ms, check-qemu-ms: QEMU's CPU time (utime+stime, all threads); -vcpu-ms
//     its vCPU thread's part; stats-check-ratio;
//   - stats-client-ms, check-client-ms: this process's CPU time (the host's side of the
//     transport and ttrpc, the code the shim runs);
//   - stats-agent-ms, stats-agent-slices (and check-): the agent's threads' run time and
//     how many times they ran (/proc/1/task/*/schedstat), stats-ctxt and stats-intr the
//     guest's context switches and interrupts (/proc/stat), read from a process of the
//     container before and after each round;
//   - idle-qemu-pct: QEMU's CPU with no calls, in % of a core;
//   - stats-µs, check-µs: a call's median wall time;
//   - exec-ms: the median wall time of those processes (create, start, wait and delete of
//     an exec with its stdout): the agent's exec latency.
//
// Per-interrupt deltas of the Stats rounds over the no-call ones are logged. At the
// defaults (60 calls of each kind, one a second) a guest takes about 4 minutes.
// Comparisons (-guest.compare-initramfs, -guest.compare-params; see BenchmarkGuestBoot)
// are measured in the same run, reported with their name as a prefix:
//
//	go test -tags seccomp ./guest/test -run '^$' -bench GuestStats -benchtime 1x \
//		-args -guest.compare-initramfs before=/tmp/before.cpio.lz4
func BenchmarkGuestStats(b *testing.B) {
	runs := []*variant{{name: ""}}
	runs = append(runs, parseVariants(b)...)
	disks := layerDisks(b)
	for range b.N {
		for _, v := range runs {
			r := measureStats(b, disks, v)
			r.report(b, v.name)
		}
	}
	b.ReportMetric(0, "ns/op")
}

// statsSample is what is counted at one moment: on the host and in the guest.
type statsSample struct {
	at           time.Time
	qemu, vcpu   time.Duration
	client       time.Duration
	agentRun     time.Duration
	agentSlices  int64
	ctxt, intr   int64
	interrupts   map[string]int64
	threads      map[string]int64 // the agent's threads' slices, by thread id
	guestCPUTick int64            // user+system+irq+softirq ticks of the guest's CPUs
}

// statsWindow is what one kind of round cost in all: the differences of samples.
type statsWindow struct {
	calls                   int
	wall                    time.Duration
	qemu, vcpu, client      time.Duration
	agentRun                time.Duration
	agentSlices, ctxt, intr int64
	threads                 map[string]int64
	guestCPUTick            int64
	interrupts              map[string]int64
	latencies               []time.Duration
}

func (w *statsWindow) add(a, z statsSample, calls int, lat []time.Duration) {
	w.calls += calls
	w.wall += z.at.Sub(a.at)
	w.qemu += z.qemu - a.qemu
	w.vcpu += z.vcpu - a.vcpu
	w.client += z.client - a.client
	w.agentRun += z.agentRun - a.agentRun
	w.agentSlices += z.agentSlices - a.agentSlices
	w.ctxt += z.ctxt - a.ctxt
	w.intr += z.intr - a.intr
	w.guestCPUTick += z.guestCPUTick - a.guestCPUTick
	if w.interrupts == nil {
		w.interrupts = map[string]int64{}
	}
	for k, v := range z.interrupts {
		w.interrupts[k] += v - a.interrupts[k]
	}
	if w.threads == nil {
		w.threads = map[string]int64{}
	}
	for k, v := range z.threads {
		w.threads[k] += v - a.threads[k]
	}
	w.latencies = append(w.latencies, lat...)
}

type statsResult struct {
	idle, check, stats statsWindow
	// execs are the wall times of the processes that read the guest's counters (create,
	// start, wait, delete over the transport): the agent's exec latency.
	execs []time.Duration
}

// perCall is a quantity of window w per call, less what the idle window had in the same
// time.
func perCall[T time.Duration | int64](w, idle *statsWindow, get func(*statsWindow) T) float64 {
	rate := float64(get(idle)) / idle.wall.Seconds()
	return (float64(get(w)) - rate*w.wall.Seconds()) / float64(w.calls)
}

func (r *statsResult) report(b *testing.B, prefix string) {
	if prefix != "" {
		prefix += "-"
	}
	for _, k := range []struct {
		name string
		w    *statsWindow
	}{{"stats", &r.stats}, {"check", &r.check}} {
		n := prefix + k.name
		b.ReportMetric(perCall(k.w, &r.idle, func(w *statsWindow) time.Duration { return w.qemu })/1e6, n+"-qemu-ms")
		b.ReportMetric(perCall(k.w, &r.idle, func(w *statsWindow) time.Duration { return w.vcpu })/1e6, n+"-vcpu-ms")
		b.ReportMetric(perCall(k.w, &r.idle, func(w *statsWindow) time.Duration { return w.client })/1e6, n+"-client-ms")
		b.ReportMetric(perCall(k.w, &r.idle, func(w *statsWindow) time.Duration { return w.agentRun })/1e6, n+"-agent-ms")
		b.ReportMetric(perCall(k.w, &r.idle, func(w *statsWindow) int64 { return w.agentSlices }), n+"-agent-slices")
		b.ReportMetric(perCall(k.w, &r.idle, func(w *statsWindow) int64 { return w.ctxt }), n+"-ctxt")
		b.ReportMetric(perCall(k.w, &r.idle, func(w *statsWindow) int64 { return w.intr }), n+"-intr")
		b.ReportMetric(float64(median(k.w.latencies).Microseconds()), n+"-µs")
	}
	stats := perCall(&r.stats, &r.idle, func(w *statsWindow) time.Duration { return w.qemu })
	check := perCall(&r.check, &r.idle, func(w *statsWindow) time.Duration { return w.qemu })
	b.ReportMetric(stats/check, prefix+"stats-check-ratio")
	b.ReportMetric(100*r.idle.qemu.Seconds()/r.idle.wall.Seconds(), prefix+"idle-qemu-pct")
	b.ReportMetric(float64(median(r.execs).Microseconds())/1e3, prefix+"exec-ms")

	// Which interrupts the calls raise in the guest, per call.
	var lines []string
	for name := range r.stats.interrupts {
		s := perCall(&r.stats, &r.idle, func(w *statsWindow) int64 { return w.interrupts[name] })
		c := perCall(&r.check, &r.idle, func(w *statsWindow) int64 { return w.interrupts[name] })
		if s > 0.05 || c > 0.05 {
			lines = append(lines, fmt.Sprintf("  %-40s stats %6.2f  check %6.2f", name, s, c))
		}
	}
	slices.Sort(lines)
	b.Logf("%sinterrupts per call (less the no-call rate):\n%s", prefix, strings.Join(lines, "\n"))
	lines = nil
	for tid := range r.stats.threads {
		s := perCall(&r.stats, &r.idle, func(w *statsWindow) int64 { return w.threads[tid] })
		c := perCall(&r.check, &r.idle, func(w *statsWindow) int64 { return w.threads[tid] })
		lines = append(lines, fmt.Sprintf("  agent thread %-6s stats %6.2f  check %6.2f", tid, s, c))
	}
	slices.Sort(lines)
	b.Logf("%sthe agent's threads' runs per call:\n%s", prefix, strings.Join(lines, "\n"))
}

// measureStats boots the guest of v and measures its rounds.
func measureStats(b *testing.B, disks []vmm.Disk, v *variant) statsResult {
	params := append(slices.Clip(benchKernelParams), v.params...)
	g := bootGuestWith(b, bootOptions{disks: disks, params: params, initramfs: v.initramfs})
	defer g.stop(b)
	g.mountLayers(b)
	// The container shares the agent's PID namespace, so that its processes can read the
	// agent's /proc/1.
	spec := testSpec("sleep", "1000000")
	var nss []specs.LinuxNamespace
	for _, ns := range spec.Linux.Namespaces {
		if ns.Type != specs.PIDNamespace {
			nss = append(nss, ns)
		}
	}
	spec.Linux.Namespaces = nss
	g.start(b, "idle", spec, &agent.Stdio{})
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Minute)
	defer cancel()
	// The first calls open the container's cgroup files and page the code in.
	for range 5 {
		if _, err := g.containers.Stats(ctx, &agent.StatsRequest{ContainerId: "idle"}); err != nil {
			b.Fatal(err)
		}
		if _, err := g.sandbox.Check(ctx, &agent.CheckRequest{}); err != nil {
			b.Fatal(err)
		}
	}
	if *statsProbe != "" {
		b.Logf("%s probe:\n%s", v.name, g.execOutput(b, "idle", "probe", "sh", "-c", *statsProbe))
	}
	time.Sleep(2 * time.Second)

	var r statsResult
	const rounds = 4
	n := max(*statsCalls/rounds, 1)
	calls := map[string]func() error{
		"idle":  nil,
		"check": func() error { _, err := g.sandbox.Check(ctx, &agent.CheckRequest{}); return err },
		"stats": func() error {
			_, err := g.containers.Stats(ctx, &agent.StatsRequest{ContainerId: "idle"})
			return err
		},
	}
	windows := map[string]*statsWindow{"idle": &r.idle, "check": &r.check, "stats": &r.stats}
	seq := 0
	for round := range rounds {
		kinds := []string{"idle", "check", "stats"}
		if round%2 == 1 {
			slices.Reverse(kinds)
		}
		for _, kind := range kinds {
			seq++
			start := time.Now()
			a := g.sampleGuest(b, seq)
			r.execs = append(r.execs, time.Since(start))
			a.sampleHost(b, g)
			var lat []time.Duration
			next := time.Now()
			for range n {
				next = next.Add(*statsPeriod)
				time.Sleep(time.Until(next))
				if f := calls[kind]; f != nil {
					start := time.Now()
					if err := f(); err != nil {
						b.Fatalf("%s: %v", kind, err)
					}
					lat = append(lat, time.Since(start))
				}
			}
			time.Sleep(time.Until(next.Add(*statsPeriod)))
			var z statsSample
			z.sampleHost(b, g)
			seq++
			start = time.Now()
			g.sampleGuestInto(b, seq, &z)
			r.execs = append(r.execs, time.Since(start))
			calls := n
			if kind == "idle" {
				calls = 0
			}
			windows[kind].add(a, z, calls, lat)
		}
	}
	return r
}

// sampleHost reads the host's counters. A window's are read right after the guest's at its
// start and right before them at its end, so that they hold the calls alone.
func (s *statsSample) sampleHost(b *testing.B, g *guestVM) {
	s.at = time.Now()
	var err error
	s.qemu, s.vcpu, err = qemuThreadsCPU(g.vm.Pid())
	must(b, err)
	var ru unix.Rusage
	must(b, unix.Getrusage(unix.RUSAGE_SELF, &ru))
	s.client = time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

func (g *guestVM) sampleGuest(b *testing.B, seq int) statsSample {
	var s statsSample
	g.sampleGuestInto(b, seq, &s)
	return s
}

// sampleGuestInto reads the guest's counters from a process of the container: what that
// costs the guest is in every window alike (once), and subtracted with the no-call rate.
func (g *guestVM) sampleGuestInto(b *testing.B, seq int, s *statsSample) {
	out := g.execOutput(b, "idle", "sample"+strconv.Itoa(seq), "sh", "-c",
		"cat /proc/stat /proc/interrupts; for t in /proc/1/task/*; do echo schedstat $(cat $t/schedstat) ${t##*/}; done")
	s.interrupts = map[string]int64{}
	s.threads = map[string]int64{}
	for _, line := range strings.Split(out, "\n") {
		f := strings.Fields(line)
		if len(f) < 2 {
			continue
		}
		num := func(i int) int64 {
			v, err := strconv.ParseInt(f[i], 10, 64)
			if err != nil {
				b.Fatalf("guest counters: %q: %v", line, err)
			}
			return v
		}
		switch {
		case f[0] == "cpu": // user nice system idle iowait irq softirq
			s.guestCPUTick = num(1) + num(2) + num(3) + num(6) + num(7)
		case f[0] == "ctxt":
			s.ctxt = num(1)
		case f[0] == "intr":
			s.intr = num(1)
		case f[0] == "schedstat" && len(f) == 5:
			s.agentRun += time.Duration(num(1))
			s.agentSlices += num(3)
			s.threads[f[4]] = num(3)
		case strings.HasSuffix(f[0], ":") && f[0] != "intr:":
			// /proc/interrupts: "NAME: count [more CPUs] description"
			v, err := strconv.ParseInt(f[1], 10, 64)
			if err != nil {
				continue
			}
			name := strings.TrimSuffix(f[0], ":")
			if len(f) > 2 {
				if _, err := strconv.Atoi(name); err == nil {
					name += " " + f[len(f)-1]
				}
			}
			s.interrupts[name] = v
		}
	}
}

// qemuThreadsCPU is the CPU time of QEMU's process pid, and of its vCPU threads.
func qemuThreadsCPU(pid int) (total, vcpu time.Duration, err error) {
	total, err = cpuTime(pid)
	if err != nil {
		return 0, 0, err
	}
	fs, err := procfs.NewDefaultFS()
	if err != nil {
		return 0, 0, err
	}
	threads, err := fs.AllThreads(pid)
	if err != nil {
		return 0, 0, err
	}
	for _, t := range threads {
		st, err := t.Stat()
		if err != nil || !strings.HasPrefix(st.Comm, "CPU ") {
			continue
		}
		vcpu += time.Duration(st.CPUTime() * float64(time.Second))
	}
	return total, vcpu, nil
}
