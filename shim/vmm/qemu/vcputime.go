package qemu

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"sync"
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
	select {
	case <-v.done:
		return 0, fmt.Errorf("vCPU time: %w: the VM has ended", errdefs.ErrFailedPrecondition)
	default:
	}
	return v.vcpus.read(fmt.Sprintf("/proc/%d/task", pid))
}

// vcpuClock reads the vCPU threads' run time from their schedstat files, which it
// keeps open: a reading is then one pread per vCPU, where finding the threads reads
// every thread's comm (the shim reads it at every stats call, and a syscall is dear
// on a host that is itself a VM).
type vcpuClock struct {
	mu     sync.Mutex
	files  []*os.File // the vCPU threads' schedstat; nil: find them at the next read
	closed bool
}

// read sums the vCPU threads' run time, finding them below taskDir (/proc/PID/task)
// first if need be, and again if one of the kept files fails (its thread is gone).
func (c *vcpuClock) read(taskDir string) (time.Duration, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return 0, fmt.Errorf("vCPU time: %w: the VM has ended", errdefs.ErrFailedPrecondition)
	}
	if c.files != nil {
		if d, err := sumRunTimes(c.files); err == nil {
			return d, nil
		}
		c.closeFiles()
	}
	files, err := openVCPUStats(taskDir)
	if err != nil {
		return 0, fmt.Errorf("vCPU time: %w", err)
	}
	d, err := sumRunTimes(files)
	if err != nil {
		closeAll(files)
		return 0, fmt.Errorf("vCPU time: %w", err)
	}
	c.files = files
	return d, nil
}

// forget closes the kept files: the next read finds the vCPU threads again (after a
// vCPU hot-plug).
func (c *vcpuClock) forget() {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.closeFiles()
}

// close closes the kept files for good, once the VM has ended.
func (c *vcpuClock) close() {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.closeFiles()
	c.closed = true
}

func (c *vcpuClock) closeFiles() {
	closeAll(c.files)
	c.files = nil
}

func closeAll(files []*os.File) {
	for _, f := range files {
		f.Close()
	}
}

// openVCPUStats opens the schedstat files of the vCPU threads below taskDir.
func openVCPUStats(taskDir string) ([]*os.File, error) {
	tasks, err := os.ReadDir(taskDir)
	if err != nil {
		return nil, err
	}
	var files []*os.File
	for _, t := range tasks {
		comm, err := os.ReadFile(filepath.Join(taskDir, t.Name(), "comm"))
		if errors.Is(err, os.ErrNotExist) {
			continue // a thread that ended since the listing
		}
		if err != nil {
			closeAll(files)
			return nil, err
		}
		if !isVCPUThread(comm) {
			continue
		}
		f, err := os.Open(filepath.Join(taskDir, t.Name(), "schedstat"))
		if err != nil {
			closeAll(files)
			return nil, err
		}
		files = append(files, f)
	}
	if len(files) == 0 {
		return nil, fmt.Errorf("%w: no vCPU thread in %s", errdefs.ErrNotFound, taskDir)
	}
	return files, nil
}

// isVCPUThread says whether a thread's comm (with its newline) names a vCPU thread.
func isVCPUThread(comm []byte) bool {
	comm = bytes.TrimSpace(comm)
	if !bytes.HasPrefix(comm, []byte("CPU ")) && !bytes.HasPrefix(comm, []byte("ALL CPUs/")) {
		return false
	}
	return bytes.HasSuffix(comm, []byte("/TCG")) || bytes.HasSuffix(comm, []byte("/KVM"))
}

// sumRunTimes reads each thread's schedstat (its run time in ns, its wait time, its
// time slices) from the start, and sums the run times.
func sumRunTimes(files []*os.File) (time.Duration, error) {
	var buf [64]byte
	var sum time.Duration
	for _, f := range files {
		n, err := f.ReadAt(buf[:], 0)
		if n == 0 && err != nil {
			return 0, fmt.Errorf("%s: %w", f.Name(), err)
		}
		field, _, _ := bytes.Cut(bytes.TrimSpace(buf[:n]), []byte(" "))
		ns, err := strconv.ParseInt(string(field), 10, 64)
		if err != nil || ns < 0 {
			return 0, fmt.Errorf("%s: %q is no run time", f.Name(), buf[:n])
		}
		sum += time.Duration(ns)
	}
	return sum, nil
}
