// Command pause is the look-alike of registry.k8s.io/pause that critest's pods run as
// their sandbox container. What critest reads of it is its command name: in a pod's
// shared PID namespace (critest's default) it is PID 1, and "execSync with timeout"
// asserts that `pgrep sleep` finds nothing once the timed-out `sleep` is gone, so the
// harness's usual sandbox image (busybox running sleep) would always be found. Like
// the real pause it reaps the orphans reparented to it and exits on SIGINT or SIGTERM.
package main

import (
	"os"
	"os/signal"
	"syscall"
)

func main() {
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGINT, syscall.SIGTERM, syscall.SIGCHLD)
	for s := range sig {
		if s != syscall.SIGCHLD {
			os.Exit(0)
		}
		// One SIGCHLD may stand for several exits: reap until none is left.
		for {
			pid, err := syscall.Wait4(-1, nil, syscall.WNOHANG, nil)
			if pid <= 0 || err != nil {
				break
			}
		}
	}
}
