package qemu

import (
	"bufio"
	"context"
	"fmt"
	"os"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/procfs"

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
func pssMiB(pid int) (float64, error) { return rollupMiB(pid, "Pss") }

// rollupMiB reads a field of /proc/PID/smaps_rollup (Pss, Anonymous...), in MiB.
func rollupMiB(pid int, field string) (float64, error) {
	f, err := os.Open(fmt.Sprintf("/proc/%d/smaps_rollup", pid))
	if err != nil {
		return 0, err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), field+":"); ok {
			kb, err := strconv.Atoi(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")))
			if err != nil {
				return 0, err
			}
			return float64(kb) / 1024, nil
		}
	}
	return 0, fmt.Errorf("no %s in smaps_rollup of %d", field, pid)
}

// BenchmarkKernelFormat boots the test guest through the VMM with the kernel as the
// package ships it (an LZ4 bzImage, which QEMU hands over fw_cfg and which decompresses
// itself) and as the uncompressed vmlinux pods boot (QEMU maps the ELF and enters it
// through its PVH note), alternately in the same run. Reported for each: ms from QEMU's
// start to the init answering on the agent channel, QEMU's CPU time to then, and, after
// some work in the guest and a pause, QEMU's memory: anonymous (guest RAM touched, TCG's
// translation cache, QEMU's own heap, where it keeps a copy of a bzImage), which each VM
// pays for itself; PSS of files (QEMU's binary and libraries, and the vmlinux QEMU maps:
// page cache, shared with every VM of the host, so that it varies with what else maps it);
// and PSS. Reported: the medians of each and the ratios vmlinux/bzImage of the medians; each
// boot is logged (-v). Sub-benchmarks:
// QEMU as the VMM starts it by default, and with the pods' settings (shim/config's defaults:
// the translation cache bounded, free page reporting, which hands back guest RAM the guest
// freed, such as a bzImage's compressed copy).
func BenchmarkKernelFormat(b *testing.B) {
	g := newTestGuest(b)
	for _, q := range []struct {
		name string
		cfg  Config
	}{
		{"qemu=default", Config{}},
		{"qemu=pod", Config{TCGTranslationCacheMiB: 128, FreePageReporting: true}},
	} {
		b.Run(q.name, func(b *testing.B) { benchKernelFormat(b, g, q.cfg) })
	}
}

func benchKernelFormat(b *testing.B, g testGuest, q Config) {
	formats := []struct{ name, kernel string }{{"bzimage", g.bzImage}, {"vmlinux", g.kernel}}
	boots := make([][]kernelBoot, len(formats))
	i := 0
	for b.Loop() {
		for j := range formats {
			k := (i + j) % len(formats) // alternate which goes first
			r := kernelFormatBoot(b, g, formats[k].kernel, q)
			b.Logf("%s: %v to init, %v CPU, anonymous %.1f MiB, file PSS %.1f MiB, PSS %.1f MiB",
				formats[k].name, r.wall, r.cpu, r.anonMiB, r.filePSSMiB, r.pssMiB)
			boots[k] = append(boots[k], r)
		}
		i++
	}
	// Medians: on a shared host a boot now and then takes much longer.
	med := make([]kernelBoot, len(formats))
	for k, f := range formats {
		med[k] = kernelBoot{
			wall:       median(boots[k], func(r kernelBoot) time.Duration { return r.wall }),
			cpu:        median(boots[k], func(r kernelBoot) time.Duration { return r.cpu }),
			anonMiB:    median(boots[k], func(r kernelBoot) float64 { return r.anonMiB }),
			filePSSMiB: median(boots[k], func(r kernelBoot) float64 { return r.filePSSMiB }),
			pssMiB:     median(boots[k], func(r kernelBoot) float64 { return r.pssMiB }),
		}
		b.ReportMetric(float64(med[k].wall.Milliseconds()), f.name+"-ms/boot")
		b.ReportMetric(float64(med[k].cpu.Milliseconds()), f.name+"-cpu-ms/boot")
		b.ReportMetric(med[k].anonMiB, f.name+"-anon-MiB")
		b.ReportMetric(med[k].filePSSMiB, f.name+"-file-PSS-MiB")
		b.ReportMetric(med[k].pssMiB, f.name+"-PSS-MiB")
	}
	bz, v := med[0], med[1]
	b.ReportMetric(float64(v.wall)/float64(bz.wall), "vmlinux/bzimage-time")
	b.ReportMetric(float64(v.cpu)/float64(bz.cpu), "vmlinux/bzimage-cpu")
	b.ReportMetric(v.anonMiB/bz.anonMiB, "vmlinux/bzimage-anon")
	b.ReportMetric(v.pssMiB/bz.pssMiB, "vmlinux/bzimage-PSS")
}

// kernelBoot is what BenchmarkKernelFormat measures of one boot.
type kernelBoot struct {
	wall, cpu                   time.Duration
	anonMiB, filePSSMiB, pssMiB float64
}

// median is the median of f over rs (the mean of the middle two of an even count).
func median[T time.Duration | float64](rs []kernelBoot, f func(kernelBoot) T) T {
	v := make([]T, len(rs))
	for i, r := range rs {
		v[i] = f(r)
	}
	slices.Sort(v)
	n := len(v)
	if n%2 == 1 {
		return v[n/2]
	}
	return (v[n/2-1] + v[n/2]) / 2
}

func kernelFormatBoot(b *testing.B, g testGuest, kernel string, q Config) kernelBoot {
	b.Helper()
	// The pods' defaults: 512 MiB, 16 hot-plug slots (shim/config).
	vm, err := New(vmm.Config{Kernel: kernel, Initramfs: g.initramfs, Accelerator: "tcg", MemoryMiB: 512,
		StateDir: testutil.ShortTempDir(b), HotplugSlots: 16}, q)
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
	defer sh.conn.Close()
	var r kernelBoot
	r.wall = time.Since(start)
	if r.cpu, err = processCPU(vm.Pid()); err != nil {
		b.Fatal(err)
	}
	sh.must(b, "ls -R /sys >/dev/null; cat /proc/meminfo >/dev/null")
	time.Sleep(3 * time.Second) // free page reporting waits 2 s before it reports
	if r.anonMiB, err = rollupMiB(vm.Pid(), "Anonymous"); err != nil {
		b.Fatal(err)
	}
	if r.filePSSMiB, err = rollupMiB(vm.Pid(), "Pss_File"); err != nil {
		b.Fatal(err)
	}
	if r.pssMiB, err = rollupMiB(vm.Pid(), "Pss"); err != nil {
		b.Fatal(err)
	}
	return r
}

// processCPU is a process's user and system CPU time, from /proc/PID/stat.
func processCPU(pid int) (time.Duration, error) {
	p, err := procfs.NewProc(pid)
	if err != nil {
		return 0, err
	}
	st, err := p.Stat()
	if err != nil {
		return 0, err
	}
	return time.Duration(st.CPUTime() * float64(time.Second)), nil
}
