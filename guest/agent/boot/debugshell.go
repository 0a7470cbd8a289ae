package boot

import (
	"fmt"
	"os"
	"os/exec"
	"syscall"
)

// DebugShell is the shell the debug image (`make guest-debug`) carries; the production
// image has none.
const DebugShell = "/bin/sh"

// StartDebugShell starts DebugShell on the console, in a session of its own with the
// console as its controlling terminal, and returns it unwaited: the caller reaps it. It
// fails if the image has no shell.
func StartDebugShell() (*exec.Cmd, error) {
	if _, err := os.Stat(DebugShell); err != nil {
		return nil, fmt.Errorf("debug console needs the debug image: %w", err)
	}
	console, err := os.OpenFile("/dev/console", os.O_RDWR, 0)
	if err != nil {
		return nil, err
	}
	defer console.Close()
	cmd := exec.Command(DebugShell)
	cmd.Stdin, cmd.Stdout, cmd.Stderr = console, console, console
	cmd.Env = []string{"PATH=/bin:/sbin:/usr/bin:/usr/sbin", "HOME=/", "TERM=linux", "PS1=caisson-guest# "}
	cmd.Dir = "/"
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true, Setctty: true, Ctty: 0}
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	return cmd, nil
}
