package agent

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"time"
)

// sysmonTimerSlack is the timer slack the agent gives the Go runtime's sysmon thread.
//
// Whenever the agent wakes from idle, its first syscall made the usual way (entersyscall)
// wakes sysmon, which then polls every 20 µs (doubling after 1 ms, up to 10 ms) until
// every P is idle again. Under TCG each of those polls is a timer interrupt and two
// context switches of the guest's vCPU. The path of a call that only reads (containerd
// asks every container for its metrics every second) makes its syscalls raw and leaves
// sysmon asleep (internal/transport's rawPort); everything else the agent does (creates,
// execs, stdio, mounts) still wakes it. A thread's timer slack lets the kernel fire its
// sleeps that much late, together with the next interrupt that comes anyway (the 4 ms
// tick of a busy CPU, the channel's): sysmon then polls a few times per wake-up instead
// of a dozen.
//
// What sysmon does comes at most this much later: taking the P from a goroutine in a
// long syscall (20 µs at the earliest without slack), preempting a goroutine that runs
// for 10 ms, polling the network when no thread has for 10 ms. Nothing else in the agent
// is slowed but threads that sysmon itself starts (a thread inherits its creator's slack;
// sysmon starts one when it hands a P over and no idle thread is left): their waits with
// a timeout end up to this much late too. The containers' processes, which would inherit
// the slack of the agent's thread that forks them, set the kernel's default again
// (DefaultTimerSlack, in the agent's "init" that libcontainer runs).
const sysmonTimerSlack = 2 * time.Millisecond

// DefaultTimerSlack is the kernel's default timer slack of a thread, in ns (init's).
const DefaultTimerSlack = 50_000

// slowSysmon sets sysmon's timer slack (sysmonTimerSlack); /proc must be mounted.
func slowSysmon() error {
	tid, err := sysmonThread("/proc/self/task", os.Getpid())
	if err != nil {
		return err
	}
	// Only /proc/PID has timerslack_ns (not /proc/PID/task/TID); a thread's id is a PID
	// there too.
	path := filepath.Join("/proc", strconv.Itoa(tid), "timerslack_ns")
	if err := os.WriteFile(path, []byte(strconv.FormatInt(sysmonTimerSlack.Nanoseconds(), 10)), 0); err != nil {
		return fmt.Errorf("sysmon's timer slack: %w", err)
	}
	return nil
}

// sysmonThread finds sysmon's thread in taskDir (/proc/self/task) of process pid: the Go
// runtime starts it before any other thread (first thing in runtime.main, before the
// packages' init), so it is the thread with the lowest id after the main thread's (ids
// only grow until they wrap at pid_max, which the guest's PID 1 never sees).
func sysmonThread(taskDir string, pid int) (int, error) {
	entries, err := os.ReadDir(taskDir)
	if err != nil {
		return 0, fmt.Errorf("find sysmon's thread: %w", err)
	}
	sysmon := 0
	for _, e := range entries {
		tid, err := strconv.Atoi(e.Name())
		if err != nil || tid == pid {
			continue
		}
		if sysmon == 0 || tid < sysmon {
			sysmon = tid
		}
	}
	if sysmon == 0 {
		return 0, fmt.Errorf("find sysmon's thread: %s has no thread but the main one", taskDir)
	}
	return sysmon, nil
}
