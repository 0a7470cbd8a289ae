package reaper

import (
	"context"
	"os/exec"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

func wait(t *testing.T, ch <-chan Exit) Exit {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	select {
	case e := <-ch:
		return e
	case <-ctx.Done():
		t.Fatal("no exit")
		return Exit{}
	}
}

func TestExitsGoToTheirWaiters(t *testing.T) {
	if err := Subreaper(); err != nil {
		t.Fatal(err)
	}
	r := New()
	go r.Run()
	defer r.Stop()
	for _, tc := range []struct {
		name       string
		args       []string
		wantStatus int
		wantSignal unix.Signal
	}{
		{name: "exit 0", args: []string{"true"}},
		{name: "exit 3", args: []string{"sh", "-c", "exit 3"}, wantStatus: 3},
		{name: "killed", args: []string{"sh", "-c", "kill -9 $$"}, wantStatus: 137, wantSignal: unix.SIGKILL},
		// An orphan (the backgrounded sleep) is reaped too, and does not disturb the waiter.
		{name: "with orphan", args: []string{"sh", "-c", "sleep 0.1 & exit 5"}, wantStatus: 5},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var cmd *exec.Cmd
			pid, ch, err := r.Start(func() (int, error) {
				cmd = exec.Command(tc.args[0], tc.args[1:]...)
				if err := cmd.Start(); err != nil {
					return 0, err
				}
				return cmd.Process.Pid, nil
			})
			if err != nil {
				t.Fatal(err)
			}
			e := wait(t, ch)
			if e.Pid != pid || e.Status != tc.wantStatus || e.Signal != tc.wantSignal {
				t.Errorf("exit %+v, want pid %d status %d signal %v", e, pid, tc.wantStatus, tc.wantSignal)
			}
		})
	}
}

// A starter that waits for its own helper inside Guard gets the helper's status, even
// while other children exit and are reaped.
func TestGuardKeepsTheReaperAway(t *testing.T) {
	if err := Subreaper(); err != nil {
		t.Fatal(err)
	}
	r := New()
	go r.Run()
	defer r.Stop()
	_, ch, err := r.Start(func() (int, error) {
		cmd := exec.Command("true")
		if err := cmd.Start(); err != nil {
			return 0, err
		}
		return cmd.Process.Pid, nil
	})
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 20; i++ {
		err := r.Guard(func() error {
			return exec.Command("sh", "-c", "exit 7").Run()
		})
		var ee *exec.ExitError
		if !asExitError(err, &ee) || ee.ExitCode() != 7 {
			t.Fatalf("guarded wait: %v, want exit status 7", err)
		}
	}
	wait(t, ch)
}

func asExitError(err error, ee **exec.ExitError) bool {
	e, ok := err.(*exec.ExitError)
	*ee = e
	return ok
}
