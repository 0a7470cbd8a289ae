// Command tcgprof prints where a TCG guest executed its instructions between two dumps
// of the tcgprof QEMU plugin (plugin/tcgprof.c), by function: the kernel's from the
// guest's /proc/kallsyms, user space's from an unstripped binary (the agent built as
// `make` builds it but without -s -w has the same text).
//
//	tcgprof -kallsyms kallsyms.txt -elf caisson-agent.debug -calls 20 before.txt after.txt
//
// BenchmarkGuestCallInstructions (guest/test) takes the dumps and prints the same.
package main

import (
	"flag"
	"fmt"
	"os"

	"github.com/caisson-containers/caisson/internal/tcgprof"
)

func main() {
	kallsyms := flag.String("kallsyms", "", "the guest's /proc/kallsyms, read with CAP_SYSLOG")
	binary := flag.String("elf", "", "an unstripped binary for user-space addresses (the agent's)")
	top := flag.Int("top", 40, "functions to print")
	calls := flag.Uint64("calls", 1, "divide the counts by this (the calls in the window)")
	flag.Parse()
	if flag.NArg() != 2 || *calls == 0 {
		fmt.Fprintln(os.Stderr, "usage: tcgprof [flags] BEFORE AFTER")
		os.Exit(2)
	}
	if err := run(*kallsyms, *binary, flag.Arg(0), flag.Arg(1), *top, *calls); err != nil {
		fmt.Fprintln(os.Stderr, "tcgprof:", err)
		os.Exit(1)
	}
}

func run(kallsyms, binary, before, after string, top int, calls uint64) error {
	var kernel, user *tcgprof.Symbols
	if kallsyms != "" {
		f, err := os.Open(kallsyms)
		if err != nil {
			return err
		}
		defer f.Close()
		if kernel, err = tcgprof.ReadKallsyms(f); err != nil {
			return err
		}
	}
	if binary != "" {
		var err error
		if user, err = tcgprof.ReadELF(binary); err != nil {
			return err
		}
	}
	a, err := tcgprof.ReadDump(before)
	if err != nil {
		return err
	}
	z, err := tcgprof.ReadDump(after)
	if err != nil {
		return err
	}
	d := z.Since(a)
	all, k := d.Totals()
	fmt.Printf("instructions per call: %d (kernel %d, user space %d)\n", all/calls, k/calls, (all-k)/calls)
	for i, f := range d.ByFunction(kernel, user) {
		if i == top {
			break
		}
		fmt.Printf("%10d %5.1f%%  %s\n", f.Instructions/calls, 100*float64(f.Instructions)/float64(all), f.Name)
	}
	return nil
}
