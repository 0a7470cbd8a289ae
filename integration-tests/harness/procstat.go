package harness

import (
	"bufio"
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/prometheus/procfs"
)

// MemAvailable is the host's MemAvailable (/proc/meminfo) in bytes: what the kernel
// estimates it can give new work without swapping.
func MemAvailable() (int64, error) {
	fs, err := procfs.NewDefaultFS()
	if err != nil {
		return 0, err
	}
	mi, err := fs.Meminfo()
	if err != nil {
		return 0, err
	}
	if mi.MemAvailable == nil {
		return 0, fmt.Errorf("/proc/meminfo has no MemAvailable")
	}
	return int64(*mi.MemAvailable) << 10, nil
}

// ProcessCPU is one live process's CPU time so far.
type ProcessCPU struct {
	Comm   string
	Kernel bool // a kernel thread
	// Seconds is its user and system time, all threads: /proc/PID/stat counts it in clock
	// ticks (USER_HZ, 100 a second), so to 10 ms.
	Seconds float64
}

// pfKthread is PF_KTHREAD in /proc/PID/stat's flags (include/linux/sched.h).
const pfKthread = 0x00200000

// MachineCPU is the CPU time the machine has used so far, all CPUs together (user, nice,
// system, IRQ and soft IRQ in /proc/stat, in seconds), and each live process's. A
// process that ends between two readings takes its time with it: the difference of
// busy and the processes' is what such processes used, with the kernel's work on
// behalf of none.
func MachineCPU() (busy float64, procs map[int]ProcessCPU, err error) {
	fs, err := procfs.NewDefaultFS()
	if err != nil {
		return 0, nil, err
	}
	st, err := fs.Stat()
	if err != nil {
		return 0, nil, err
	}
	c := st.CPUTotal
	busy = c.User + c.Nice + c.System + c.IRQ + c.SoftIRQ
	all, err := fs.AllProcs()
	if err != nil {
		return 0, nil, err
	}
	procs = make(map[int]ProcessCPU, len(all))
	for _, p := range all {
		ps, err := p.Stat()
		if err != nil {
			continue // it ended since the directory was read
		}
		procs[p.PID] = ProcessCPU{Comm: ps.Comm, Kernel: ps.Flags&pfKthread != 0, Seconds: ps.CPUTime()}
	}
	return busy, procs, nil
}

// DescendsFrom reports whether process pid is ancestor or one of its descendants.
func DescendsFrom(pid, ancestor int) bool {
	for pid > 1 {
		if pid == ancestor {
			return true
		}
		p, err := procfs.NewProc(pid)
		if err != nil {
			return false
		}
		st, err := p.Stat()
		if err != nil {
			return false
		}
		pid = st.PPID
	}
	return false
}

// Mapping is one mapping of a process's /proc/PID/smaps.
type Mapping struct {
	// Size is the mapping's length in bytes.
	Size uint64
	// Perms are its permissions as smaps shows them, e.g. "rwxp".
	Perms string
	// Path is the mapped file, "" for an anonymous mapping, or a pseudo-path such as
	// "[heap]" or "/memfd:name (deleted)".
	Path string
	// PSS is its proportional set size in bytes.
	PSS int64
}

// Smaps lists the mappings of process pid with their PSS.
func Smaps(pid int) ([]Mapping, error) {
	data, err := os.ReadFile(filepath.Join("/proc", strconv.Itoa(pid), "smaps"))
	if err != nil {
		return nil, err
	}
	var maps []Mapping
	sc := bufio.NewScanner(bytes.NewReader(data))
	for sc.Scan() {
		line := sc.Text()
		f := strings.Fields(line)
		if len(f) < 2 {
			continue
		}
		if !strings.HasSuffix(f[0], ":") && len(f) >= 5 { // start-end perms offset dev inode [path]
			var lo, hi uint64
			if _, err := fmt.Sscanf(f[0], "%x-%x", &lo, &hi); err != nil {
				return nil, fmt.Errorf("smaps of %d: %q: %w", pid, line, err)
			}
			m := Mapping{Size: hi - lo, Perms: f[1]}
			if len(f) > 5 {
				// The path may hold spaces: it is everything after the inode.
				m.Path = strings.Join(f[5:], " ")
			}
			maps = append(maps, m)
			continue
		}
		if f[0] == "Pss:" && len(maps) > 0 {
			kb, err := strconv.ParseInt(f[1], 10, 64)
			if err != nil {
				return nil, fmt.Errorf("smaps of %d: %q: %w", pid, line, err)
			}
			maps[len(maps)-1].PSS = kb << 10
		}
	}
	return maps, sc.Err()
}
