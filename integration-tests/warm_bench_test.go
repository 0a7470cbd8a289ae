package integration

import (
	"fmt"
	"testing"
	"time"

	"github.com/caisson-containers/caisson/integration-tests/harness"
	"github.com/caisson-containers/caisson/shim/config"
)

// BenchmarkWarmVMCost (make bench-warm) reports what warm VMs (hypervisor.warm_vms = 1)
// cost while idle, against an idle pod from the template (the baseline) measured in the
// same window: the PSS (TCG's translation cache apart) and the idle CPU over 30 s of
//   - a warm VM waiting for a pod (its shim and QEMU), warm-waiting-*;
//   - an idle pod (one sleeping container) that started in a warm VM, warm-pod-*;
//   - an idle pod from the template, template-pod-*.
func BenchmarkWarmVMCost(b *testing.B) {
	c := harness.StartCRI(b, harness.Options{Handlers: map[string]func(*config.Config){
		templateHandler: func(c *config.Config) { c.Hypervisor.Template = true },
		warmHandler:     func(c *config.Config) { c.Hypervisor.Template, c.Hypervisor.WarmVMs = true, 1 },
	}})
	image := c.Pull(b, c.BusyboxRef, harness.Handler)
	c.Pull(b, c.PauseRef, harness.Handler)

	// The template's maker, then the warm handler's first pod, which fills the pool:
	// neither is measured.
	maker := startDensityPod(b, c, templateHandler, image, "warm-cost-maker")
	c.RemovePod(b, maker.id)
	filler := startDensityPod(b, c, warmHandler, image, "warm-cost-filler")
	c.RemovePod(b, filler.id)

	claimed := waitWarm(b, c.StateDir, 1)[0]
	warmPod := startDensityPod(b, c, warmHandler, image, "warm-cost-pod")
	warmPod.shim, warmPod.qemu = claimed.Pid, qemuIn(claimed.Dir)
	tmplPod := startDensityPod(b, c, templateHandler, image, "warm-cost-template")
	findPodProcesses(b, c, &tmplPod)
	waiting := waitWarm(b, c.StateDir, 1)[0]
	warmVM := densityPod{shim: waiting.Pid, qemu: qemuIn(waiting.Dir)}
	if warmPod.qemu == 0 || warmVM.qemu == 0 {
		b.Fatalf("the QEMUs of the warm pod (%d) and the waiting warm VM (%d)", warmPod.qemu, warmVM.qemu)
	}

	time.Sleep(densitySettle)
	measured := []densityPod{tmplPod, warmPod, warmVM}
	var mem []podMemory
	for _, p := range measured {
		mem = append(mem, podMemoryOf(b, c, p))
	}
	cpu := idleCPU(b, measured)

	b.ReportMetric(0, "ns/op")
	base, baseCPU := float64(mem[0].withoutTCG()), cpu[0].total()
	for i, name := range []string{"template-pod", "warm-pod", "warm-waiting"} {
		b.ReportMetric(mib(mem[i].withoutTCG()), name+"-PSS-without-TCG-MiB")
		b.ReportMetric(mib(mem[i].tcg), name+"-TCG-cache-MiB")
		b.ReportMetric(cpu[i].total(), name+"-idle-cpu-%")
		if i > 0 {
			b.ReportMetric(float64(mem[i].withoutTCG())/base, name+"-PSS-vs-template-pod")
			if baseCPU > 0 {
				b.ReportMetric(cpu[i].total()/baseCPU, name+"-idle-cpu-vs-template-pod")
			}
		}
		fmt.Printf("%s: PSS %.1f MiB without TCG's translation cache (%.2f× the template pod's), cache %.1f MiB; idle CPU %.2f %% of a core (%.2f×)\n",
			name, mib(mem[i].withoutTCG()), float64(mem[i].withoutTCG())/base, mib(mem[i].tcg), cpu[i].total(), cpu[i].total()/baseCPU)
	}
	for _, p := range []densityPod{warmPod, tmplPod} {
		c.RemovePod(b, p.id)
	}
}
