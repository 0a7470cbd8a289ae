package service

import (
	"errors"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/caisson-containers/caisson/guest/agent/container"
)

// killTree SIGKILLs an exec'd process and what it started. containerd kills an exec this
// way when its ExecSync times out (a probe, `crictl exec --timeout`): a child left behind
// would keep running in the container, reparented to its init, and one holding the exec's
// output would keep the exec's streams, and ExecSync, open. (runc kills the exec's own
// process only.)
//
// Its children are the exec's process group (libcontainer makes each process a session
// and group leader, and a shell without job control keeps its jobs in its group) and its
// descendants found in /proc, for those that left the group; both are read before the
// exec's own process dies and its children are reparented. A process that forks as it is
// killed may leave a child behind.
func killTree(p *container.Process) error {
	pid := p.Pid()
	var descendants []int
	if pid > 0 {
		descendants = descendantsOf(pid)
	}
	// p.Signal says when the process was never started or has exited.
	if err := p.Signal(unix.SIGKILL); err != nil {
		return err
	}
	// The group outlives its leader while it has members, so its id is not reused.
	if err := unix.Kill(-pid, unix.SIGKILL); err != nil && !errors.Is(err, unix.ESRCH) {
		return err
	}
	for _, d := range descendants {
		unix.Kill(d, unix.SIGKILL) // gone already, most likely with the group
	}
	return nil
}

// descendantsOf lists the processes under pid, from /proc.
func descendantsOf(pid int) []int {
	children := map[int][]int{}
	entries, _ := os.ReadDir("/proc")
	for _, e := range entries {
		p, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		if pp := ppidOf(filepath.Join("/proc", e.Name(), "stat")); pp > 0 {
			children[pp] = append(children[pp], p)
		}
	}
	var out []int
	queue := []int{pid}
	for len(queue) > 0 {
		next := children[queue[0]]
		queue = append(queue[1:], next...)
		out = append(out, next...)
	}
	return out
}

// ppidOf reads the parent pid from a /proc/PID/stat file (0 if it cannot).
func ppidOf(stat string) int {
	b, err := os.ReadFile(stat)
	if err != nil {
		return 0
	}
	// "pid (comm) state ppid ...": comm may hold spaces and parentheses.
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	if i < 0 {
		return 0
	}
	f := strings.Fields(s[i+1:])
	if len(f) < 2 {
		return 0
	}
	pp, _ := strconv.Atoi(f[1])
	return pp
}
