// Command caisson-agent is the guest's init: it prepares the VM, runs the pod's containers
// and serves the shim's API. See package guest/agent.
package main

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"runtime"

	"github.com/opencontainers/runc/libcontainer"
	_ "github.com/opencontainers/runc/libcontainer/nsenter"
	"golang.org/x/sys/unix"

	"github.com/caisson-containers/caisson/guest/agent"
	"github.com/caisson-containers/caisson/guest/agent/modprobe"
)

func init() {
	// The kernel runs /sbin/modprobe, a link to this binary, to load a module it needs
	// (request_module): answer as modprobe, and exit.
	if filepath.Base(os.Args[0]) == modprobe.Name {
		os.Exit(modprobe.Main(os.Args[1:]))
	}
	// libcontainer starts every container process as "/proc/self/exe init": the nsenter
	// constructor has set up the namespaces before the Go runtime started; this finishes
	// the container's setup and execs its process. It does not return.
	if len(os.Args) > 1 && os.Args[1] == "init" {
		// A thread inherits its creator's timer slack, and the agent's sysmon has a long
		// one (guest/agent/sysmon.go), which the threads it starts, and the processes
		// they fork, inherit: the container's process gets the kernel's default again.
		_ = unix.Prctl(unix.PR_SET_TIMERSLACK, agent.DefaultTimerSlack, 0, 0, 0)
		libcontainer.Init()
	}
	// No one reads the agent's heap profile, and each sampled allocation (one per 512 KiB
	// allocated, by default: every hundred or so Stats calls) walks its goroutine's stack,
	// tens of thousands of instructions emulated under TCG.
	runtime.MemProfileRate = 0
	// The agent moves threads into the pod's namespaces (locked, and discarded after).
	// A thread the runtime cannot discard is the main one, and /proc/self/ns/* names
	// its namespaces: were the main thread to enter the pod's network namespace,
	// libcontainer would take that namespace for the host's and refuse the pod's net.*
	// sysctls. Keeping the main goroutine on the main thread keeps others off it.
	runtime.LockOSThread()
}

func main() {
	if err := agent.Main(context.Background()); err != nil {
		fmt.Fprintln(os.Stderr, "caisson-agent:", err)
		os.Exit(1)
	}
}
