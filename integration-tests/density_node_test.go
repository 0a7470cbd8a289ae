package integration

import (
	"math"
	"testing"

	"github.com/caisson-containers/caisson/integration-tests/harness"
)

// TestNodeCPUSplit checks how bench-density splits the machine's CPU over the idle
// window: the pods' processes (pids 10-22 here) count once, as the pods', from their
// podCPU; kernel threads and containerd by what they are; a process that began, or a
// pid taken by another command, within the window falls in the rest.
func TestNodeCPUSplit(t *testing.T) {
	cpu := []podCPU{{qemu: 1, shim: 0.5}, {qemu: 2, shim: 0.5, virtiofsd: 1}}
	proc := func(comm string, kernel bool, s float64) harness.ProcessCPU {
		return harness.ProcessCPU{Comm: comm, Kernel: kernel, Seconds: s}
	}
	m0 := machineReading{busy: 100, procs: map[int]harness.ProcessCPU{
		10: proc("qemu-system-x86", false, 5), 11: proc("containerd-shim", false, 1),
		20: proc("qemu-system-x86", false, 5), 21: proc("containerd-shim", false, 1), 22: proc("virtiofsd", false, 0),
		2: proc("kdamond.0", true, 3), 3: proc("kworker/0:1", true, 1),
		30: proc("containerd", false, 4), 31: proc("caisson-snapsho", false, 1),
		40: proc("kworker/0:2", true, 7), // it ends, and a kworker of another name takes its pid
	}}
	m1 := machineReading{busy: 110, procs: map[int]harness.ProcessCPU{
		10: proc("qemu-system-x86", false, 5.9), 11: proc("containerd-shim", false, 1.1),
		20: proc("qemu-system-x86", false, 5.8), 21: proc("containerd-shim", false, 1.1), 22: proc("virtiofsd", false, 0.1),
		2: proc("kdamond.0", true, 4), 3: proc("kworker/0:1", true, 1.5),
		30: proc("containerd", false, 4.3), 31: proc("caisson-snapsho", false, 1.2),
		40: proc("kworker/1:0", true, 0.3),
		50: proc("go", false, 2), // began within the window
	}}
	pct := func(d float64) float64 { return d * 10 } // a 10 s window
	n := nodeCPUOf(cpu, m0, m1, pct)
	for _, c := range []struct {
		name      string
		got, want float64
	}{
		{"busy", n.busy, 100},
		{"pods (their podCPU, not their /proc readings)", n.pods, 5},
		{"containerd", n.containerd, 5},
		{"kernel", n.kernel, 15},
		{"busiest kernel thread", n.topKernelCPU, 10},
		{"rest", n.rest(), 75},
	} {
		if math.Abs(c.got-c.want) > 1e-9 {
			t.Errorf("%s: %.3f, want %.3f", c.name, c.got, c.want)
		}
	}
	if n.topKernel != "kdamond.0" {
		t.Errorf("busiest kernel thread %q, want kdamond.0", n.topKernel)
	}
}
