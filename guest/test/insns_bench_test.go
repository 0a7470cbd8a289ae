package test

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	agent "github.com/caisson-containers/caisson/api/agent/v1"
	"github.com/caisson-containers/caisson/internal/tcgprof"
	"github.com/caisson-containers/caisson/internal/testutil"
	"github.com/caisson-containers/caisson/shim/vmm"
)

var (
	insnCalls   = flag.Int("guest.insn-calls", 10, "BenchmarkGuestCallInstructions: calls of each kind per round (two rounds), one every -guest.stats-period")
	insnSymbols = flag.String("guest.agent-symbols", "", "BenchmarkGuestCallInstructions: the agent built without -s -w (same text as the image's), to name its functions in -v's lists")
	insnTop     = flag.Int("guest.insn-top", 25, "BenchmarkGuestCallInstructions: functions listed per kind of call with -v")
)

// BenchmarkGuestCallInstructions counts the guest instructions QEMU executes for one
// Containers.Stats call (containerd's stats collection, once a second per container)
// and one Sandbox.Check (a call that does nothing: the channel and the agent's
// wake-up), less what the idle guest executes in the same time, with the tcgprof plugin
// (hack/tcgprof/plugin, built here with gcc) counting every translated block's runs.
// Under TCG the guest's instructions are its cost to the host, and unlike CPU times
// their count hardly moves with the machine's load, so two images compare in one run or
// across runs. Reported per call: stats-insns, stats-kernel-insns, stats-user-insns and
// the same for check; stats-vs-check, the one over the other; idle-insns-per-s
// (make bench-guest-calls). With -v, the functions that executed the most
// in each kind of window (the guest's kallsyms; the agent's with -guest.agent-symbols):
//
//	go test -tags seccomp ./guest/test -run '^$' -bench CallInstructions -benchtime 1x -v \
//		-args -guest.agent-symbols /tmp/caisson-agent.debug
//
// Comparisons (-guest.compare-initramfs, -guest.compare-params) are measured in the same
// run, reported with their name as a prefix.
func BenchmarkGuestCallInstructions(b *testing.B) {
	plugin := buildTCGProf(b)
	user := agentSymbols(b)
	runs := append([]*variant{{name: ""}}, parseVariants(b)...)
	disks := layerDisks(b)
	for range b.N {
		for _, v := range runs {
			measureInstructions(b, disks, v, plugin, user)
		}
	}
	b.ReportMetric(0, "ns/op")
}

func measureInstructions(b *testing.B, disks []vmm.Disk, v *variant, plugin string, user *tcgprof.Symbols) {
	counter := newInsnCounter(b, plugin)
	params := append(slices.Clip(benchKernelParams), v.params...)
	g := bootGuestWith(b, bootOptions{disks: disks, params: params, initramfs: v.initramfs, tcgPlugins: counter.plugins})
	defer g.stop(b)
	g.mountLayers(b)
	kallsyms := g.kallsyms(b)

	g.start(b, "idle", testSpec("sleep", "1000000"), &agent.Stdio{})
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Minute)
	defer cancel()
	calls := map[string]func() error{
		"idle":  func() error { return nil },
		"check": func() error { _, err := g.sandbox.Check(ctx, &agent.CheckRequest{}); return err },
		"stats": func() error {
			_, err := g.containers.Stats(ctx, &agent.StatsRequest{ContainerId: "idle"})
			return err
		},
	}
	// The first calls open the container's cgroup files and translate the code.
	for range 5 {
		for _, k := range []string{"stats", "check"} {
			if err := calls[k](); err != nil {
				b.Fatal(err)
			}
		}
	}
	time.Sleep(2 * time.Second)

	windows := map[string]tcgprof.Counts{}
	for round := range 2 {
		kinds := []string{"idle", "check", "stats"}
		if round == 1 {
			slices.Reverse(kinds)
		}
		for _, kind := range kinds {
			a := counter.dump()
			next := time.Now()
			for range *insnCalls {
				next = next.Add(*statsPeriod)
				time.Sleep(time.Until(next))
				if err := calls[kind](); err != nil {
					b.Fatalf("%s: %v", kind, err)
				}
			}
			time.Sleep(time.Until(next.Add(*statsPeriod)))
			d := counter.dump().Since(a)
			if windows[kind] == nil {
				windows[kind] = tcgprof.Counts{}
			}
			for pc, n := range d {
				windows[kind][pc] += n
			}
		}
	}

	prefix := v.name
	if prefix != "" {
		prefix += "-"
	}
	n := float64(2 * *insnCalls)
	idleAll, idleKernel := windows["idle"].Totals()
	// Each window is its calls' periods and one more.
	seconds := float64(2*(*insnCalls+1)) * statsPeriod.Seconds()
	b.ReportMetric(float64(idleAll)/seconds, prefix+"idle-insns-per-s")
	perCall := map[string]float64{}
	for _, kind := range []string{"stats", "check"} {
		all, kernel := windows[kind].Totals()
		perCall[kind] = (float64(all) - float64(idleAll)) / n
		b.ReportMetric(perCall[kind], prefix+kind+"-insns")
		b.ReportMetric((float64(kernel)-float64(idleKernel))/n, prefix+kind+"-kernel-insns")
		b.ReportMetric((float64(all-kernel)-float64(idleAll-idleKernel))/n, prefix+kind+"-user-insns")
	}
	// What reading the cgroup files adds to a call that does nothing.
	b.ReportMetric(perCall["stats"]/perCall["check"], prefix+"stats-vs-check")
	if testing.Verbose() {
		for _, kind := range []string{"idle", "check", "stats"} {
			b.Logf("%s%s window, instructions per call (the idle rate not subtracted), by function:\n%s",
				prefix, kind, topFunctions(windows[kind], kallsyms, user, n))
		}
	}
}

// buildTCGProf builds the tcgprof plugin with gcc.
func buildTCGProf(b *testing.B) string {
	testutil.RequireBinary(b, "gcc")
	plugin := filepath.Join(b.TempDir(), "tcgprof.so")
	if out, err := exec.Command("gcc", "-O2", "-shared", "-fPIC", "-fvisibility=hidden", "-o", plugin,
		"../../hack/tcgprof/plugin/tcgprof.c", "-lpthread").CombinedOutput(); err != nil {
		b.Fatalf("build the plugin: %v\n%s", err, out)
	}
	return plugin
}

// agentSymbols reads -guest.agent-symbols; nil without it.
func agentSymbols(b *testing.B) *tcgprof.Symbols {
	if *insnSymbols == "" {
		return nil
	}
	s, err := tcgprof.ReadELF(*insnSymbols)
	if err != nil {
		b.Fatal(err)
	}
	return s
}

// insnCounter asks a guest's tcgprof plugin for its counts.
type insnCounter struct {
	b       *testing.B
	dir     string
	plugins []string // the VM's TCGPlugins
	seq     int
}

func newInsnCounter(b *testing.B, plugin string) *insnCounter {
	dir := testutil.ShortTempDir(b)
	return &insnCounter{b: b, dir: dir, plugins: []string{plugin + ",ctl=" + filepath.Join(dir, "ctl")}}
}

// dump returns the instructions the guest executed since QEMU started.
func (c *insnCounter) dump() tcgprof.Counts {
	b := c.b
	c.seq++
	ctl := filepath.Join(c.dir, "ctl")
	out := filepath.Join(c.dir, fmt.Sprintf("dump-%d", c.seq))
	if err := os.WriteFile(ctl+".tmp", []byte(out), 0o644); err != nil {
		b.Fatal(err)
	}
	if err := os.Rename(ctl+".tmp", ctl); err != nil {
		b.Fatal(err)
	}
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		if _, err := os.Stat(out); err == nil {
			break
		}
		if time.Now().After(deadline) {
			b.Fatalf("the plugin wrote no %s", out)
		}
	}
	counts, err := tcgprof.ReadDump(out)
	if err != nil {
		b.Fatal(err)
	}
	os.Remove(out)
	return counts
}

// kallsyms reads the guest kernel's symbols, from a container allowed to see them.
func (g *guestVM) kallsyms(b *testing.B) *tcgprof.Symbols {
	spec := testSpec("cat", "/proc/kallsyms")
	caps := spec.Process.Capabilities
	caps.Bounding = append(caps.Bounding, "CAP_SYSLOG")
	caps.Effective = append(caps.Effective, "CAP_SYSLOG")
	caps.Permitted = append(caps.Permitted, "CAP_SYSLOG")
	s, err := tcgprof.ReadKallsyms(strings.NewReader(g.run(b, "kallsyms", spec).stdout))
	if err != nil {
		b.Fatal(err)
	}
	return s
}

// topFunctions lists c's functions that executed the most, divided by n.
func topFunctions(c tcgprof.Counts, kernel, user *tcgprof.Symbols, n float64) string {
	var lines []string
	for i, f := range c.ByFunction(kernel, user) {
		if i == *insnTop {
			break
		}
		lines = append(lines, fmt.Sprintf("  %9.0f  %s", float64(f.Instructions)/n, f.Name))
	}
	return strings.Join(lines, "\n")
}
