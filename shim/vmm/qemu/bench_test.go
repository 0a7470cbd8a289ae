package qemu

import (
	"bufio"
	"context"
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/caisson-containers/caisson/internal/testutil"
	"github.com/caisson-containers/caisson/shim/vmm"
)

// BenchmarkBootToInit measures QEMU start to the guest's init answering on the agent
// channel, through the VMM (sandbox, QMP, bridges, agent port), against a bare boot
// of the same kernel and initramfs in the same run: QEMU with the fewest options, until
// the init's ready line shows on its console. Reported: ms per boot of each, and their ratio.
// Sub-benchmarks vary the number of hot-plug slots (bridge slots the firmware and the
// guest kernel enumerate, 30 per bridge).
func BenchmarkBootToInit(b *testing.B) {
	g := newTestGuest(b)
	for _, slots := range []int{0, 8, 32} {
		b.Run(fmt.Sprintf("hotplug-slots=%d", slots), func(b *testing.B) {
			var viaVMM, bare time.Duration
			for b.Loop() {
				bare += bareBoot(b, g)
				viaVMM += vmmBoot(b, g, slots)
			}
			n := float64(b.N)
			b.ReportMetric(float64(viaVMM.Milliseconds())/n, "vmm-ms/boot")
			b.ReportMetric(float64(bare.Milliseconds())/n, "bare-ms/boot")
			b.ReportMetric(float64(viaVMM)/float64(bare), "vmm/bare")
		})
	}
}

// vmmBoot starts a VM, waits for its init to answer, and stops it.
func vmmBoot(b *testing.B, g testGuest, slots int) time.Duration {
	b.Helper()
	vm, err := New(vmm.Config{Kernel: g.kernel, Initramfs: g.initramfs, Accelerator: "tcg", StateDir: testutil.ShortTempDir(b), HotplugSlots: slots}, Config{})
	if err != nil {
		b.Fatal(err)
	}
	ctx := context.Background()
	start := time.Now()
	if err := vm.Start(ctx); err != nil {
		b.Fatal(err)
	}
	defer vm.Stop(ctx)
	sh := dialGuest(b, vm.Endpoint(), bootTimeout)
	d := time.Since(start)
	sh.conn.Close()
	if err := vm.Stop(ctx); err != nil {
		b.Fatal(err)
	}
	return d
}

// bareBoot runs QEMU by hand with the fewest options until the init's ready line.
func bareBoot(b *testing.B, g testGuest) time.Duration {
	b.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), bootTimeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, defaultBinary, "-M", "q35", "-accel", "tcg", "-m", "512M",
		"-nodefaults", "-no-user-config", "-nographic", "-no-reboot", "-serial", "stdio",
		"-kernel", g.kernel, "-initrd", g.initramfs, "-append", baseKernelParams)
	out, err := cmd.StdoutPipe()
	if err != nil {
		b.Fatal(err)
	}
	start := time.Now()
	if err := cmd.Start(); err != nil {
		b.Fatal(err)
	}
	defer cmd.Wait()
	defer cmd.Process.Kill()
	sc := bufio.NewScanner(out)
	for sc.Scan() {
		if strings.Contains(sc.Text(), initReady) {
			return time.Since(start)
		}
	}
	b.Fatalf("bare boot ended without %q: %v", initReady, sc.Err())
	return 0
}

// BenchmarkIdlePSS reports QEMU's proportional set size with -m 512 once the guest is
// idle, for several bounds of TCG's translation cache (0: QEMU's default), with and
// without free page reporting.
func BenchmarkIdlePSS(b *testing.B) {
	g := newTestGuest(b)
	for _, q := range []Config{
		{},
		{TCGTranslationCacheMiB: 32},
		{TCGTranslationCacheMiB: 16},
		{TCGTranslationCacheMiB: 8},
		{FreePageReporting: true},
		{TCGTranslationCacheMiB: 16, FreePageReporting: true},
		{TCGTranslationCacheMiB: 8, FreePageReporting: true},
	} {
		b.Run(fmt.Sprintf("tb-size=%d,free-page-reporting=%v", q.TCGTranslationCacheMiB, q.FreePageReporting), func(b *testing.B) {
			var total float64
			for b.Loop() {
				total += idlePSS(b, g, q)
			}
			b.ReportMetric(total/float64(b.N), "PSS-MiB")
		})
	}
}

func idlePSS(b *testing.B, g testGuest, q Config) float64 {
	b.Helper()
	vm, err := New(vmm.Config{Kernel: g.kernel, Initramfs: g.initramfs, Accelerator: "tcg", MemoryMiB: 512, StateDir: testutil.ShortTempDir(b), HotplugSlots: 8}, q)
	if err != nil {
		b.Fatal(err)
	}
	ctx := context.Background()
	if err := vm.Start(ctx); err != nil {
		b.Fatal(err)
	}
	defer vm.Stop(ctx)
	sh := dialGuest(b, vm.Endpoint(), bootTimeout)
	// Some work in the guest, as an agent would do, then idle.
	sh.must(b, "ls -R /sys >/dev/null; cat /proc/meminfo >/dev/null")
	time.Sleep(3 * time.Second)
	pss, err := pssMiB(vm.Pid())
	if err != nil {
		b.Fatal(err)
	}
	return pss
}

// pssMiB reads a process's PSS from /proc/PID/smaps_rollup.
func pssMiB(pid int) (float64, error) {
	f, err := os.Open(fmt.Sprintf("/proc/%d/smaps_rollup", pid))
	if err != nil {
		return 0, err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), "Pss:"); ok {
			kb, err := strconv.Atoi(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")))
			if err != nil {
				return 0, err
			}
			return float64(kb) / 1024, nil
		}
	}
	return 0, fmt.Errorf("no Pss in smaps_rollup of %d", pid)
}
