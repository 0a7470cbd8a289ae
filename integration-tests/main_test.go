package integration

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"syscall"
	"testing"
)

// TestMain first ends what an earlier run of these tests left behind: a test
// killed by its timeout runs no cleanup, and its shims (started by a containerd
// that is gone, in their own process groups) would keep their VMs running. A
// shim is stale when no containerd runs from its test directory's config.
func TestMain(m *testing.M) {
	sweepStaleShims()
	os.Exit(m.Run())
}

func sweepStaleShims() {
	procs := map[int][][]byte{}
	entries, _ := os.ReadDir("/proc")
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		if b, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline")); err == nil {
			procs[pid] = bytes.Split(b, []byte{0})
		}
	}
	live := func(config string) bool {
		for _, args := range procs {
			for _, a := range args {
				if string(a) == config {
					return true
				}
			}
		}
		return false
	}
	for pid, args := range procs {
		if filepath.Base(string(args[0])) != "containerd-shim-caisson-v2" {
			continue
		}
		for i, a := range args {
			if string(a) != "-address" || i+1 >= len(args) {
				continue
			}
			dir := filepath.Dir(string(args[i+1]))
			if filepath.Dir(filepath.Dir(dir)) == os.TempDir() && !live(filepath.Join(dir, "containerd.toml")) {
				fmt.Fprintf(os.Stderr, "killing stale shim %d of a finished test run (%s); its VM dies with it\n", pid, dir)
				syscall.Kill(pid, syscall.SIGKILL)
			}
		}
	}
}
