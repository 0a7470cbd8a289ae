package snapshotter

import (
	"bufio"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/core/diff"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/plugins/snapshots/overlay"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"golang.org/x/sys/unix"

	"github.com/caisson-containers/caisson/snapshotter/config"
)

// benchImage generates an image of 5 layers, about 300 MiB and 20k files:
// each layer has 4,000 small files (0–8 KiB) in 40 directories, four 11 MiB
// files, and (above the base) whiteouts of some of the layer below's files.
func benchImage(b testing.TB) [][]layerEntry {
	rng := rand.New(rand.NewPCG(1, 2))
	var layers [][]layerEntry
	for l := range 5 {
		var es []layerEntry
		for d := range 40 {
			dir := fmt.Sprintf("l%d/d%02d", l, d)
			if d == 0 {
				es = append(es, dirE(fmt.Sprintf("l%d", l), 0o755, 0, 0))
			}
			es = append(es, dirE(dir, 0o755, 0, 0))
			for f := range 100 {
				data := make([]byte, rng.IntN(8192))
				for i := range data {
					data[i] = byte(rng.Uint32())
				}
				es = append(es, layerEntry{Header: fileHeader(fmt.Sprintf("%s/f%03d", dir, f), len(data)), Data: data})
			}
		}
		for i := range 4 {
			data := make([]byte, 11<<20)
			for j := 0; j < len(data); j += 8 {
				v := rng.Uint64()
				for k := 0; k < 8 && j+k < len(data); k++ {
					data[j+k] = byte(v >> (8 * k))
				}
			}
			es = append(es, layerEntry{Header: fileHeader(fmt.Sprintf("l%d/big%d", l, i), len(data)), Data: data})
		}
		if l > 0 {
			es = append(es, dirE(fmt.Sprintf("l%d", l-1), 0o755, 0, 0), dirE(fmt.Sprintf("l%d/d00", l-1), 0o755, 0, 0))
			for f := range 10 {
				es = append(es, whiteoutE(fmt.Sprintf("l%d/d00/.wh.f%03d", l-1, f)))
			}
		}
		layers = append(layers, es)
	}
	return layers
}

// BenchmarkUnpack unpacks the same 5-layer image with containerd's differ into
// containerd's overlayfs snapshotter (the baseline), with Caisson's differ into
// this snapshotter (the path containerd's unpacker takes with contrib/containerd's
// config), and with containerd's differ into this snapshotter (the path before).
// The two alternate within each iteration, in a rotating order, each from a cold
// page cache; it reports the mean times and the ratio to the baseline.
func BenchmarkUnpack(b *testing.B) {
	requireHost(b)
	dir := b.TempDir()
	h := newHarness(b, dir)
	var descs []ocispec.Descriptor
	var total int64
	for _, l := range benchImage(b) {
		d := h.addBlob(buildTar(b, l))
		descs = append(descs, d)
		total += d.Size
	}
	b.Logf("image: %d layers, %.0f MiB of tar", len(descs), float64(total)/(1<<20))

	// Each snapshotter is unpacked through the differ containerd's unpacker uses
	// for it (the transfer service's unpack_config in contrib/containerd):
	// containerd's walking differ for overlayfs, Caisson's for caisson.
	unpackAll := func(a diff.Applier, sn snapshots.Snapshotter) time.Duration {
		start := time.Now()
		parent := ""
		for i, d := range descs {
			name := fmt.Sprintf("layer%d", i)
			if err := h.unpackWith(a, sn, name, parent, d, d.Digest); err != nil {
				b.Fatal(err)
			}
			parent = name
		}
		return time.Since(start)
	}
	type contender struct {
		name string
		run  func(i int) time.Duration
		sum  time.Duration
	}
	contenders := []*contender{
		{name: "overlayfs", run: func(i int) time.Duration {
			root := filepath.Join(dir, fmt.Sprintf("overlay%d", i))
			ov, err := overlay.NewSnapshotter(root)
			if err != nil {
				b.Fatal(err)
			}
			defer os.RemoveAll(root)
			defer ov.Close()
			return unpackAll(h.walking, ov)
		}},
		{name: "caisson", run: func(i int) time.Duration {
			sn := h.newSnapshotter(func(c *config.Config) {
				c.Root = filepath.Join(dir, fmt.Sprintf("caisson%d", i))
				c.DefaultWritableSize = config.DefaultWritableSize // as in production
			})
			defer os.RemoveAll(sn.root)
			defer sn.Close()
			d := unpackAll(h.applier, sn)
			for l := range descs {
				if !h.applied(sn, fmt.Sprintf("layer%d", l)) {
					b.Fatalf("layer %d did not go through Caisson's differ", l)
				}
			}
			return d
		}},
		// The path before Caisson's differ: containerd's differ untars into
		// the writable image, Commit runs mkfs.erofs on it.
		{name: "caisson-walking", run: func(i int) time.Duration {
			sn := h.newSnapshotter(func(c *config.Config) {
				c.Root = filepath.Join(dir, fmt.Sprintf("caissonw%d", i))
				c.DefaultWritableSize = config.DefaultWritableSize
			})
			defer os.RemoveAll(sn.root)
			defer sn.Close()
			return unpackAll(h.walking, sn)
		}},
	}
	b.ResetTimer()
	for i := range b.N {
		for j := range contenders {
			c := contenders[(i+j)%len(contenders)]
			dropCaches(b)
			c.sum += c.run(i)
		}
	}
	b.StopTimer()
	n := float64(b.N)
	base := contenders[0].sum.Seconds()
	for _, c := range contenders {
		b.ReportMetric(c.sum.Seconds()/n, c.name+"-s/op")
		if c != contenders[0] {
			b.ReportMetric(c.sum.Seconds()/base, c.name+"/overlayfs")
		}
	}
}

// BenchmarkPrepare measures Prepare+Mounts of a container snapshot (the
// shim's path: nothing is mounted or formatted) over a 5-layer image of about
// 1 MiB and over one of about 1 GiB, alternately, and the bytes a Prepare writes.
func BenchmarkPrepare(b *testing.B) {
	requireHost(b)
	dir := b.TempDir()
	h := newHarness(b, dir)
	sn := h.newSnapshotter(func(c *config.Config) { c.DefaultWritableSize = "2GiB" })

	// Two images: five layers each; the large one has a 1 GiB file in its base.
	makeImage := func(prefix string, baseBytes int64) string {
		parent := ""
		for l := range 5 {
			key := fmt.Sprintf("%s-extract%d", prefix, l)
			mounts, err := sn.Prepare(h.ctx, key, parent)
			if err != nil {
				b.Fatal(err)
			}
			h.withMounted(mounts, func(root string) {
				size := int64(200 << 10)
				if l == 0 {
					size = baseBytes
				}
				writeFile(b, filepath.Join(root, fmt.Sprintf("layer%d", l)), size)
			})
			name := fmt.Sprintf("%s-layer%d", prefix, l)
			if err := sn.Commit(h.ctx, name, key); err != nil {
				b.Fatal(err)
			}
			parent = name
		}
		return parent
	}
	small := makeImage("small", 200<<10)
	large := makeImage("large", 1<<30)
	b.Logf("images: small %.1f MiB, large %.1f MiB", imageMiB(b, h, sn, small), imageMiB(b, h, sn, large))

	const rounds = 200
	var smallT, largeT []time.Duration
	var wchar, wbytes int64
	b.ResetTimer()
	for i := range b.N {
		for r := range rounds {
			for _, img := range []string{small, large} {
				key := fmt.Sprintf("ctr-%d-%d-%s", i, r, img)
				c0, w0 := procIO(b)
				start := time.Now()
				if _, err := sn.Prepare(h.ctx, key, img); err != nil {
					b.Fatal(err)
				}
				if _, err := sn.Mounts(h.ctx, key); err != nil {
					b.Fatal(err)
				}
				d := time.Since(start)
				c1, w1 := procIO(b)
				wchar += c1 - c0
				wbytes += w1 - w0
				if img == small {
					smallT = append(smallT, d)
				} else {
					largeT = append(largeT, d)
				}
			}
		}
		b.StopTimer()
		for r := range rounds {
			for _, img := range []string{small, large} {
				if err := sn.Remove(h.ctx, fmt.Sprintf("ctr-%d-%d-%s", i, r, img)); err != nil {
					b.Fatal(err)
				}
			}
		}
		b.StartTimer()
	}
	b.StopTimer()
	ms, ml := median(smallT), median(largeT)
	prepares := float64(len(smallT) + len(largeT))
	b.ReportMetric(float64(ms.Microseconds())/1000, "median-ms(1MiB)")
	b.ReportMetric(float64(ml.Microseconds())/1000, "median-ms(1GiB)")
	b.ReportMetric(float64(ml)/float64(ms), "1GiB/1MiB")
	b.ReportMetric(float64(wchar)/prepares, "written-B/prepare")
	b.ReportMetric(float64(wbytes)/prepares, "disk-B/prepare")
}

func imageMiB(b *testing.B, h *harness, sn *Snapshotter, top string) float64 {
	var total int64
	for name := top; name != ""; {
		info, err := sn.Stat(h.ctx, name)
		if err != nil {
			b.Fatal(err)
		}
		u, err := sn.Usage(h.ctx, name)
		if err != nil {
			b.Fatal(err)
		}
		total += u.Size
		name = info.Parent
	}
	return float64(total) / (1 << 20)
}

func writeFile(b *testing.B, p string, size int64) {
	f, err := os.Create(p)
	if err != nil {
		b.Fatal(err)
	}
	defer f.Close()
	buf := make([]byte, 1<<20)
	for i := range buf {
		buf[i] = byte(i * 7)
	}
	for size > 0 {
		n := min(size, int64(len(buf)))
		if _, err := f.Write(buf[:n]); err != nil {
			b.Fatal(err)
		}
		size -= n
	}
}

func median(ds []time.Duration) time.Duration {
	s := slices.Clone(ds)
	slices.Sort(s)
	return s[len(s)/2]
}

// procIO returns this process's wchar (bytes passed to write-like syscalls) and
// write_bytes (bytes it caused to be written to storage) from /proc/self/io.
func procIO(b *testing.B) (wchar, writeBytes int64) {
	f, err := os.Open("/proc/self/io")
	if err != nil {
		b.Fatal(err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		k, v, _ := strings.Cut(sc.Text(), ": ")
		n, _ := strconv.ParseInt(v, 10, 64)
		switch k {
		case "wchar":
			wchar = n
		case "write_bytes":
			writeBytes = n
		}
	}
	return wchar, writeBytes
}

// dropCaches writes back dirty pages and drops clean ones so each run starts cold.
func dropCaches(b testing.TB) {
	if err := syncAll(); err != nil {
		b.Fatal(err)
	}
	os.WriteFile("/proc/sys/vm/drop_caches", []byte("3"), 0)
}

func syncAll() error {
	unix.Sync()
	return nil
}
