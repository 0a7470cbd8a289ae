package boot

import (
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// ParseCmdline returns the caisson.* parameters of a kernel command line, without the
// prefix: "caisson.debug" gives {"debug": ""}.
func ParseCmdline(s string) map[string]string {
	out := map[string]string{}
	for _, f := range strings.Fields(s) {
		k, v, _ := strings.Cut(f, "=")
		if name, ok := strings.CutPrefix(k, "caisson."); ok {
			out[name] = v
		}
	}
	return out
}

// Uptime is the time since the guest booted (CLOCK_BOOTTIME), for boot-time logs.
func Uptime() time.Duration {
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_BOOTTIME, &ts); err != nil {
		return 0
	}
	return time.Duration(ts.Nano())
}
