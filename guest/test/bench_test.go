package test

import (
	"context"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	specs "github.com/opencontainers/runtime-spec/specs-go"

	"github.com/caisson-containers/caisson/guest/initramfs"
	"github.com/caisson-containers/caisson/internal/testutil"
	"github.com/caisson-containers/caisson/shim/vmm"
	"github.com/caisson-containers/caisson/shim/vmm/qemu"
)

// baselineInitramfs is the trivial guest the agent's boot is measured against: the same
// kernel, and an /init that powers the VM off at once.
func baselineInitramfs(b *testing.B) string {
	b.Helper()
	bb := testutil.RequireBinary(b, "busybox")
	a := initramfs.NewArchive()
	must(b, a.CopyFile("bin/busybox", 0o755, bb))
	must(b, a.File("init", 0o755, []byte("#!/bin/busybox sh\n/bin/busybox poweroff -f\n")))
	p := filepath.Join(b.TempDir(), "baseline.cpio.gz")
	f, err := os.Create(p)
	must(b, err)
	defer f.Close()
	_, err = a.WriteTo(f)
	must(b, err)
	return p
}

// bootBaseline boots the trivial guest and returns the time from starting QEMU until the
// guest powered off, and the CPU time QEMU used until then.
func bootBaseline(b *testing.B, kernel, initrd string, params []string) (wall, cpu time.Duration) {
	b.Helper()
	vm, err := qemu.New(vmm.Config{Kernel: kernel, Initramfs: initrd, Accelerator: "tcg", StateDir: testutil.ShortTempDir(b), MemoryMiB: 512,
		KernelParams: params}, qemu.Config{})
	must(b, err)
	ctx, cancel := context.WithTimeout(context.Background(), bootTimeout)
	defer cancel()
	start := time.Now()
	must(b, vm.Start(ctx))
	defer vm.Stop(context.Background())
	// QEMU's CPU time is read until it exits: the last reading misses at most a tick.
	tick := time.NewTicker(2 * time.Millisecond)
	defer tick.Stop()
	for {
		select {
		case <-vm.Done():
			return time.Since(start), cpu
		case <-ctx.Done():
			b.Fatal("baseline guest did not power off")
		case <-tick.C:
			if c, err := cpuTime(vm.Pid()); err == nil {
				cpu = c
			}
		}
	}
}

// cpuTime is the CPU time (user and system, all threads) process pid has used so far.
// Under TCG it is the guest's work, whatever else the machine runs at the same time;
// the wall times are not.
func cpuTime(pid int) (time.Duration, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, err
	}
	// Fields after the command (in parentheses, which may hold spaces): state is
	// field 3, utime and stime fields 14 and 15, in clock ticks (USER_HZ, 100).
	_, rest, ok := strings.Cut(string(b), ") ")
	f := strings.Fields(rest)
	if !ok || len(f) < 13 {
		return 0, fmt.Errorf("/proc/%d/stat: %q", pid, b)
	}
	var ticks int64
	for _, s := range f[11:13] {
		n, err := strconv.ParseInt(s, 10, 64)
		if err != nil {
			return 0, err
		}
		ticks += n
	}
	return time.Duration(ticks) * (time.Second / 100), nil
}

// benchKernelParams are the same for both guests: a quiet console, as in production.
var benchKernelParams = []string{"quiet"}

func median(ds []time.Duration) time.Duration {
	s := append([]time.Duration(nil), ds...)
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	return s[len(s)/2]
}

// Comparisons the benchmark can make in the same run, each booted in turn with the built
// image in every iteration (the machine's load then weighs on all alike):
//
//	go test ./guest/test -run '^$' -bench GuestBoot -args \
//		-guest.compare-initramfs old=/path/to/old.cpio.gz \
//		-guest.compare-params 'notests=cryptomgr.notests;tsc=tsc=reliable no_timer_check'
var (
	compareInitramfs = flag.String("guest.compare-initramfs", "", "comma-separated NAME=PATH: other initramfs images, reported as NAME-ready-s and NAME-ready-ratio")
	compareParams    = flag.String("guest.compare-params", "", "semicolon-separated NAME=PARAMS: extra kernel parameters for both guests, reported as NAME-baseline-s and NAME-ready-s")
)

// variant is one comparison: an initramfs instead of the built one, or kernel parameters
// added to both guests.
type variant struct {
	name      string
	initramfs string
	params    []string
	// measured per iteration: wall and CPU times
	base, ours       []time.Duration
	baseCPU, oursCPU []time.Duration
}

func parseVariants(b *testing.B) []*variant {
	var vs []*variant
	for _, f := range strings.Split(*compareInitramfs, ",") {
		if f == "" {
			continue
		}
		name, path, ok := strings.Cut(f, "=")
		if !ok {
			b.Fatalf("-guest.compare-initramfs %q: want NAME=PATH", f)
		}
		vs = append(vs, &variant{name: name, initramfs: path})
	}
	for _, f := range strings.Split(*compareParams, ";") {
		if f == "" {
			continue
		}
		name, params, ok := strings.Cut(f, "=")
		if !ok {
			b.Fatalf("-guest.compare-params %q: want NAME=PARAMS", f)
		}
		vs = append(vs, &variant{name: name, params: strings.Fields(params)})
	}
	return vs
}

// BenchmarkGuestBoot reports, per iteration a boot of each guest in turn:
//   - ready-ratio: QEMU start → agent answering Sandbox.Check, over QEMU start → the
//     trivial init's power-off (same kernel, same accelerator, same run; medians);
//   - ready-cpu-ratio: the same for QEMU's CPU time, which other work on the machine
//     hardly changes (under TCG the guest's work is QEMU's; an idle guest costs none);
//   - agent-rss-MiB: the agent's resident memory once it serves and has run a container;
//   - initramfs-MiB: the size of the production initramfs;
//   - for each comparison (flags above), the same times with its image or parameters.
func BenchmarkGuestBoot(b *testing.B) {
	testutil.RequireRoot(b)
	testutil.RequireBinary(b, "qemu-system-x86_64")
	g := testutil.RequireGuest(b)
	baseline := baselineInitramfs(b)
	disks := layerDisks(b)
	variants := parseVariants(b)
	var rss float64
	// bootAgent boots the agent's guest until it answers, and returns the wall time and
	// QEMU's CPU time until then.
	bootAgent := func(initrd string, params []string, measureRSS bool) (wall, cpu time.Duration) {
		start := time.Now()
		gv := bootGuestWith(b, bootOptions{disks: disks, params: params, initramfs: initrd})
		wall = time.Since(start)
		cpu, err := cpuTime(gv.vm.Pid())
		must(b, err)
		if measureRSS {
			rss = agentRSS(b, gv)
		}
		gv.stop(b)
		return wall, cpu
	}
	var ours, base, oursCPU, baseCPU []time.Duration
	for i := 0; i < b.N; i++ {
		w, c := bootBaseline(b, g.Kernel, baseline, benchKernelParams)
		base, baseCPU = append(base, w), append(baseCPU, c)
		w, c = bootAgent("", benchKernelParams, i == 0)
		ours, oursCPU = append(ours, w), append(oursCPU, c)
		for _, v := range variants {
			params := append(slices.Clip(benchKernelParams), v.params...)
			if len(v.params) > 0 {
				w, c := bootBaseline(b, g.Kernel, baseline, params)
				v.base, v.baseCPU = append(v.base, w), append(v.baseCPU, c)
			}
			w, c := bootAgent(v.initramfs, params, false)
			v.ours, v.oursCPU = append(v.ours, w), append(v.oursCPU, c)
		}
	}
	st, err := os.Stat(g.Initramfs)
	must(b, err)
	ratio := func(a, b []time.Duration) float64 { return float64(median(a)) / float64(median(b)) }
	b.ReportMetric(ratio(ours, base), "ready-ratio")
	b.ReportMetric(median(ours).Seconds(), "agent-ready-s")
	b.ReportMetric(median(base).Seconds(), "baseline-s")
	b.ReportMetric(ratio(oursCPU, baseCPU), "ready-cpu-ratio")
	b.ReportMetric(median(oursCPU).Seconds(), "agent-ready-cpu-s")
	b.ReportMetric(median(baseCPU).Seconds(), "baseline-cpu-s")
	b.ReportMetric(rss, "agent-rss-MiB")
	b.ReportMetric(float64(st.Size())/(1<<20), "initramfs-MiB")
	for _, v := range variants {
		b.ReportMetric(median(v.ours).Seconds(), v.name+"-ready-s")
		b.ReportMetric(median(v.oursCPU).Seconds(), v.name+"-ready-cpu-s")
		if v.base != nil {
			b.ReportMetric(median(v.base).Seconds(), v.name+"-baseline-s")
			b.ReportMetric(median(v.baseCPU).Seconds(), v.name+"-baseline-cpu-s")
			b.ReportMetric(ratio(v.ours, v.base), v.name+"-ready-ratio")
		} else {
			b.ReportMetric(ratio(v.ours, base), v.name+"-ready-ratio")
			b.ReportMetric(ratio(v.oursCPU, baseCPU), v.name+"-ready-cpu-ratio")
		}
	}
	b.ReportMetric(0, "ns/op")
}

// agentRSS reads the agent's VmRSS from a container that shares the guest's PID namespace.
func agentRSS(b *testing.B, g *guestVM) float64 {
	g.mountLayers(b)
	spec := testSpec("grep", "VmRSS", "/proc/1/status")
	var nss []specs.LinuxNamespace
	for _, ns := range spec.Linux.Namespaces {
		if ns.Type != specs.PIDNamespace {
			nss = append(nss, ns)
		}
	}
	spec.Linux.Namespaces = nss
	r := g.run(b, "rss", spec)
	f := strings.Fields(r.stdout) // VmRSS: N kB
	if len(f) != 3 {
		b.Fatalf("VmRSS line %q", r.stdout)
	}
	kb, err := strconv.Atoi(f[1])
	must(b, err)
	return float64(kb) / 1024
}
