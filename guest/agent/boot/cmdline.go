package boot

import (
	"strings"
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
