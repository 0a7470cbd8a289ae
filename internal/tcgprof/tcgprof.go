// Package tcgprof reads what the tcgprof QEMU plugin (hack/tcgprof/plugin) counts: the
// guest instructions a TCG guest executed, by translated block, and says which
// functions they belong to. Under TCG every guest instruction is emulated, so the
// instructions a call makes the guest execute are what it costs the host, without the
// noise of a shared machine's timings; the host's own profilers see only QEMU's
// translated code, not the guest's functions.
package tcgprof

import (
	"bufio"
	"debug/elf"
	"fmt"
	"io"
	"os"
	"sort"
	"strconv"
	"strings"
)

// Counts are guest instructions executed, by the guest virtual address of the block
// that holds them.
type Counts map[uint64]uint64

// ReadDump reads a dump the plugin wrote: "vaddr insns executions" lines, vaddr in hex,
// cumulative since QEMU started; a block translated more than once has more lines.
func ReadDump(path string) (Counts, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	c := Counts{}
	sc := bufio.NewScanner(f)
	for n := 1; sc.Scan(); n++ {
		fields := strings.Fields(sc.Text())
		if len(fields) != 3 {
			return nil, fmt.Errorf("%s:%d: %q: want vaddr insns executions", path, n, sc.Text())
		}
		var v [3]uint64
		for i, base := range []int{16, 10, 10} {
			if v[i], err = strconv.ParseUint(fields[i], base, 64); err != nil {
				return nil, fmt.Errorf("%s:%d: %w", path, n, err)
			}
		}
		c[v[0]] += v[1] * v[2]
	}
	return c, sc.Err()
}

// Since returns what c counted after before.
func (c Counts) Since(before Counts) Counts {
	d := Counts{}
	for pc, n := range c {
		if n > before[pc] {
			d[pc] = n - before[pc]
		}
	}
	return d
}

// IsKernel says whether a guest virtual address is the kernel's (x86-64's upper half).
func IsKernel(pc uint64) bool { return pc >= 1<<63 }

// Totals returns all instructions and the kernel's.
func (c Counts) Totals() (all, kernel uint64) {
	for pc, n := range c {
		all += n
		if IsKernel(pc) {
			kernel += n
		}
	}
	return all, kernel
}

// Symbols maps addresses to function names.
type Symbols struct {
	addrs []uint64
	names []string
}

func (s *Symbols) sort() {
	idx := make([]int, len(s.addrs))
	for i := range idx {
		idx[i] = i
	}
	sort.Slice(idx, func(i, j int) bool { return s.addrs[idx[i]] < s.addrs[idx[j]] })
	addrs, names := make([]uint64, len(idx)), make([]string, len(idx))
	for i, k := range idx {
		addrs[i], names[i] = s.addrs[k], s.names[k]
	}
	s.addrs, s.names = addrs, names
}

// Lookup returns the function that holds pc: the closest symbol at or below it.
func (s *Symbols) Lookup(pc uint64) (string, bool) {
	if s == nil {
		return "", false
	}
	i := sort.Search(len(s.addrs), func(i int) bool { return s.addrs[i] > pc }) - 1
	if i < 0 {
		return "", false
	}
	return s.names[i], true
}

// ReadKallsyms reads the guest kernel's /proc/kallsyms as read with CAP_SYSLOG (without
// it every address is 0, and nothing is read).
func ReadKallsyms(r io.Reader) (*Symbols, error) {
	s := &Symbols{}
	sc := bufio.NewScanner(r)
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) < 3 || !strings.ContainsAny(f[1], "tTwW") {
			continue
		}
		a, err := strconv.ParseUint(f[0], 16, 64)
		if err != nil || a == 0 {
			continue
		}
		name := f[2]
		if len(f) > 3 { // a module's: "[module]"
			name += " " + f[3]
		}
		s.addrs, s.names = append(s.addrs, a), append(s.names, name)
	}
	if err := sc.Err(); err != nil {
		return nil, err
	}
	s.sort()
	return s, nil
}

// ReadELF reads an unstripped ELF binary's function symbols.
func ReadELF(path string) (*Symbols, error) {
	f, err := elf.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	syms, err := f.Symbols()
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	s := &Symbols{}
	for _, y := range syms {
		if elf.ST_TYPE(y.Info) == elf.STT_FUNC && y.Value != 0 {
			s.addrs, s.names = append(s.addrs, y.Value), append(s.names, y.Name)
		}
	}
	s.sort()
	return s, nil
}

// Function is a function's share of a profile.
type Function struct {
	Name         string // "k NAME" for the kernel's, "u NAME" for user space's, "?" if unknown
	Instructions uint64
}

// ByFunction sums c by function, most instructions first: kernel addresses looked up in
// kernel, others in user (nil: unknown). User-space addresses of different processes
// overlap; user is the binary that ran most, the agent.
func (c Counts) ByFunction(kernel, user *Symbols) []Function {
	sums := map[string]uint64{}
	for pc, n := range c {
		prefix, syms := "u ", user
		if IsKernel(pc) {
			prefix, syms = "k ", kernel
		}
		name, ok := syms.Lookup(pc)
		if !ok {
			name = "?"
		}
		sums[prefix+name] += n
	}
	fs := make([]Function, 0, len(sums))
	for name, n := range sums {
		fs = append(fs, Function{name, n})
	}
	sort.Slice(fs, func(i, j int) bool {
		if fs[i].Instructions != fs[j].Instructions {
			return fs[i].Instructions > fs[j].Instructions
		}
		return fs[i].Name < fs[j].Name
	})
	return fs
}
