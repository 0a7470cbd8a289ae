package container

import (
	"testing"

	"github.com/containerd/log"
	specs "github.com/opencontainers/runtime-spec/specs-go"
)

// TestProcessLogLevel: runc init logs at the agent's level (nsexec reads it from
// _LIBCONTAINER_LOGLEVEL, in logrus's numbering), so that a guest without caisson.debug
// does not make and parse debug messages that are then dropped.
func TestProcessLogLevel(t *testing.T) {
	saved := log.GetLevel()
	t.Cleanup(func() { log.L.Logger.SetLevel(saved) })
	for _, tc := range []struct {
		level, want string
	}{
		{"debug", "5"},
		{"info", "4"},
		{"warn", "3"},
	} {
		t.Run(tc.level, func(t *testing.T) {
			if err := log.SetLevel(tc.level); err != nil {
				t.Fatal(err)
			}
			for _, init := range []bool{true, false} {
				lp, err := libcontainerProcess(&specs.Process{Args: []string{"true"}, Cwd: "/"}, init)
				if err != nil {
					t.Fatal(err)
				}
				if lp.LogLevel != tc.want {
					t.Errorf("init %v: LogLevel %q, want %q", init, lp.LogLevel, tc.want)
				}
			}
		})
	}
}
