package test

import (
	"strconv"
	"strings"
	"testing"

	agent "github.com/caisson-containers/caisson/api/agent/v1"
	guestagent "github.com/caisson-containers/caisson/guest/agent"
)

// TestGuestTimerSlack: the agent gives its sysmon thread a long timer slack
// (guest/agent/sysmon.go), which threads and processes started from it would inherit; a
// container's process, and a process exec'd into it, have the kernel's default.
func TestGuestTimerSlack(t *testing.T) {
	g := bootGuest(t, layerDisks(t), 0)
	g.mountLayers(t)
	want := strconv.Itoa(guestagent.DefaultTimerSlack)
	r := g.run(t, "slack", testSpec("cat", "/proc/self/timerslack_ns"))
	if got := strings.TrimSpace(r.stdout); r.exit != 0 || got != want {
		t.Errorf("container's timer slack %q (exit %d, stderr %q), want %s", got, r.exit, r.stderr, want)
	}
	g.start(t, "long", testSpec("sleep", "1000"), &agent.Stdio{})
	for i := range 5 {
		if got := strings.TrimSpace(g.execOutput(t, "long", "e"+strconv.Itoa(i), "cat", "/proc/self/timerslack_ns")); got != want {
			t.Errorf("exec %d's timer slack %q, want %s", i, got, want)
		}
	}
}
