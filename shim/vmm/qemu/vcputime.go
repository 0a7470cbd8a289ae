package qemu

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"time"

	"github.com/containerd/errdefs"
)

// VCPUTime is how long the VM's vCPU threads have run on the host CPUs since QEMU
// started: everything the guest has executed, and, under TCG, QEMU's translation and
// device emulation done on those threads. What the guest's counters (its cgroups'
// CPU, memory and I/O figures) can have changed since an earlier reading is bounded
// by the difference (shim/task's stats reuse).
//
// QEMU names its threads (-name debug-threads=on): "CPU N/TCG" or "CPU N/KVM" for a
// vCPU, "ALL CPUs/TCG" for single-threaded TCG. The kernel's schedstat gives each
// thread's run time in nanoseconds; vCPUs hot-plugged later are counted from when they
// start.
func (v *VM) VCPUTime() (time.Duration, error) {
	pid := v.Pid()
	if pid == 0 {
		return 0, fmt.Errorf("vCPU time: %w: the VM is not started", errdefs.ErrFailedPrecondition)
	}
	return vcpuTime(fmt.Sprintf("/proc/%d/task", pid))
}

// vcpuTime sums the run time of the vCPU threads below taskDir (/proc/PID/task).
func vcpuTime(taskDir string) (time.Duration, error) {
	tasks, err := os.ReadDir(taskDir)
	if err != nil {
		return 0, fmt.Errorf("vCPU time: %w", err)
	}
	var sum time.Duration
	vcpus := 0
	for _, t := range tasks {
		comm, err := os.ReadFile(filepath.Join(taskDir, t.Name(), "comm"))
		if errors.Is(err, os.ErrNotExist) {
			continue // a thread that ended since the listing
		}
		if err != nil {
			return 0, fmt.Errorf("vCPU time: %w", err)
		}
		if !isVCPUThread(comm) {
			continue
		}
		ns, err := threadRunTime(filepath.Join(taskDir, t.Name(), "schedstat"))
		if err != nil {
			return 0, fmt.Errorf("vCPU time: %w", err)
		}
		sum += ns
		vcpus++
	}
	if vcpus == 0 {
		return 0, fmt.Errorf("vCPU time: %w: no vCPU thread in %s", errdefs.ErrNotFound, taskDir)
	}
	return sum, nil
}

// isVCPUThread says whether a thread's comm (with its newline) names a vCPU thread.
func isVCPUThread(comm []byte) bool {
	comm = bytes.TrimSpace(comm)
	if !bytes.HasPrefix(comm, []byte("CPU ")) && !bytes.HasPrefix(comm, []byte("ALL CPUs/")) {
		return false
	}
	return bytes.HasSuffix(comm, []byte("/TCG")) || bytes.HasSuffix(comm, []byte("/KVM"))
}

// threadRunTime reads a thread's schedstat: its run time in ns, its wait time, its
// time slices.
func threadRunTime(path string) (time.Duration, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return 0, err
	}
	field, _, _ := bytes.Cut(bytes.TrimSpace(b), []byte(" "))
	ns, err := strconv.ParseInt(string(field), 10, 64)
	if err != nil || ns < 0 {
		return 0, fmt.Errorf("%s: %q is no run time", path, b)
	}
	return time.Duration(ns), nil
}
