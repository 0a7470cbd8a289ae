package container

import (
	"io"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/containerd/cgroups/v3/cgroup2"
	"github.com/sirupsen/logrus"
	"golang.org/x/sys/unix"
	"google.golang.org/protobuf/encoding/prototext"
	"google.golang.org/protobuf/proto"
)

// A cgroup v2 group's files as the guest kernel writes them, and odd ones: the reader
// must return what cgroup2.Manager.Stat returns for the same directory, field by field.
func TestMetricsMatchStat(t *testing.T) {
	full := map[string]string{
		"pids.current":        "3\n",
		"pids.max":            "max\n",
		"cpu.stat":            "usage_usec 123456\nuser_usec 100000\nsystem_usec 23456\ncore_sched.force_idle_usec 0\nnr_periods 10\nnr_throttled 2\nthrottled_usec 5000\nnr_bursts 1\nburst_usec 7\n",
		"cpu.pressure":        "some avg10=0.12 avg60=1.50 avg300=0.00 total=123456\nfull avg10=0.00 avg60=0.00 avg300=0.00 total=42\n",
		"memory.stat":         "anon 1048576\nfile 2097152\nkernel 12288\nkernel_stack 16384\npagetables 4096\nsec_pagetables 0\npercpu 0\nsock 0\nvmalloc 0\nshmem 4096\nfile_mapped 8192\nfile_dirty 0\nfile_writeback 0\nswapcached 0\nanon_thp 0\nfile_thp 0\nshmem_thp 0\ninactive_anon 1040384\nactive_anon 12288\ninactive_file 2000000\nactive_file 97152\nunevictable 0\nslab_reclaimable 1000\nslab_unreclaimable 2000\nslab 3000\nworkingset_refault_anon 0\nworkingset_refault_file 5\nworkingset_activate_anon 0\nworkingset_activate_file 1\nworkingset_restore_anon 0\nworkingset_restore_file 0\nworkingset_nodereclaim 0\npgscan 0\npgsteal 0\npgscan_kswapd 0\npgfault 900\npgmajfault 3\npgrefill 0\npgactivate 4\npgdeactivate 0\npglazyfree 0\npglazyfreed 0\nthp_fault_alloc 0\nthp_collapse_alloc 0\n",
		"memory.current":      "3145728\n",
		"memory.max":          "67108864\n",
		"memory.peak":         "4194304\n",
		"memory.swap.current": "0\n",
		"memory.swap.max":     "max\n",
		"memory.pressure":     "some avg10=0.00 avg60=0.00 avg300=0.00 total=0\nfull avg10=0.00 avg60=0.00 avg300=0.00 total=0\n",
		"memory.events":       "low 0\nhigh 0\nmax 4\noom 1\noom_kill 1\noom_group_kill 0\n",
		"io.stat":             "254:0 rbytes=4096 wbytes=0 rios=1 wios=0 dbytes=0 dios=0\n259:1 rbytes=1 wbytes=2 rios=3 wios=4 dbytes=5 dios=6\n",
		"io.pressure":         "some avg10=0.00 avg60=0.00 avg300=0.00 total=17\nfull avg10=0.00 avg60=0.00 avg300=0.00 total=9\n",
		"rdma.current":        "mlx4_0 hca_handle=2 hca_object=2000\n",
		"rdma.max":            "mlx4_0 hca_handle=max hca_object=max\nbad line\n",
	}
	for _, size := range hugePageSizes() {
		full["hugetlb."+size+".max"] = "max\n"
		full["hugetlb."+size+".current"] = "2097152\n"
		full["hugetlb."+size+".events"] = "max 3\n"
	}
	without := func(names ...string) map[string]string {
		m := map[string]string{}
		for k, v := range full {
			m[k] = v
		}
		for _, n := range names {
			delete(m, n)
		}
		return m
	}
	with := func(files map[string]string) map[string]string {
		m := without()
		for k, v := range files {
			m[k] = v
		}
		return m
	}
	for _, tc := range []struct {
		name    string
		files   map[string]string
		wantErr bool
	}{
		{name: "full", files: full},
		{name: "empty directory", files: map[string]string{}},
		{name: "no cpu.stat", files: without("cpu.stat")},
		{name: "no memory.stat", files: without("memory.stat")},
		{name: "no memory.events", files: without("memory.events")},
		{name: "no pressure", files: without("cpu.pressure", "memory.pressure", "io.pressure")},
		{name: "no io, no rdma", files: without("io.stat", "rdma.current", "rdma.max")},
		{name: "negative and unparsable values", files: with(map[string]string{"pids.current": "-1\n", "memory.max": "lots\n", "memory.peak": "\n"})},
		{name: "value longer than 32 bytes", files: with(map[string]string{"memory.current": "123456789012345678901234567890123456789\n"})},
		{name: "io.stat oddities", files: with(map[string]string{"io.stat": "254:0 rbytes=x wbytes=1=2 rios=3\nbad\n1:2:3 rbytes=1\n7:x rbytes=1\n"})},
		{name: "malformed pressure", files: with(map[string]string{"cpu.pressure": "some avg10=x\n", "io.pressure": "some avg10=0.1 junk\n"})},
		{name: "events without max", files: with(func() map[string]string {
			m := map[string]string{}
			for _, size := range hugePageSizes() {
				m["hugetlb."+size+".events"] = "other 3\n"
			}
			return m
		}())},
		{name: "malformed cpu.stat", files: with(map[string]string{"cpu.stat": "usage_usec 1 2\n"}), wantErr: true},
		{name: "memory.stat value with a sign", files: with(map[string]string{"memory.stat": "file +5\n"}), wantErr: true},
		{name: "memory.stat value with an underscore", files: with(map[string]string{"memory.stat": "sock 1_000\n"}), wantErr: true},
		{name: "memory.stat value out of range", files: with(map[string]string{"memory.stat": "shmem 99999999999999999999\n"}), wantErr: true},
		{name: "empty line in cpu.stat", files: with(map[string]string{"cpu.stat": "usage_usec 1\n\nuser_usec 2\n"}), wantErr: true},
		{name: "malformed memory.events", files: with(map[string]string{"memory.events": "oom x\n"}), wantErr: true},
		{name: "white space and number oddities", files: with(map[string]string{
			"cpu.stat":        "  usage_usec\t123 \r\nuser_usec  18446744073709551615\n\u00a0system_usec\u00a07\nnr_periods 00042\nnr_bursts -1\n",
			"memory.stat":     "anon 12345678901234567890\nfile 5\nsock -3\n",
			"memory.events":   "max 3\nmax 4\n",
			"memory.current":  "  42 \n",
			"cpu.pressure":    "some avg10=1.5 avg60=12.345 avg300=99999999999999.99 total=7\nfull\tavg10=0.10  avg60=-0.50 avg300=1e2 total=0\n",
			"memory.pressure": "some avg10=0.01 avg60=0.00 avg300=0.00 total=-1\n",
			"io.stat":         "254:0  rbytes=1 wbytes=2\n254:1 rbytes=18446744073709551616 wios=\u0661\n",
			"rdma.max":        "mlx4_0 hca_handle=4294967296 hca_object=4294967295\n",
		})},
		{name: "long memory.stat", files: with(map[string]string{"memory.stat": full["memory.stat"] + repeatKV(1000)})},
	} {
		t.Run(tc.name, func(t *testing.T) {
			root := t.TempDir()
			dir := filepath.Join(root, "pod", "ctr")
			if err := os.MkdirAll(dir, 0o755); err != nil {
				t.Fatal(err)
			}
			for name, content := range tc.files {
				if err := os.WriteFile(filepath.Join(dir, name), []byte(content), 0o644); err != nil {
					t.Fatal(err)
				}
			}
			compareWithStat(t, root, "/pod/ctr", tc.wantErr)
		})
	}
}

// A file that was not there reads as absent, without a lookup, until absentRetry has
// passed; then it is found.
func TestMetricsAbsentFileLookedUpAgain(t *testing.T) {
	dir := t.TempDir()
	write := func(name, content string) {
		t.Helper()
		if err := os.WriteFile(filepath.Join(dir, name), []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	write("memory.stat", "anon 1\n")
	r := newMetricsReader(dir)
	defer r.close()
	now := time.Unix(1000, 0)
	r.now = func() time.Time { return now }
	swapPeak := func() uint64 {
		t.Helper()
		m, err := r.metrics()
		if err != nil {
			t.Fatal(err)
		}
		return m.GetMemory().GetSwapMaxUsage()
	}

	if got := swapPeak(); got != 0 {
		t.Fatalf("swap peak %d before the file exists", got)
	}
	write("memory.swap.peak", "42\n")
	for _, tc := range []struct {
		after time.Duration
		want  uint64
	}{
		{0, 0},
		{absentRetry - time.Millisecond, 0},
		{absentRetry, 42},
		{absentRetry + time.Second, 42},
	} {
		now = time.Unix(1000, 0).Add(tc.after)
		if got := swapPeak(); got != tc.want {
			t.Errorf("%v after the lookup that failed: swap peak %d, want %d", tc.after, got, tc.want)
		}
	}
}

func repeatKV(n int) string {
	var b []byte
	for i := range n {
		b = append(b, []byte("extra_counter_"+string(rune('a'+i%26))+" 1\n")...)
	}
	return string(b)
}

// compareWithStat reads group under mountpoint with the reader, twice (the second from
// the files it keeps open), and with cgroup2's Stat.
func compareWithStat(t *testing.T, mountpoint, group string, wantErr bool) {
	t.Helper()
	m, err := cgroup2.Load(group, cgroup2.WithMountpoint(mountpoint))
	if err != nil {
		t.Fatal(err)
	}
	want, wantStatErr := m.Stat()
	r := newMetricsReader(filepath.Join(mountpoint, group))
	defer r.close()
	for i := range 2 {
		got, err := r.metrics()
		if (err != nil) != wantErr || (wantStatErr != nil) != wantErr {
			t.Fatalf("read %d: error %v, Stat's %v, want an error: %v", i, err, wantStatErr, wantErr)
		}
		if !proto.Equal(got, want) {
			t.Errorf("read %d:\n%s\nStat:\n%s", i, prototext.Format(got), prototext.Format(want))
		}
	}
}

// The same on a real cgroup v2 group, whose files kernfs regenerates on every read at
// offset 0; and the reader's files are closed with it.
func TestMetricsMatchStatCgroup2(t *testing.T) {
	if os.Getuid() != 0 {
		t.Skip("needs root to create a cgroup")
	}
	var mountpoint string
	for _, p := range []string{"/sys/fs/cgroup", "/sys/fs/cgroup/unified"} {
		var st unix.Statfs_t
		if unix.Statfs(p, &st) == nil && st.Type == unix.CGROUP2_SUPER_MAGIC {
			mountpoint = p
			break
		}
	}
	if mountpoint == "" {
		t.Skip("no cgroup v2 hierarchy")
	}
	group := "/caisson-metrics-test-" + filepath.Base(t.TempDir())
	if err := os.Mkdir(filepath.Join(mountpoint, group), 0o755); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.Remove(filepath.Join(mountpoint, group)) })
	// An empty group's counters stay as they are between the two reads.
	compareWithStat(t, mountpoint, group, false)

	r := newMetricsReader(filepath.Join(mountpoint, group))
	if _, err := r.metrics(); err != nil {
		t.Fatal(err)
	}
	if !slices.ContainsFunc(r.fds, func(fd int) bool { return fd >= 0 }) {
		t.Fatal("the reader kept no file open")
	}
	r.close()
	if _, err := r.metrics(); err == nil {
		t.Error("a closed reader read metrics")
	}
	if err := os.Remove(filepath.Join(mountpoint, group)); err != nil {
		t.Errorf("remove the group after its reader closed: %v", err)
	}
}

// Whatever the kernel (or a file in its place) holds, the reader returns what Stat does:
// the same metrics, or an error when Stat has one.
func FuzzMetricsMatchStat(f *testing.F) {
	for _, s := range []string{
		"usage_usec 1\nuser_usec 2\n",
		"some avg10=0.12 avg60=1.50 avg300=0.00 total=123456\n",
		"254:0 rbytes=4096 wbytes=0 rios=1 wios=0\n",
		"anon\t12345678901234567890\r\nfile -1\n",
		"max\n",
		" 42 ",
	} {
		f.Add(s)
	}
	// cgroup2's Stat logs every malformed file through logrus: thousands of lines a
	// second, which slowed the fuzzing until its end came in the middle of an input.
	out := logrus.StandardLogger().Out
	logrus.SetOutput(io.Discard)
	f.Cleanup(func() { logrus.SetOutput(out) })
	f.Fuzz(func(t *testing.T, content string) {
		// Each file is read into one buffer, doubled when full: the table's long
		// memory.stat covers that, and inputs this long only make the fuzzing slow.
		if len(content) > 16<<10 {
			t.Skip("longer than 16 KiB")
		}
		root := t.TempDir()
		dir := filepath.Join(root, "pod", "ctr")
		if err := os.MkdirAll(dir, 0o755); err != nil {
			t.Fatal(err)
		}
		// One content in every kind of file: key-value, pressure, io, one value.
		for _, name := range []string{"cpu.stat", "memory.stat", "memory.events", "cpu.pressure", "io.stat", "memory.current", "rdma.current"} {
			if err := os.WriteFile(filepath.Join(dir, name), []byte(content), 0o644); err != nil {
				t.Fatal(err)
			}
		}
		m, err := cgroup2.Load("/pod/ctr", cgroup2.WithMountpoint(root))
		if err != nil {
			t.Fatal(err)
		}
		_, statErr := m.Stat()
		compareWithStat(t, root, "/pod/ctr", statErr != nil)
	})
}
