package service

import (
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"testing"
	"time"
)

func TestPpidOf(t *testing.T) {
	dir := t.TempDir()
	for name, tc := range map[string]struct {
		stat string
		want int
	}{
		"plain":                  {"42 (sleep) S 7 42 42 0 -1", 7},
		"comm with ) and spaces": {"42 (a) b (c) S 9 42 42 0 -1", 9},
		"truncated":              {"42 (sleep", 0},
	} {
		f := filepath.Join(dir, name)
		if err := os.WriteFile(f, []byte(tc.stat), 0o644); err != nil {
			t.Fatal(err)
		}
		if got := ppidOf(f); got != tc.want {
			t.Errorf("%s: ppid %d, want %d", name, got, tc.want)
		}
	}
}

// descendantsOf finds a shell's children and grandchildren on this host's /proc.
func TestDescendantsOf(t *testing.T) {
	cmd := exec.Command("sh", "-c", `sh -c 'sleep 1001 & sleep 1002' & sleep 1003`)
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		for _, d := range descendantsOf(cmd.Process.Pid) {
			killPid(d)
		}
		cmd.Process.Kill()
		cmd.Wait()
	})
	deadline := time.Now().Add(10 * time.Second)
	for {
		var args []string
		for _, d := range descendantsOf(cmd.Process.Pid) {
			b, _ := os.ReadFile(filepath.Join("/proc", strconv.Itoa(d), "cmdline"))
			args = append(args, string(b))
		}
		if slices.Contains(args, "sleep\x001001\x00") && slices.Contains(args, "sleep\x001002\x00") && slices.Contains(args, "sleep\x001003\x00") {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("descendants' command lines %q, want the three sleeps", args)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func killPid(pid int) {
	if p, err := os.FindProcess(pid); err == nil {
		p.Kill()
	}
}
