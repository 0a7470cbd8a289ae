package hooks

import (
	"context"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/containerd/errdefs"
	"github.com/opencontainers/runtime-spec/specs-go"
)

// script writes an executable shell script under dir.
func script(t *testing.T, dir, name, body string) string {
	t.Helper()
	p := filepath.Join(dir, name)
	if err := os.WriteFile(p, []byte("#!/bin/sh\n"+body), 0o755); err != nil {
		t.Fatal(err)
	}
	return p
}

func TestRunPassesStateArgsAndEnv(t *testing.T) {
	dir := t.TempDir()
	out := filepath.Join(dir, "out")
	h := script(t, dir, "hook", `cat >"$1.state"; echo "$0 $1 $2 $HOOKVAR" >"$1.args"`)
	state := specs.State{Version: "1.1.0", ID: "c1", Status: specs.StateCreating, Pid: 42, Bundle: "/b",
		Annotations: map[string]string{"a": "b"}}
	err := Run(context.Background(), CreateRuntime, []specs.Hook{{Path: h, Args: []string{"name0", out, "x"}, Env: []string{"HOOKVAR=v"}}}, state)
	if err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(out + ".state")
	if err != nil {
		t.Fatal(err)
	}
	var got specs.State
	if err := json.Unmarshal(b, &got); err != nil {
		t.Fatalf("state on stdin %q: %v", b, err)
	}
	if got.ID != "c1" || got.Pid != 42 || got.Status != specs.StateCreating || got.Bundle != "/b" || got.Version != "1.1.0" || got.Annotations["a"] != "b" {
		t.Fatalf("state on stdin = %+v, want %+v", got, state)
	}
	args, _ := os.ReadFile(out + ".args")
	// $0 of a script is the path the kernel ran, not args[0].
	if strings.TrimSpace(string(args)) != h+" "+out+" x v" {
		t.Fatalf("hook saw %q", args)
	}
}

func TestRunFailures(t *testing.T) {
	dir := t.TempDir()
	ok := script(t, dir, "ok", "touch \"$1\"\n")
	fail := script(t, dir, "fail", "echo this went wrong >&2\nexit 3\n")
	hang := script(t, dir, "hang", "sleep 600 & wait\n")
	one := 1
	for _, tc := range []struct {
		name  string
		hooks []specs.Hook
		want  []string
		is    error
		max   time.Duration
	}{
		{"exit status", []specs.Hook{{Path: fail}}, []string{"poststart hook #0 (" + fail + ")", "exit status 3", "this went wrong"}, errdefs.ErrFailedPrecondition, 10 * time.Second},
		{"missing binary", []specs.Hook{{Path: filepath.Join(dir, "nope")}}, []string{"poststart hook #0 (" + filepath.Join(dir, "nope") + ")", "no such binary"}, errdefs.ErrNotFound, 10 * time.Second},
		{"timeout", []specs.Hook{{Path: hang, Timeout: &one}}, []string{"poststart hook #0 (" + hang + ")", "timeout of 1s"}, errdefs.ErrFailedPrecondition, 10 * time.Second},
		{"second of two", []specs.Hook{{Path: ok, Args: []string{"ok", filepath.Join(dir, "first-ran")}}, {Path: fail}}, []string{"poststart hook #1 (" + fail + ")"}, errdefs.ErrFailedPrecondition, 10 * time.Second},
	} {
		t.Run(tc.name, func(t *testing.T) {
			start := time.Now()
			err := Run(context.Background(), Poststart, tc.hooks, specs.State{ID: "c"})
			if err == nil {
				t.Fatal("no error")
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q does not say %q", err, w)
				}
			}
			if !errors.Is(err, tc.is) {
				t.Errorf("error %q is not %v", err, tc.is)
			}
			if d := time.Since(start); d > tc.max {
				t.Errorf("took %s", d)
			}
		})
	}
	if _, err := os.Stat(filepath.Join(dir, "first-ran")); err != nil {
		t.Errorf("the hook before the failing one did not run: %v", err)
	}
}

// A timeout kills the hook's children too: nothing it started outlives the failure.
func TestRunTimeoutKillsChildren(t *testing.T) {
	dir := t.TempDir()
	pidFile := filepath.Join(dir, "pid")
	h := script(t, dir, "hang", "sleep 600 &\necho $! >"+pidFile+"\nwait\n")
	one := 1
	if err := Run(context.Background(), CreateRuntime, []specs.Hook{{Path: h, Timeout: &one}}, specs.State{}); err == nil {
		t.Fatal("no error")
	}
	b, err := os.ReadFile(pidFile)
	if err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		st, err := os.ReadFile("/proc/" + strings.TrimSpace(string(b)) + "/stat")
		if err != nil || strings.Contains(string(st), ") Z ") {
			return // gone, or a zombie waiting for init
		}
		if time.Now().After(deadline) {
			t.Fatalf("the hook's child %s survived its timeout", b)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func TestValidate(t *testing.T) {
	zero := 0
	for _, tc := range []struct {
		name string
		h    *specs.Hooks
		ok   bool
	}{
		{"none", nil, true},
		{"absolute", &specs.Hooks{Poststop: []specs.Hook{{Path: "/bin/true"}}}, true},
		{"relative", &specs.Hooks{CreateRuntime: []specs.Hook{{Path: "true"}}}, false},
		{"zero timeout", &specs.Hooks{Poststart: []specs.Hook{{Path: "/bin/true", Timeout: &zero}}}, false},
	} {
		err := Validate(tc.h)
		if (err == nil) != tc.ok {
			t.Errorf("%s: Validate = %v", tc.name, err)
		}
		if err != nil && !errdefs.IsInvalidArgument(err) {
			t.Errorf("%s: %v is not an invalid argument", tc.name, err)
		}
	}
}

// RunAll goes on after a failure and reports every one.
func TestRunAll(t *testing.T) {
	dir := t.TempDir()
	fail := script(t, dir, "fail", "exit 1\n")
	ok := script(t, dir, "ok", "touch \"$1\"\n")
	ran := filepath.Join(dir, "ran")
	err := RunAll(context.Background(), Poststop, []specs.Hook{{Path: fail}, {Path: ok, Args: []string{"ok", ran}}, {Path: fail}}, specs.State{})
	if err == nil || !strings.Contains(err.Error(), "poststop hook #0") || !strings.Contains(err.Error(), "poststop hook #2") {
		t.Fatalf("RunAll = %v, want the failures of hooks #0 and #2", err)
	}
	if _, err := os.Stat(ran); err != nil {
		t.Fatalf("the hook after a failed one did not run: %v", err)
	}
}
