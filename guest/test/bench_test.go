package test

import (
	"context"
	"os"
	"path/filepath"
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
// guest powered off.
func bootBaseline(b *testing.B, kernel, initrd string) time.Duration {
	b.Helper()
	vm, err := qemu.New(vmm.Config{Kernel: kernel, Initramfs: initrd, Accelerator: "tcg", StateDir: testutil.ShortTempDir(b), MemoryMiB: 512,
		KernelParams: benchKernelParams}, qemu.Config{})
	must(b, err)
	ctx, cancel := context.WithTimeout(context.Background(), bootTimeout)
	defer cancel()
	start := time.Now()
	must(b, vm.Start(ctx))
	defer vm.Stop(context.Background())
	select {
	case <-vm.Done():
	case <-ctx.Done():
		b.Fatal("baseline guest did not power off")
	}
	return time.Since(start)
}

// benchKernelParams are the same for both guests: a quiet console, as in production.
var benchKernelParams = []string{"quiet"}

func median(ds []time.Duration) time.Duration {
	s := append([]time.Duration(nil), ds...)
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	return s[len(s)/2]
}

// BenchmarkGuestBoot reports, per iteration a boot of each guest in turn:
//   - ready-ratio: QEMU start → agent answering Sandbox.Check, over QEMU start → the
//     trivial init's power-off (same kernel, same accelerator, same run; medians);
//   - agent-rss-MiB: the agent's resident memory once it serves and has run a container;
//   - initramfs-MiB: the size of the production initramfs.
func BenchmarkGuestBoot(b *testing.B) {
	testutil.RequireRoot(b)
	testutil.RequireBinary(b, "qemu-system-x86_64")
	g := testutil.RequireGuest(b)
	baseline := baselineInitramfs(b)
	disks := layerDisks(b)
	var ours, base []time.Duration
	var rss float64
	for i := 0; i < b.N; i++ {
		base = append(base, bootBaseline(b, g.Kernel, baseline))
		start := time.Now()
		gv := bootGuestWith(b, disks, 0, benchKernelParams)
		ours = append(ours, time.Since(start))
		if i == 0 {
			rss = agentRSS(b, gv)
		}
		gv.stop(b)
	}
	st, err := os.Stat(g.Initramfs)
	must(b, err)
	b.ReportMetric(float64(median(ours))/float64(median(base)), "ready-ratio")
	b.ReportMetric(median(ours).Seconds(), "agent-ready-s")
	b.ReportMetric(median(base).Seconds(), "baseline-s")
	b.ReportMetric(rss, "agent-rss-MiB")
	b.ReportMetric(float64(st.Size())/(1<<20), "initramfs-MiB")
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
