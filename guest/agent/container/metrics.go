package container

import (
	"bytes"
	"errors"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"
	"unicode"
	"unicode/utf8"
	"unsafe"

	"github.com/containerd/cgroups/v3/cgroup2/stats"
	"golang.org/x/sys/unix"
)

// metricsReader reads a cgroup v2 group's metrics: the same stats.Metrics, field by
// field, as cgroups' cgroup2.Manager.Stat, at a fraction of its cost. containerd asks
// every container for its metrics every second or so, and under TCG each of Stat's ~20
// opens of a cgroup file (a kernfs open allocates a seq_file, the Go runtime registers
// the file with its poller and removes it again) costs more than the read itself. The
// reader opens each file once and re-reads it with pread at offset 0, which makes kernfs
// regenerate the content; files the kernel does not offer stay absent, as they read for
// Stat. It parses the content in place, without a string or a map per line: under TCG
// every instruction of the agent's is emulated, and Stat's way of splitting lines was
// most of a call's user-space work (docs/guest.md, "Stats calls").
type metricsReader struct {
	dir   string
	names []string // metricsFile → the file's name in dir

	mu     sync.Mutex
	fds    []int       // metricsFile → its open fd, or -1
	absent []time.Time // metricsFile → when it was last looked up and not found
	buf    []byte
	closed bool
	now    func() time.Time
}

// absentRetry is how long a file that was not found reads as absent before it is looked
// up again. Most absent files stay so (a file this kernel does not have, such as 6.1's
// memory.swap.peak, or a controller no one enables), and under TCG a failed lookup
// through the group's path costs every call a few thousand emulated instructions; a file
// that appears (a controller enabled later, pressure files shown again through
// cgroup.pressure) is read within this much time, as containerd's collector or the
// kubelet, every 1 to 10 s, would see it a sample later.
const absentRetry = 10 * time.Second

// metricsFile indexes a reader's files.
type metricsFile int

const (
	pidsCurrent metricsFile = iota
	pidsMax
	cpuStat
	cpuPressure
	memoryStat
	memoryCurrent
	memoryMax
	memoryPeak
	memorySwapCurrent
	memorySwapMax
	memorySwapPeak
	memoryPressure
	memoryEvents
	ioStat
	ioPressure
	rdmaCurrent
	rdmaMax
	// hugetlbFiles is the first of three files per huge page size (hugePageSizes):
	// hugetlb.SIZE.max, .current and .events.
	hugetlbFiles
)

var metricsFileNames = [hugetlbFiles]string{
	pidsCurrent:       "pids.current",
	pidsMax:           "pids.max",
	cpuStat:           "cpu.stat",
	cpuPressure:       "cpu.pressure",
	memoryStat:        "memory.stat",
	memoryCurrent:     "memory.current",
	memoryMax:         "memory.max",
	memoryPeak:        "memory.peak",
	memorySwapCurrent: "memory.swap.current",
	memorySwapMax:     "memory.swap.max",
	memorySwapPeak:    "memory.swap.peak",
	memoryPressure:    "memory.pressure",
	memoryEvents:      "memory.events",
	ioStat:            "io.stat",
	ioPressure:        "io.pressure",
	rdmaCurrent:       "rdma.current",
	rdmaMax:           "rdma.max",
}

func newMetricsReader(dir string) *metricsReader {
	names := append([]string(nil), metricsFileNames[:]...)
	for _, size := range hugePageSizes() {
		names = append(names, "hugetlb."+size+".max", "hugetlb."+size+".current", "hugetlb."+size+".events")
	}
	fds := make([]int, len(names))
	for i := range fds {
		fds[i] = -1
	}
	return &metricsReader{dir: dir, names: names, fds: fds, absent: make([]time.Time, len(names)), buf: make([]byte, 8192), now: time.Now}
}

func (r *metricsReader) path(f metricsFile) string { return filepath.Join(r.dir, r.names[f]) }

// read returns the content of the group's file f, valid until the next read. A file
// that does not exist reads as absent, without a lookup, for absentRetry; one whose
// controller went away (ENODEV from kernfs) is closed and looked up again.
func (r *metricsReader) read(f metricsFile) ([]byte, error) {
	for retry := true; ; retry = false {
		fd := r.fds[f]
		if fd < 0 {
			path := r.path(f)
			if t := r.absent[f]; !t.IsZero() && r.now().Sub(t) < absentRetry {
				return nil, &os.PathError{Op: "open", Path: path, Err: unix.ENOENT}
			}
			var err error
			fd, err = unix.Open(path, unix.O_RDONLY|unix.O_CLOEXEC, 0)
			if err != nil {
				if err == unix.ENOENT {
					r.absent[f] = r.now()
				}
				return nil, &os.PathError{Op: "open", Path: path, Err: err}
			}
			r.fds[f] = fd
			r.absent[f] = time.Time{}
		}
		n, err := rawPread(fd, r.buf)
		switch {
		case errors.Is(err, unix.ENODEV) && retry:
			unix.Close(fd)
			r.fds[f] = -1
			continue
		case err != nil:
			return nil, &os.PathError{Op: "read", Path: r.path(f), Err: err}
		case n == len(r.buf):
			// The content may go on: read it again, whole, into a larger buffer.
			r.buf = make([]byte, 2*len(r.buf))
			continue
		}
		return r.buf[:n], nil
	}
}

// rawPread reads fd from offset 0 into buf without the Go runtime's syscall bookkeeping:
// entering a syscall wakes the runtime's sysmon thread while every P is idle, and each of
// its polls then costs an idle guest a timer interrupt and two context switches under TCG
// (internal/transport's rawPort says more). A cgroup file's read does not block: the
// kernel generates its content and returns.
func rawPread(fd int, buf []byte) (int, error) {
	for {
		n, _, errno := unix.RawSyscall6(unix.SYS_PREAD64, uintptr(fd), uintptr(unsafe.Pointer(&buf[0])), uintptr(len(buf)), 0, 0, 0)
		switch errno {
		case 0:
			return int(n), nil
		case unix.EINTR:
			continue
		}
		return 0, errno
	}
}

// close closes the group's files; the reader reads nothing after.
func (r *metricsReader) close() {
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, fd := range r.fds {
		if fd >= 0 {
			unix.Close(fd)
		}
	}
	r.fds = nil
	r.closed = true
}

// metrics reads every controller's statistics, as cgroup2.Manager.Stat does.
func (r *metricsReader) metrics() (*stats.Metrics, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.closed {
		return nil, fmt.Errorf("cgroup %s: metrics reader closed", r.dir)
	}
	var m stats.Metrics
	m.Pids = &stats.PidsStat{Current: r.uint(pidsCurrent), Limit: r.uint(pidsMax)}

	cpu := &stats.CPUStat{}
	ok, _, err := r.eachKV(cpuStat, func(k []byte, v uint64) {
		switch string(k) {
		case "usage_usec":
			cpu.UsageUsec = v
		case "user_usec":
			cpu.UserUsec = v
		case "system_usec":
			cpu.SystemUsec = v
		case "nr_periods":
			cpu.NrPeriods = v
		case "nr_throttled":
			cpu.NrThrottled = v
		case "throttled_usec":
			cpu.ThrottledUsec = v
		case "nr_bursts":
			cpu.NrBursts = v
		case "burst_usec":
			cpu.BurstUsec = v
		}
	})
	if err != nil {
		return nil, err
	}
	if ok {
		cpu.PSI = r.psi(cpuPressure)
	}
	m.CPU = cpu

	mem := &stats.MemoryStat{}
	ok, _, err = r.eachKV(memoryStat, func(k []byte, v uint64) { setMemoryStat(mem, k, v) })
	if err != nil {
		return nil, err
	}
	if ok {
		mem.Usage = r.uint(memoryCurrent)
		mem.UsageLimit = r.uint(memoryMax)
		mem.MaxUsage = r.uint(memoryPeak)
		mem.SwapUsage = r.uint(memorySwapCurrent)
		mem.SwapLimit = r.uint(memorySwapMax)
		mem.SwapMaxUsage = r.uint(memorySwapPeak)
		mem.PSI = r.psi(memoryPressure)
	}
	m.Memory = mem

	events := &stats.MemoryEvents{}
	_, n, err := r.eachKV(memoryEvents, func(k []byte, v uint64) {
		switch string(k) {
		case "low":
			events.Low = v
		case "high":
			events.High = v
		case "max":
			events.Max = v
		case "oom":
			events.Oom = v
		case "oom_kill":
			events.OomKill = v
		case "oom_group_kill":
			events.OomGroupKill = v
		}
	})
	if err != nil {
		return nil, err
	}
	if n > 0 {
		m.MemoryEvents = events
	}

	m.Io = &stats.IOStat{Usage: r.io(), PSI: r.psi(ioPressure)}
	m.Rdma = &stats.RdmaStat{Current: r.rdma(rdmaCurrent), Limit: r.rdma(rdmaMax)}

	sizes := hugePageSizes()
	m.Hugetlb = make([]*stats.HugeTlbStat, len(sizes))
	for i, size := range sizes {
		f := hugetlbFiles + metricsFile(3*i)
		m.Hugetlb[i] = &stats.HugeTlbStat{
			Max:      r.uint(f),
			Current:  r.uint(f + 1),
			Pagesize: size,
			Failcnt:  r.kvValue(f+2, "max"),
		}
	}
	return &m, nil
}

// setMemoryStat sets the field of memory.stat's key k; keys Stat does not report are
// left out.
func setMemoryStat(m *stats.MemoryStat, k []byte, v uint64) {
	switch string(k) {
	case "anon":
		m.Anon = v
	case "file":
		m.File = v
	case "kernel_stack":
		m.KernelStack = v
	case "slab":
		m.Slab = v
	case "sock":
		m.Sock = v
	case "shmem":
		m.Shmem = v
	case "file_mapped":
		m.FileMapped = v
	case "file_dirty":
		m.FileDirty = v
	case "file_writeback":
		m.FileWriteback = v
	case "anon_thp":
		m.AnonThp = v
	case "inactive_anon":
		m.InactiveAnon = v
	case "active_anon":
		m.ActiveAnon = v
	case "inactive_file":
		m.InactiveFile = v
	case "active_file":
		m.ActiveFile = v
	case "unevictable":
		m.Unevictable = v
	case "slab_reclaimable":
		m.SlabReclaimable = v
	case "slab_unreclaimable":
		m.SlabUnreclaimable = v
	case "pgfault":
		m.Pgfault = v
	case "pgmajfault":
		m.Pgmajfault = v
	case "workingset_refault":
		m.WorkingsetRefault = v
	case "workingset_activate":
		m.WorkingsetActivate = v
	case "workingset_nodereclaim":
		m.WorkingsetNodereclaim = v
	case "pgrefill":
		m.Pgrefill = v
	case "pgscan":
		m.Pgscan = v
	case "pgsteal":
		m.Pgsteal = v
	case "pgactivate":
		m.Pgactivate = v
	case "pgdeactivate":
		m.Pgdeactivate = v
	case "pglazyfree":
		m.Pglazyfree = v
	case "pglazyfreed":
		m.Pglazyfreed = v
	case "thp_fault_alloc":
		m.ThpFaultAlloc = v
	case "thp_collapse_alloc":
		m.ThpCollapseAlloc = v
	}
}

// uint reads a one-value file: 0 when it is absent or unreadable, MaxUint64 for "max".
func (r *metricsReader) uint(f metricsFile) uint64 {
	b, err := r.read(f)
	if err != nil {
		return 0
	}
	// Stat reads at most 32 bytes of a one-value file.
	if len(b) > 32 {
		b = b[:32]
	}
	b = bytes.TrimSpace(b)
	if string(b) == "max" {
		return math.MaxUint64
	}
	v, _ := parseUint(b)
	return v
}

// eachKV calls fn with each line of a file of "key value" lines, and says whether the
// file exists and how many lines it had; a malformed line is an error, as for Stat.
func (r *metricsReader) eachKV(f metricsFile, fn func(k []byte, v uint64)) (bool, int, error) {
	b, err := r.read(f)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return false, 0, nil
		}
		return false, 0, err
	}
	n := 0
	for line := range lines(b) {
		k, v, err := parseKV(line)
		if err != nil {
			return false, 0, fmt.Errorf("error while parsing %s (line=%q): %w", r.path(f), line, err)
		}
		fn(k, v)
		n++
	}
	return true, n, nil
}

// kvValue is one key's value in a file of "key value" lines, 0 if absent.
func (r *metricsReader) kvValue(f metricsFile, key string) uint64 {
	b, err := r.read(f)
	if err != nil {
		return 0
	}
	for line := range lines(b) {
		k, v, err := parseKV(line)
		if string(k) == key {
			if err != nil {
				return 0
			}
			return v
		}
	}
	return 0
}

// psi reads a pressure file; nil if absent or malformed, as Stat reports it.
func (r *metricsReader) psi(f metricsFile) *stats.PSIStats {
	b, err := r.read(f)
	if err != nil {
		return nil
	}
	p := &stats.PSIStats{}
	for line := range lines(b) {
		kind, rest := nextField(line)
		var d *stats.PSIData
		switch string(kind) {
		case "some":
			p.Some = &stats.PSIData{}
			d = p.Some
		case "full":
			p.Full = &stats.PSIData{}
			d = p.Full
		}
		if d == nil {
			continue
		}
		for {
			var kv []byte
			if kv, rest = nextField(rest); len(kv) == 0 {
				break
			}
			k, v, ok := bytes.Cut(kv, []byte{'='})
			if !ok {
				return nil
			}
			var err error
			switch string(k) {
			case "avg10":
				d.Avg10, err = parseAverage(v)
			case "avg60":
				d.Avg60, err = parseAverage(v)
			case "avg300":
				d.Avg300, err = parseAverage(v)
			case "total":
				d.Total, err = parseDecimal(v, 64)
			}
			if err != nil {
				return nil
			}
		}
	}
	return p
}

// io reads io.stat: one entry per device, as Stat does (which splits lines at single
// spaces, not at runs of white space).
func (r *metricsReader) io() []*stats.IOEntry {
	var usage []*stats.IOEntry
	b, err := r.read(ioStat)
	if err != nil {
		return usage
	}
	for len(b) > 0 {
		var line []byte
		line, b, _ = bytes.Cut(b, []byte{'\n'})
		dev, kvs, ok := bytes.Cut(line, []byte{' '})
		if !ok {
			continue
		}
		maj, min, ok := bytes.Cut(dev, []byte{':'})
		if !ok || bytes.IndexByte(min, ':') >= 0 {
			continue
		}
		major, err := parseDecimal(maj, 64)
		if err != nil {
			return usage
		}
		minor, err := parseDecimal(min, 64)
		if err != nil {
			return usage
		}
		e := &stats.IOEntry{Major: major, Minor: minor}
		for more := true; more; {
			var kv []byte
			kv, kvs, more = bytes.Cut(kvs, []byte{' '})
			k, v, ok := bytes.Cut(kv, []byte{'='})
			if !ok || bytes.IndexByte(v, '=') >= 0 {
				continue
			}
			n, err := parseDecimal(v, 64)
			if err != nil {
				continue
			}
			switch string(k) {
			case "rbytes":
				e.Rbytes = n
			case "wbytes":
				e.Wbytes = n
			case "rios":
				e.Rios = n
			case "wios":
				e.Wios = n
			}
		}
		usage = append(usage, e)
	}
	return usage
}

// rdma reads rdma.current or rdma.max: "device hca_handle=N hca_object=N" lines.
func (r *metricsReader) rdma(f metricsFile) []*stats.RdmaEntry {
	b, err := r.read(f)
	if err != nil {
		return []*stats.RdmaEntry{}
	}
	var entries []*stats.RdmaEntry
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) != 3 {
			continue
		}
		e := &stats.RdmaEntry{Device: f[0]}
		for _, kv := range f[1:] {
			k, v, ok := strings.Cut(kv, "=")
			if !ok {
				continue
			}
			var n uint64 = math.MaxUint32
			if v != "max" {
				var err error
				if n, err = parseUintBits([]byte(v), 32); err != nil {
					continue
				}
			}
			switch k {
			case "hca_handle":
				e.HcaHandles = uint32(n)
			case "hca_object":
				e.HcaObjects = uint32(n)
			}
		}
		entries = append(entries, e)
	}
	return entries
}

// lines yields b's lines, without their newline, as a bufio.Scanner does.
func lines(b []byte) func(func([]byte) bool) {
	return func(yield func([]byte) bool) {
		for len(b) > 0 {
			line, rest, _ := bytes.Cut(b, []byte{'\n'})
			b = rest
			if !yield(bytes.TrimSuffix(line, []byte{'\r'})) {
				return
			}
		}
	}
}

// nextField returns s's first field and what follows it, splitting at white space as
// strings.Fields does; an empty field when s has none.
func nextField(s []byte) (field, rest []byte) {
	i := 0
	for ; i < len(s); i++ {
		if s[i] >= utf8.RuneSelf {
			return nextFieldUnicode(s)
		}
		if !asciiSpace[s[i]] {
			break
		}
	}
	j := i
	for ; j < len(s); j++ {
		if s[j] >= utf8.RuneSelf {
			return nextFieldUnicode(s)
		}
		if asciiSpace[s[j]] {
			break
		}
	}
	return s[i:j], s[j:]
}

// asciiSpace are the ASCII bytes unicode.IsSpace is true for, as in strings.Fields.
var asciiSpace = [utf8.RuneSelf]bool{'\t': true, '\n': true, '\v': true, '\f': true, '\r': true, ' ': true}

// nextFieldUnicode is nextField for text that is not all ASCII.
func nextFieldUnicode(s []byte) (field, rest []byte) {
	isSpace := func(i int) (bool, int) {
		r, n := utf8.DecodeRune(s[i:])
		return unicode.IsSpace(r), n
	}
	i := 0
	for i < len(s) {
		space, n := isSpace(i)
		if !space {
			break
		}
		i += n
	}
	j := i
	for j < len(s) {
		space, n := isSpace(j)
		if space {
			break
		}
		j += n
	}
	return s[i:j], s[j:]
}

// cgroupRoot is where the guest mounts cgroup v2, as cgroup2.Load assumes.
const cgroupRoot = "/sys/fs/cgroup"

var errInvalidFormat = errors.New("cgroups: parsing file with invalid format failed")

// parseKV splits a "key value" line: exactly two fields, the value a counter.
func parseKV(line []byte) ([]byte, uint64, error) {
	// What the kernel writes, a key, one space and up to 19 digits, in one pass.
	if sp := bytes.IndexByte(line, ' '); sp > 0 && len(line)-sp-1 <= 19 {
		k, v := line[:sp], line[sp+1:]
		if n, ok := plainDecimal(v); ok && plainKey(k) {
			return k, n, nil
		}
	}
	k, rest := nextField(line)
	v, rest := nextField(rest)
	if extra, _ := nextField(rest); len(k) == 0 || len(v) == 0 || len(extra) > 0 {
		return nil, 0, errInvalidFormat
	}
	n, err := parseUint(v)
	return k, n, err
}

// parseUint parses a cgroup counter; a negative one (the kernel prints -1 for some
// unset values) is 0.
func parseUint(s []byte) (uint64, error) {
	return parseUintBits(s, 64)
}

func parseUintBits(s []byte, bits int) (uint64, error) {
	v, err := parseDecimal(s, bits)
	if err == nil {
		return v, nil
	}
	i, ierr := strconv.ParseInt(string(s), 10, bits)
	if ierr == nil && i < 0 || ierr != nil && errors.Is(ierr, strconv.ErrRange) && i < 0 {
		return 0, nil
	}
	return 0, err
}

// plainKey says whether k is printable ASCII without white space.
func plainKey(k []byte) bool {
	for _, c := range k {
		if c <= ' ' || c >= utf8.RuneSelf {
			return false
		}
	}
	return true
}

// plainDecimal parses 1 to 19 digits, nothing else.
func plainDecimal(s []byte) (uint64, bool) {
	if len(s) == 0 || len(s) > 19 {
		return 0, false
	}
	var v uint64
	for _, c := range s {
		if c < '0' || c > '9' {
			return 0, false
		}
		v = v*10 + uint64(c-'0')
	}
	return v, true
}

// parseDecimal is strconv.ParseUint(s, 10, bits) without converting s to a string
// when s is what the kernel writes: up to 19 digits.
func parseDecimal(s []byte, bits int) (uint64, error) {
	v, ok := plainDecimal(s)
	if !ok || bits < 64 && v >= 1<<bits {
		return strconv.ParseUint(string(s), 10, bits)
	}
	return v, nil
}

// parseAverage is strconv.ParseFloat(s, 64) for a pressure average, which the kernel
// writes with two decimals: N/100, correctly rounded, is the same float64 as
// ParseFloat's for N below 2^53.
func parseAverage(s []byte) (float64, error) {
	dot := len(s) - 3
	if dot < 1 || dot > 13 || s[dot] != '.' {
		return strconv.ParseFloat(string(s), 64)
	}
	n, err := parseDecimal(s[:dot], 64)
	if err != nil {
		return strconv.ParseFloat(string(s), 64)
	}
	frac, err := parseDecimal(s[dot+1:], 64)
	if err != nil {
		return strconv.ParseFloat(string(s), 64)
	}
	return float64(n*100+frac) / 100, nil
}

var hugePageSizes = sync.OnceValue(func() []string {
	// The sizes in the names of hugetlb's files, in the order cgroups' Stat lists them
	// (the directory's): hugepages-2048kB is 2MB.
	d, err := os.Open("/sys/kernel/mm/hugepages")
	if err != nil {
		return nil
	}
	defer d.Close()
	names, err := d.Readdirnames(0)
	if err != nil {
		return nil
	}
	var sizes []string
	for _, n := range names {
		v, ok := strings.CutPrefix(n, "hugepages-")
		if !ok {
			continue
		}
		v, ok = strings.CutSuffix(v, "kB")
		if !ok {
			continue
		}
		kb, err := strconv.Atoi(v)
		if err != nil {
			continue
		}
		switch {
		case kb >= 1<<20:
			v = strconv.Itoa(kb>>20) + "GB"
		case kb >= 1<<10:
			v = strconv.Itoa(kb>>10) + "MB"
		default:
			v += "KB"
		}
		sizes = append(sizes, v)
	}
	return sizes
})
