package integration

import (
	"fmt"
	"strconv"
	"strings"
	"testing"
	"time"

	runtime "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/caisson-containers/caisson/integration-tests/harness"
	"github.com/caisson-containers/caisson/shim/config"
)

// guestSeconds runs script in the container between two readings of the guest's
// /proc/uptime and returns the seconds between them: the guest's own clock, so the
// exec's round trips are not counted.
func guestSeconds(b *testing.B, c *harness.CRI, id, script string) float64 {
	b.Helper()
	out, errOut, code := c.Exec(b, id, "sh", "-c",
		"a=$(cut -d' ' -f1 /proc/uptime); "+script+" >/dev/null 2>&1 || exit 1; z=$(cut -d' ' -f1 /proc/uptime); echo $a $z")
	if code != 0 {
		b.Fatalf("%s: exit %d: %s", script, code, errOut)
	}
	f := strings.Fields(out)
	if len(f) != 2 {
		b.Fatalf("%s: output %q", script, out)
	}
	start, _ := strconv.ParseFloat(f[0], 64)
	end, _ := strconv.ParseFloat(f[1], 64)
	return end - start
}

// BenchmarkCRIVolumeIO: in one pod, sequential write and read of 256 MiB and the creation
// of 10,000 small files on a shared volume (virtio-fs, a host directory) against the same
// on the container's own rootfs (its ext4 disk, virtio-blk), timed by the guest's clock.
// Reported as throughput and as volume/rootfs ratios (target: ≥ 0.5 for sequential I/O).
// The reads follow a drop of the guest's page cache (the container is privileged for it).
func BenchmarkCRIVolumeIO(b *testing.B) {
	c := harness.StartCRI(b, harness.Options{})
	image := c.Pull(b, c.BusyboxRef, harness.Handler)
	vol := b.TempDir()
	podCfg := c.PodConfig("volume-io", func(p *runtime.PodSandboxConfig) {
		p.Linux.SecurityContext = &runtime.LinuxSandboxSecurityContext{Privileged: true}
	})
	pod := c.RunPod(b, podCfg, harness.Handler)
	cfg := withMounts(harness.ContainerConfig("io", image, "sleep", "100000"),
		&runtime.Mount{HostPath: vol, ContainerPath: "/vol"})
	cfg.Linux.SecurityContext = &runtime.LinuxContainerSecurityContext{Privileged: true}
	id := c.StartContainer(b, pod, podCfg, cfg)

	const mib = 256
	type result struct{ write, read, files float64 }
	measure := func(dir string) result {
		var r result
		r.write = guestSeconds(b, c, id, fmt.Sprintf("dd if=/dev/zero of=%s/seq bs=1M count=%d conv=fsync", dir, mib))
		r.read = guestSeconds(b, c, id, fmt.Sprintf("sync; echo 3 > /proc/sys/vm/drop_caches; dd if=%s/seq of=/dev/null bs=1M", dir))
		r.files = guestSeconds(b, c, id, fmt.Sprintf("mkdir %s/many && cd %s/many && i=0; while [ $i -lt 10000 ]; do echo $i > f$i; i=$((i+1)); done; sync", dir, dir))
		c.Exec(b, id, "rm", "-rf", dir+"/seq", dir+"/many")
		return r
	}
	var root, shared result
	for i := 0; i < b.N; i++ {
		root = measure("/tmp")
		shared = measure("/vol")
	}
	b.ReportMetric(mib/root.write, "rootfs-write-MiB/s")
	b.ReportMetric(mib/shared.write, "volume-write-MiB/s")
	b.ReportMetric(mib/root.read, "rootfs-read-MiB/s")
	b.ReportMetric(mib/shared.read, "volume-read-MiB/s")
	b.ReportMetric(10000/root.files, "rootfs-files/s")
	b.ReportMetric(10000/shared.files, "volume-files/s")
	b.ReportMetric(root.write/shared.write, "write-volume/rootfs")
	b.ReportMetric(root.read/shared.read, "read-volume/rootfs")
	b.ReportMetric(root.files/shared.files, "files-volume/rootfs")
	fmt.Printf("volume (virtio-fs) against rootfs (virtio-blk), 256 MiB and 10,000 files: write %.2fx (%.0f vs %.0f MiB/s), read %.2fx (%.0f vs %.0f MiB/s), create %.2fx (%.0f vs %.0f files/s)\n",
		root.write/shared.write, mib/shared.write, mib/root.write, root.read/shared.read, mib/shared.read, mib/root.read,
		root.files/shared.files, 10000/shared.files, 10000/root.files)
	c.RemovePod(b, pod)
}

// BenchmarkCRIPodMemorySharedFS: an idle pod's host memory (PSS of QEMU, the shim and
// virtiofsd) with host paths shared (guest.shared_fs = virtio-fs, the default: the guest's
// RAM in a shared memory file, a virtiofsd) against copied (no virtiofsd, private RAM),
// in the same run; each pod mounts one volume.
func BenchmarkCRIPodMemorySharedFS(b *testing.B) {
	c := harness.StartCRI(b, harness.Options{Handlers: map[string]func(*config.Config){
		"caisson-copy": func(cfg *config.Config) { cfg.Guest.SharedFS = config.SharedFSCopy },
	}})
	image := c.Pull(b, c.BusyboxRef, harness.Handler)
	vol := b.TempDir()
	mem := map[string]float64{}
	for _, handler := range []string{"caisson-copy", harness.Handler} {
		podCfg := c.PodConfig("mem-"+handler, nil)
		pod := c.RunPod(b, podCfg, handler)
		c.StartContainer(b, pod, podCfg, withMounts(harness.ContainerConfig("app", image, "sleep", "100000"),
			&runtime.Mount{HostPath: vol, ContainerPath: "/vol", Readonly: true}))
		var total int64
		time.Sleep(3 * time.Second) // let the guest settle after boot
		for _, p := range append(append(c.QEMUs(), shimPids(pod)...), c.Virtiofsds()...) {
			pid, _ := strconv.Atoi(p)
			total += pss(b, pid)
		}
		mem[handler] = float64(total) / (1 << 20)
		c.RemovePod(b, pod)
	}
	b.ReportMetric(mem["caisson-copy"], "copied-pod-PSS-MiB")
	b.ReportMetric(mem[harness.Handler], "shared-pod-PSS-MiB")
	b.ReportMetric(mem[harness.Handler]/mem["caisson-copy"], "shared/copied")
	fmt.Printf("idle pod with a volume: %.0f MiB PSS shared (virtio-fs) against %.0f MiB copied: %.2fx\n",
		mem[harness.Handler], mem["caisson-copy"], mem[harness.Handler]/mem["caisson-copy"])
}
