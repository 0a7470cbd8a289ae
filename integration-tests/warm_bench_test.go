package integration

import (
	"fmt"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/caisson-containers/caisson/integration-tests/harness"
	"github.com/caisson-containers/caisson/shim/config"
	"github.com/caisson-containers/caisson/shim/warm"
)

// BenchmarkWarmVMCost (make bench-warm) reports what warm VMs (hypervisor.warm_vms = 1)
// cost while idle, from a template and booted, each against an idle pod of its kind (the
// baseline) measured in the same window: the PSS (TCG's translation cache apart) and the
// idle CPU over 30 s of
//   - a warm VM waiting for a pod (its shim and QEMU), warm-waiting-* and
//     warm-booted-waiting-*;
//   - an idle pod (one sleeping container) that started in a warm VM, warm-pod-* and
//     warm-booted-pod-*;
//   - an idle pod from the template, template-pod-*, and a booted one, booted-pod-*.
func BenchmarkWarmVMCost(b *testing.B) {
	c := harness.StartCRI(b, harness.Options{Handlers: map[string]func(*config.Config){
		templateHandler:   func(c *config.Config) { c.Hypervisor.Template = true },
		warmHandler:       func(c *config.Config) { c.Hypervisor.Template, c.Hypervisor.WarmVMs = true, 1 },
		warmBootedHandler: func(c *config.Config) { c.Hypervisor.WarmVMs = 1 },
	}})
	image := c.Pull(b, c.BusyboxRef, harness.Handler)
	c.Pull(b, c.PauseRef, harness.Handler)

	// The template's maker, then the warm handlers' first pods, which fill the pools:
	// none is measured.
	for _, h := range []string{templateHandler, warmHandler, warmBootedHandler} {
		p := startDensityPod(b, c, h, image, "warm-cost-"+h)
		c.RemovePod(b, p.id)
	}
	const pools = 2

	// kind is one kind of warm VM: its baseline pod, the pod that took a warm VM, and
	// the warm VM waiting after it.
	type kind struct {
		name, handler, baseHandler, baseName string
		base, pod, waiting                   densityPod
	}
	kinds := []*kind{
		{name: "warm", handler: warmHandler, baseHandler: templateHandler, baseName: "template-pod"},
		{name: "warm-booted", handler: warmBootedHandler, baseHandler: harness.Handler, baseName: "booted-pod"},
	}
	for _, k := range kinds {
		waitWarm(b, c.StateDir, pools)
		k.pod = startDensityPod(b, c, k.handler, image, "warm-cost-"+k.name+"-pod")
		claimed := claimedSlot(b, c.StateDir, k.pod.id)
		k.pod.shim = claimed.Pid
		findPodProcesses(b, c, &k.pod)
		for _, s := range waitWarm(b, c.StateDir, pools) {
			if filepath.Dir(s.Dir) == filepath.Dir(claimed.Dir) {
				k.waiting = densityPod{shim: s.Pid, qemu: qemuIn(s.Dir)}
			}
		}
		if k.waiting.qemu == 0 {
			b.Fatalf("%s: no waiting warm VM in the pool of %s", k.name, claimed.Dir)
		}
		k.base = startDensityPod(b, c, k.baseHandler, image, "warm-cost-"+k.baseName)
		findPodProcesses(b, c, &k.base)
	}

	time.Sleep(densitySettle)
	var measured []densityPod
	for _, k := range kinds {
		measured = append(measured, k.base, k.pod, k.waiting)
	}
	var mem []podMemory
	for _, p := range measured {
		mem = append(mem, podMemoryOf(b, c, p))
	}
	cpu, _ := idleCPU(b, measured)

	b.ReportMetric(0, "ns/op")
	for ki, k := range kinds {
		at := 3 * ki
		base, baseCPU := float64(mem[at].withoutTCG()), cpu[at].total()
		for i, name := range []string{k.baseName, k.name + "-pod", k.name + "-waiting"} {
			m, u := mem[at+i], cpu[at+i]
			b.ReportMetric(mib(m.withoutTCG()), name+"-PSS-without-TCG-MiB")
			b.ReportMetric(mib(m.tcg), name+"-TCG-cache-MiB")
			b.ReportMetric(u.total(), name+"-idle-cpu-%")
			if i > 0 {
				b.ReportMetric(float64(m.withoutTCG())/base, name+"-PSS-vs-"+k.baseName)
				if baseCPU > 0 {
					b.ReportMetric(u.total()/baseCPU, name+"-idle-cpu-vs-"+k.baseName)
				}
			}
			fmt.Printf("%s: PSS %.1f MiB without TCG's translation cache (%.2f× the %s's), cache %.1f MiB; idle CPU %.2f %% of a core (%.2f×)\n",
				name, mib(m.withoutTCG()), float64(m.withoutTCG())/base, k.baseName, mib(m.tcg), u.total(), u.total()/baseCPU)
		}
	}
	for _, k := range kinds {
		c.RemovePod(b, k.pod.id)
		c.RemovePod(b, k.base.id)
	}
}

// claimedSlot is the warm VM slot the pod id took.
func claimedSlot(b *testing.B, stateDir, id string) warm.Slot {
	b.Helper()
	for _, s := range warmSlots(b, stateDir) {
		if strings.HasSuffix(s.Claimed, "/"+id) {
			return s
		}
	}
	b.Fatalf("pod %s took no warm VM: %+v", id, warmSlots(b, stateDir))
	return warm.Slot{}
}
