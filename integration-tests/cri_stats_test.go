package integration

import (
	"strconv"
	"strings"
	"testing"
	"time"

	runtime "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/caisson-containers/caisson/integration-tests/harness"
	"github.com/caisson-containers/caisson/shim/config"
)

// askGuestHandler runs pods with the stats reuse off (guest.stats_reuse_vcpu_time = 0).
const askGuestHandler = "caisson-askguest"

// ContainerStats counts the CPU a container used, right after it used it, for each of a
// pod's two containers: on runc (the control), and on Caisson with its stats reuse (the
// default) and without. And on Caisson, while the guest idles, ContainerStats calls that
// follow each other do not reach the guest: the agent channel's interrupts in the guest
// do not grow with them. With the reuse off they grow by at least one a call, which
// shows that the count sees the calls.
func TestCRIStatsReuse(t *testing.T) {
	c := harness.StartCRI(t, harness.Options{Handlers: map[string]func(*config.Config){
		askGuestHandler: func(c *config.Config) { c.Guest.StatsReuseVCPUTime = 0 },
	}})
	ctx := c.Ctx(t)
	image := c.Pull(t, c.BusyboxRef, harness.Handler)
	for _, tc := range []struct {
		handler string
		vm      bool // a Caisson pod, whose guest's interrupts are counted
		reuse   bool
	}{
		{handler: harness.RuncHandler},
		{handler: askGuestHandler, vm: true},
		{handler: harness.Handler, vm: true, reuse: true},
	} {
		t.Run(tc.handler, func(t *testing.T) {
			podCfg := c.PodConfig("stats-"+tc.handler, nil)
			pod := c.RunPod(t, podCfg, tc.handler)
			defer c.RemovePod(t, pod)
			ctrs := []string{
				c.StartContainer(t, pod, podCfg, harness.ContainerConfig("idle", image, "sleep", "100000")),
				c.StartContainer(t, pod, podCfg, harness.ContainerConfig("idle2", image, "sleep", "100000")),
			}
			usage := func(ctr string) time.Duration {
				t.Helper()
				st, err := c.Runtime.ContainerStats(ctx, &runtime.ContainerStatsRequest{ContainerId: ctr})
				if err != nil {
					t.Fatalf("ContainerStats: %v", err)
				}
				cpu := st.GetStats().GetCpu().GetUsageCoreNanoSeconds()
				if cpu == nil {
					t.Fatalf("ContainerStats without CPU usage: %v", st.GetStats())
				}
				return time.Duration(cpu.GetValue())
			}

			// Work shows at once, however recently the containers' stats were given (and
			// a Caisson pod's were read in one call into the guest).
			for _, ctr := range ctrs {
				before := usage(ctr)
				for _, other := range ctrs {
					usage(other)
				}
				out, errOut, code := c.Exec(t, ctr, "sh", "-c", "i=0; while [ $i -lt 20000 ]; do i=$((i+1)); done; times")
				if code != 0 {
					t.Fatalf("busy loop: exit %d: %s", code, errOut)
				}
				worked := shellCPU(t, out)
				after := usage(ctr)
				// The shell's own times are in 10 ms steps.
				if after-before < worked-10*time.Millisecond {
					t.Errorf("%s: ContainerStats' CPU usage grew by %v over an exec whose shell alone used %v", ctr, after-before, worked)
				}
			}

			if !tc.vm {
				return
			}
			// Calls while the guest idles. An exec's own interrupts are measured between
			// two execs with nothing between them.
			a := agentInterrupts(t, c, ctrs[0])
			b := agentInterrupts(t, c, ctrs[0])
			const calls = 60 // 30 of each container
			for range calls / 2 {
				for _, ctr := range ctrs {
					usage(ctr)
				}
				time.Sleep(50 * time.Millisecond)
			}
			d := agentInterrupts(t, c, ctrs[0])
			extra := (d - b) - (b - a)
			t.Logf("the agent channel's interrupts: %d for an exec, %d for an exec after %d ContainerStats calls", b-a, d-b, calls)
			switch {
			case tc.reuse && extra >= calls:
				t.Errorf("%d ContainerStats calls of an idle pod made %d more interrupts of the agent's channel: the guest was asked each time", calls, extra)
			case !tc.reuse && extra < calls:
				t.Errorf("%d ContainerStats calls with the reuse off made only %d more interrupts of the agent's channel: the count does not see the calls", calls, extra)
			}
		})
	}
}

// shellCPU is the user and system time in the first line of busybox sh's `times`
// ("0m0.120s 0m0.010s").
func shellCPU(t *testing.T, out string) time.Duration {
	t.Helper()
	line, _, _ := strings.Cut(strings.TrimSpace(out), "\n")
	var sum time.Duration
	fields := strings.Fields(line)
	if len(fields) != 2 {
		t.Fatalf("times printed %q", out)
	}
	for _, f := range fields {
		m, s, ok := strings.Cut(strings.TrimSuffix(f, "s"), "m")
		min, err1 := strconv.Atoi(m)
		sec, err2 := strconv.ParseFloat(s, 64)
		if !ok || err1 != nil || err2 != nil {
			t.Fatalf("times printed %q", out)
		}
		sum += time.Duration(min)*time.Minute + time.Duration(sec*float64(time.Second))
	}
	return sum
}

// agentInterrupts is how many interrupts the guest's agent channel (the virtio-serial
// device of the port org.caisson.agent.0) has taken, read by an exec in container ctr
// from the guest's sysfs (/proc/interrupts is masked in containers).
func agentInterrupts(t *testing.T, c *harness.CRI, ctr string) int {
	t.Helper()
	const script = `for p in /sys/class/virtio-ports/*; do
  if [ "$(cat $p/name)" = org.caisson.agent.0 ]; then v=$(basename $(dirname $(dirname $(readlink -f $p)))); fi
done
for d in /sys/kernel/irq/*; do
  if [ "$(cat $d/actions 2>/dev/null)" = "$v-virtqueues" ]; then cat $d/per_cpu_count; fi
done`
	out, errOut, code := c.Exec(t, ctr, "sh", "-c", script)
	if code != 0 {
		t.Fatalf("reading the guest's interrupts: exit %d: %s", code, errOut)
	}
	counts := strings.Split(strings.TrimSpace(out), ",")
	sum := 0
	for _, s := range counts {
		n, err := strconv.Atoi(strings.TrimSpace(s))
		if err != nil {
			t.Fatalf("the agent channel's interrupt counts: %q", out)
		}
		sum += n
	}
	if sum == 0 {
		t.Fatalf("the agent channel took no interrupt: %q", out)
	}
	return sum
}
