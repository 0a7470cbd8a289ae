package qemu

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/containerd/errdefs"
)

func TestVCPUTimeFromProc(t *testing.T) {
	// threads maps a thread id to its comm and schedstat ("" for none: the file is missing).
	type thread struct{ comm, schedstat string }
	for _, tc := range []struct {
		name    string
		threads map[string]thread
		want    time.Duration
		wantErr string
	}{
		{name: "multi-threaded TCG", threads: map[string]thread{
			"100": {"qemu-system-x86\n", "900000000 1 1\n"},
			"101": {"IO mon_iothread\n", "5000000 1 1\n"},
			"102": {"CPU 0/TCG\n", "3000000 10 20\n"},
			"103": {"CPU 1/TCG\n", "4000000 10 20\n"},
			"104": {"worker\n", "7 1 1\n"},
		}, want: 7 * time.Millisecond},
		{name: "single-threaded TCG", threads: map[string]thread{
			"100": {"qemu-system-x86\n", "900000000 1 1\n"},
			"102": {"ALL CPUs/TCG\n", "2500 10 20\n"},
		}, want: 2500},
		{name: "KVM", threads: map[string]thread{
			"102": {"CPU 0/KVM\n", "42 0 1\n"},
		}, want: 42},
		{name: "a thread gone since the listing", threads: map[string]thread{
			"102": {"CPU 0/TCG\n", "42 0 1\n"},
			"103": {},
		}, want: 42},
		{name: "no vCPU thread", threads: map[string]thread{
			"100": {"qemu-system-x86\n", "900000000 1 1\n"},
			"101": {"CPU model probe\n", "1 1 1\n"},
		}, wantErr: "no vCPU thread"},
		{name: "an unreadable schedstat", threads: map[string]thread{
			"102": {"CPU 0/TCG\n", "soon 1 1\n"},
		}, wantErr: "is no run time"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			for tid, th := range tc.threads {
				if err := os.Mkdir(filepath.Join(dir, tid), 0o755); err != nil {
					t.Fatal(err)
				}
				if th.comm == "" {
					continue
				}
				os.WriteFile(filepath.Join(dir, tid, "comm"), []byte(th.comm), 0o644)
				os.WriteFile(filepath.Join(dir, tid, "schedstat"), []byte(th.schedstat), 0o644)
			}
			var c vcpuClock
			defer c.close()
			got, err := c.read(dir)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("err = %v, want one saying %q", err, tc.wantErr)
				}
				return
			}
			if err != nil || got != tc.want {
				t.Fatalf("vcpuTime = %v, %v; want %v", got, err, tc.want)
			}
		})
	}
	var c vcpuClock
	if _, err := c.read(filepath.Join(t.TempDir(), "gone")); err == nil {
		t.Error("no error for a process that is gone")
	}
	if _, err := (&VM{}).VCPUTime(); !errdefs.IsFailedPrecondition(err) {
		t.Errorf("a VM not started: %v, want FailedPrecondition", err)
	}
}

// allThreadsTime is the run time of all of process pid's threads.
func allThreadsTime(pid int) (time.Duration, error) {
	dir := fmt.Sprintf("/proc/%d/task", pid)
	tasks, err := os.ReadDir(dir)
	if err != nil {
		return 0, err
	}
	var sum time.Duration
	for _, t := range tasks {
		f, err := os.Open(filepath.Join(dir, t.Name(), "schedstat"))
		if err != nil {
			return 0, err
		}
		d, err := sumRunTimes([]*os.File{f})
		f.Close()
		if err != nil {
			return 0, err
		}
		sum += d
	}
	return sum, nil
}

// The clock keeps the vCPU threads' files: it reads them again without looking for the
// threads, finds them again after forget (a vCPU hot-plug) or when a kept file fails,
// and reads nothing once closed.
func TestVCPUClockKeepsItsFiles(t *testing.T) {
	dir := t.TempDir()
	thread := func(tid, comm, ns string) {
		t.Helper()
		if err := os.MkdirAll(filepath.Join(dir, tid), 0o755); err != nil {
			t.Fatal(err)
		}
		os.WriteFile(filepath.Join(dir, tid, "comm"), []byte(comm+"\n"), 0o644)
		os.WriteFile(filepath.Join(dir, tid, "schedstat"), []byte(ns+" 0 1\n"), 0o644)
	}
	want := func(c *vcpuClock, d time.Duration) {
		t.Helper()
		if got, err := c.read(dir); err != nil || got != d {
			t.Fatalf("read = %v, %v; want %v", got, err, d)
		}
	}
	thread("10", "qemu-system-x86", "1000")
	thread("11", "CPU 0/TCG", "5")
	var c vcpuClock
	want(&c, 5)
	thread("11", "CPU 0/TCG", "7") // the same file, written again
	thread("12", "CPU 1/TCG", "100")
	want(&c, 7) // the threads are not looked for again
	c.forget()
	want(&c, 107)
	if err := os.RemoveAll(filepath.Join(dir, "11")); err != nil {
		t.Fatal(err)
	}
	os.WriteFile(filepath.Join(dir, "12", "schedstat"), []byte("x\n"), 0o644) // a kept file fails
	thread("13", "CPU 1/TCG", "200")
	os.RemoveAll(filepath.Join(dir, "12"))
	want(&c, 200)
	c.close()
	if _, err := c.read(dir); !errdefs.IsFailedPrecondition(err) {
		t.Errorf("read after close: %v, want FailedPrecondition", err)
	}
}
