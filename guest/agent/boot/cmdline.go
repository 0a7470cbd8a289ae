package boot

import (
	"os"
	"strings"
)

// Cmdline returns the caisson.* parameters of the kernel command line, without the
// prefix: "caisson.transport=vsock" gives {"transport": "vsock"}; a bare
// "caisson.debug" gives {"debug": ""}.
func Cmdline() (map[string]string, error) {
	b, err := os.ReadFile("/proc/cmdline")
	if err != nil {
		return nil, err
	}
	return parseCmdline(string(b)), nil
}

func parseCmdline(s string) map[string]string {
	out := map[string]string{}
	for _, f := range strings.Fields(s) {
		k, v, _ := strings.Cut(f, "=")
		if name, ok := strings.CutPrefix(k, "caisson."); ok {
			out[name] = v
		}
	}
	return out
}
