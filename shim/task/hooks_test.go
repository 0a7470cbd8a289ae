package task

import (
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"testing"

	"github.com/opencontainers/runtime-spec/specs-go"

	"github.com/caisson-containers/caisson/shim/hooks"
)

// Each kind of hook gets the container's state with the status of its point of the
// lifecycle and the holder's pid.
func TestContainerHooksState(t *testing.T) {
	dir := t.TempDir()
	hook := filepath.Join(dir, "hook")
	if err := os.WriteFile(hook, []byte("#!/bin/sh\ncat >\"$1\"\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	h := func(kind string) []specs.Hook {
		return []specs.Hook{{Path: hook, Args: []string{"hook", filepath.Join(dir, kind)}}}
	}
	spec := &specs.Spec{Version: "1.2.0", Annotations: map[string]string{"nerdctl/namespace": "default"},
		Hooks: &specs.Hooks{CreateRuntime: h("createRuntime"), StartContainer: h("startContainer"), Poststart: h("poststart"), Poststop: h("poststop")}}
	ch := newContainerHooks("c1", "/run/bundle", spec)
	ctx := context.Background()
	for _, tc := range []struct {
		kind   hooks.Kind
		status specs.ContainerState
	}{
		{hooks.CreateRuntime, specs.StateCreating},
		{hooks.StartContainer, specs.StateCreated},
		{hooks.Poststart, specs.StateRunning},
		{hooks.Poststop, specs.StateStopped},
	} {
		if err := ch.run(ctx, tc.kind, tc.status, 4242); err != nil {
			t.Fatalf("%s: %v", tc.kind, err)
		}
		b, err := os.ReadFile(filepath.Join(dir, string(tc.kind)))
		if err != nil {
			t.Fatalf("%s hook did not run: %v", tc.kind, err)
		}
		var st specs.State
		if err := json.Unmarshal(b, &st); err != nil {
			t.Fatal(err)
		}
		want := specs.State{Version: "1.2.0", ID: "c1", Status: tc.status, Pid: 4242, Bundle: "/run/bundle", Annotations: spec.Annotations}
		if st.Version != want.Version || st.ID != want.ID || st.Status != want.Status || st.Pid != want.Pid || st.Bundle != want.Bundle ||
			st.Annotations["nerdctl/namespace"] != "default" {
			t.Errorf("%s hook read %+v, want %+v", tc.kind, st, want)
		}
	}
	// No hooks of a kind, or none at all: nothing runs, no error.
	if err := ch.run(ctx, hooks.Prestart, specs.StateCreating, 1); err != nil {
		t.Fatal(err)
	}
	if err := newContainerHooks("c2", "/b", &specs.Spec{}).run(ctx, hooks.Poststop, specs.StateStopped, 0); err != nil {
		t.Fatal(err)
	}
}
