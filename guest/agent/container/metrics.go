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
// Stat.
type metricsReader struct {
	dir string

	mu     sync.Mutex
	fds    map[string]int // file name → its open fd
	buf    []byte
	closed bool
}

func newMetricsReader(dir string) *metricsReader {
	return &metricsReader{dir: dir, fds: map[string]int{}, buf: make([]byte, 8192)}
}

// read returns the content of the group's file name, valid until the next read. A file
// that does not exist is looked up again next time (a failed lookup is cheap, and a
// controller enabled later adds files); one whose controller went away (ENODEV from
// kernfs) is closed and looked up again.
func (r *metricsReader) read(name string) ([]byte, error) {
	path := filepath.Join(r.dir, name)
	for retry := true; ; retry = false {
		fd, ok := r.fds[name]
		if !ok {
			var err error
			fd, err = unix.Open(path, unix.O_RDONLY|unix.O_CLOEXEC, 0)
			if err != nil {
				return nil, &os.PathError{Op: "open", Path: path, Err: err}
			}
			r.fds[name] = fd
		}
		n, err := unix.Pread(fd, r.buf, 0)
		switch {
		case errors.Is(err, unix.ENODEV) && retry:
			unix.Close(fd)
			delete(r.fds, name)
			continue
		case err != nil:
			return nil, &os.PathError{Op: "read", Path: path, Err: err}
		case n == len(r.buf):
			// The content may go on: read it again, whole, into a larger buffer.
			r.buf = make([]byte, 2*len(r.buf))
			continue
		}
		return r.buf[:n], nil
	}
}

// close closes the group's files; the reader reads nothing after.
func (r *metricsReader) close() {
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, fd := range r.fds {
		unix.Close(fd)
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
	m.Pids = &stats.PidsStat{Current: r.uint("pids.current"), Limit: r.uint("pids.max")}

	kv := map[string]uint64{}
	ok, err := r.kv("cpu.stat", kv)
	if err != nil {
		return nil, err
	}
	m.CPU = &stats.CPUStat{}
	if ok {
		m.CPU = &stats.CPUStat{
			UsageUsec:     kv["usage_usec"],
			UserUsec:      kv["user_usec"],
			SystemUsec:    kv["system_usec"],
			NrPeriods:     kv["nr_periods"],
			NrThrottled:   kv["nr_throttled"],
			ThrottledUsec: kv["throttled_usec"],
			NrBursts:      kv["nr_bursts"],
			BurstUsec:     kv["burst_usec"],
			PSI:           r.psi("cpu.pressure"),
		}
	}

	clear(kv)
	ok, err = r.kv("memory.stat", kv)
	if err != nil {
		return nil, err
	}
	m.Memory = &stats.MemoryStat{}
	if ok {
		m.Memory = &stats.MemoryStat{
			Anon:                  kv["anon"],
			File:                  kv["file"],
			KernelStack:           kv["kernel_stack"],
			Slab:                  kv["slab"],
			Sock:                  kv["sock"],
			Shmem:                 kv["shmem"],
			FileMapped:            kv["file_mapped"],
			FileDirty:             kv["file_dirty"],
			FileWriteback:         kv["file_writeback"],
			AnonThp:               kv["anon_thp"],
			InactiveAnon:          kv["inactive_anon"],
			ActiveAnon:            kv["active_anon"],
			InactiveFile:          kv["inactive_file"],
			ActiveFile:            kv["active_file"],
			Unevictable:           kv["unevictable"],
			SlabReclaimable:       kv["slab_reclaimable"],
			SlabUnreclaimable:     kv["slab_unreclaimable"],
			Pgfault:               kv["pgfault"],
			Pgmajfault:            kv["pgmajfault"],
			WorkingsetRefault:     kv["workingset_refault"],
			WorkingsetActivate:    kv["workingset_activate"],
			WorkingsetNodereclaim: kv["workingset_nodereclaim"],
			Pgrefill:              kv["pgrefill"],
			Pgscan:                kv["pgscan"],
			Pgsteal:               kv["pgsteal"],
			Pgactivate:            kv["pgactivate"],
			Pgdeactivate:          kv["pgdeactivate"],
			Pglazyfree:            kv["pglazyfree"],
			Pglazyfreed:           kv["pglazyfreed"],
			ThpFaultAlloc:         kv["thp_fault_alloc"],
			ThpCollapseAlloc:      kv["thp_collapse_alloc"],
			Usage:                 r.uint("memory.current"),
			UsageLimit:            r.uint("memory.max"),
			MaxUsage:              r.uint("memory.peak"),
			SwapUsage:             r.uint("memory.swap.current"),
			SwapLimit:             r.uint("memory.swap.max"),
			SwapMaxUsage:          r.uint("memory.swap.peak"),
			PSI:                   r.psi("memory.pressure"),
		}
	}

	clear(kv)
	if _, err := r.kv("memory.events", kv); err != nil {
		return nil, err
	}
	if len(kv) > 0 {
		m.MemoryEvents = &stats.MemoryEvents{
			Low:          kv["low"],
			High:         kv["high"],
			Max:          kv["max"],
			Oom:          kv["oom"],
			OomKill:      kv["oom_kill"],
			OomGroupKill: kv["oom_group_kill"],
		}
	}

	m.Io = &stats.IOStat{Usage: r.io(), PSI: r.psi("io.pressure")}
	m.Rdma = &stats.RdmaStat{Current: r.rdma("rdma.current"), Limit: r.rdma("rdma.max")}

	sizes := hugePageSizes()
	m.Hugetlb = make([]*stats.HugeTlbStat, len(sizes))
	for i, size := range sizes {
		m.Hugetlb[i] = &stats.HugeTlbStat{
			Max:      r.uint("hugetlb." + size + ".max"),
			Current:  r.uint("hugetlb." + size + ".current"),
			Pagesize: size,
			Failcnt:  r.kvValue("hugetlb."+size+".events", "max"),
		}
	}
	return &m, nil
}

// uint reads a one-value file: 0 when it is absent or unreadable, MaxUint64 for "max".
func (r *metricsReader) uint(name string) uint64 {
	b, err := r.read(name)
	if err != nil {
		return 0
	}
	// Stat reads at most 32 bytes of a one-value file.
	if len(b) > 32 {
		b = b[:32]
	}
	s := strings.TrimSpace(string(b))
	if s == "max" {
		return math.MaxUint64
	}
	v, _ := parseUint(s)
	return v
}

// kv reads a file of "key value" lines into out; false if the file is absent.
func (r *metricsReader) kv(name string, out map[string]uint64) (bool, error) {
	b, err := r.read(name)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return false, nil
		}
		return false, err
	}
	for line := range lines(b) {
		k, v, err := parseKV(line)
		if err != nil {
			return false, fmt.Errorf("error while parsing %s (line=%q): %w", filepath.Join(r.dir, name), line, err)
		}
		out[k] = v
	}
	return true, nil
}

// kvValue is one key's value in a file of "key value" lines, 0 if absent.
func (r *metricsReader) kvValue(name, key string) uint64 {
	b, err := r.read(name)
	if err != nil {
		return 0
	}
	for line := range lines(b) {
		k, v, err := parseKV(line)
		if k == key {
			if err != nil {
				return 0
			}
			return v
		}
	}
	return 0
}

// psi reads a pressure file; nil if absent or malformed, as Stat reports it.
func (r *metricsReader) psi(name string) *stats.PSIStats {
	b, err := r.read(name)
	if err != nil {
		return nil
	}
	p := &stats.PSIStats{}
	for line := range lines(b) {
		f := strings.Fields(line)
		if len(f) == 0 {
			continue
		}
		var d *stats.PSIData
		switch f[0] {
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
		for _, kv := range f[1:] {
			k, v, ok := strings.Cut(kv, "=")
			if !ok {
				return nil
			}
			var err error
			switch k {
			case "avg10":
				d.Avg10, err = strconv.ParseFloat(v, 64)
			case "avg60":
				d.Avg60, err = strconv.ParseFloat(v, 64)
			case "avg300":
				d.Avg300, err = strconv.ParseFloat(v, 64)
			case "total":
				d.Total, err = strconv.ParseUint(v, 10, 64)
			}
			if err != nil {
				return nil
			}
		}
	}
	return p
}

// io reads io.stat: one entry per device, as Stat does.
func (r *metricsReader) io() []*stats.IOEntry {
	var usage []*stats.IOEntry
	b, err := r.read("io.stat")
	if err != nil {
		return usage
	}
	for _, line := range strings.Split(string(b), "\n") {
		parts := strings.Split(line, " ")
		if len(parts) < 2 {
			continue
		}
		maj, min, ok := strings.Cut(parts[0], ":")
		if !ok || strings.Contains(min, ":") {
			continue
		}
		major, err := strconv.ParseUint(maj, 10, 0)
		if err != nil {
			return usage
		}
		minor, err := strconv.ParseUint(min, 10, 0)
		if err != nil {
			return usage
		}
		e := &stats.IOEntry{Major: major, Minor: minor}
		for _, kv := range parts[1:] {
			k, v, ok := strings.Cut(kv, "=")
			if !ok || strings.Contains(v, "=") {
				continue
			}
			n, err := strconv.ParseUint(v, 10, 0)
			if err != nil {
				continue
			}
			switch k {
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
func (r *metricsReader) rdma(name string) []*stats.RdmaEntry {
	b, err := r.read(name)
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
				if n, err = parseUint32(v); err != nil {
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
func lines(b []byte) func(func(string) bool) {
	return func(yield func(string) bool) {
		for len(b) > 0 {
			line, rest, _ := bytes.Cut(b, []byte{'\n'})
			b = rest
			if !yield(string(bytes.TrimSuffix(line, []byte{'\r'}))) {
				return
			}
		}
	}
}

// cgroupRoot is where the guest mounts cgroup v2, as cgroup2.Load assumes.
const cgroupRoot = "/sys/fs/cgroup"

var errInvalidFormat = errors.New("cgroups: parsing file with invalid format failed")

func parseKV(line string) (string, uint64, error) {
	f := strings.Fields(line)
	if len(f) != 2 {
		return "", 0, errInvalidFormat
	}
	v, err := parseUint(f[1])
	return f[0], v, err
}

// parseUint parses a cgroup counter; a negative one (the kernel prints -1 for some
// unset values) is 0.
func parseUint(s string) (uint64, error) {
	return parseUintBits(s, 64)
}

func parseUint32(s string) (uint64, error) {
	return parseUintBits(s, 32)
}

func parseUintBits(s string, bits int) (uint64, error) {
	v, err := strconv.ParseUint(s, 10, bits)
	if err == nil {
		return v, nil
	}
	i, ierr := strconv.ParseInt(s, 10, bits)
	if ierr == nil && i < 0 || ierr != nil && errors.Is(ierr, strconv.ErrRange) && i < 0 {
		return 0, nil
	}
	return 0, err
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
