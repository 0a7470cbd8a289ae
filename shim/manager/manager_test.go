package manager

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"

	bootapi "github.com/containerd/containerd/api/runtime/bootstrap/v1"
	runtimeoptions "github.com/containerd/containerd/api/types/runtimeoptions/v1"
	"github.com/containerd/containerd/v2/pkg/namespaces"

	"github.com/caisson-containers/caisson/internal/testutil"
	"github.com/caisson-containers/caisson/shim/config"
)

// bundle makes a container bundle directory (an OCI config.json with annotations) and
// makes it the working directory, as containerd runs the shim's start and delete in it.
func bundle(t *testing.T, annotations string) string {
	t.Helper()
	dir := t.TempDir()
	spec := `{"ociVersion": "1.1.0", "annotations": {` + annotations + `}}`
	if err := os.WriteFile(filepath.Join(dir, "config.json"), []byte(spec), 0o600); err != nil {
		t.Fatal(err)
	}
	t.Chdir(dir)
	return dir
}

// After a shim crash, `shim delete` removes the pod's state under the state_dir of the
// configuration the container started with, not under the default one.
func TestStopCleansTheStateDirOfTheStartConfig(t *testing.T) {
	if os.Getenv(config.EnvPath) != "" {
		t.Skipf("%s is set: the test needs the default configuration to differ from its own", config.EnvPath)
	}
	stateRoot := filepath.Join(testutil.ShortTempDir(t), "state") // state_dir is bounded (sockets)
	cfgPath := filepath.Join(t.TempDir(), "caisson.toml")
	if err := os.WriteFile(cfgPath, []byte("state_dir = \""+stateRoot+"\"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if def, _, err := config.Load(""); err == nil && def.StateDir == stateRoot {
		t.Fatal("the default state_dir is the test's")
	}
	dir := bundle(t, `"io.kubernetes.cri.sandbox-id": "pod1"`)

	// What Start records from the runtime options containerd passes.
	params := &bootapi.BootstrapParams{InstanceID: "c1", Namespace: "k8s.io"}
	if err := params.AddExtension(&runtimeoptions.Options{ConfigPath: cfgPath}); err != nil {
		t.Fatal(err)
	}
	if err := recordConfigPath(dir, params); err != nil {
		t.Fatal(err)
	}

	// A dead shim's pod state: no QEMU runs for it.
	stateDir := filepath.Join(stateRoot, "k8s.io-pod1") // shim/podid
	if err := os.MkdirAll(stateDir, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(stateDir, "console.log"), []byte("boot\n"), 0o600); err != nil {
		t.Fatal(err)
	}

	ctx := namespaces.WithNamespace(context.Background(), "k8s.io")
	if _, err := New("io.containerd.caisson.v2").Stop(ctx, "c1"); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(stateDir); !os.IsNotExist(err) {
		t.Fatalf("pod state %s still there after Stop (stat: %v)", stateDir, err)
	}
}

// Without runtime options, or with options naming no file, nothing is recorded and Stop
// loads the configuration as the task service does without options.
func TestRecordConfigPathWithoutOptions(t *testing.T) {
	for name, params := range map[string]*bootapi.BootstrapParams{
		"no extension": {InstanceID: "c1"},
		"empty path": func() *bootapi.BootstrapParams {
			p := &bootapi.BootstrapParams{}
			p.AddExtension(&runtimeoptions.Options{})
			return p
		}(),
	} {
		t.Run(name, func(t *testing.T) {
			dir := t.TempDir()
			if err := recordConfigPath(dir, params); err != nil {
				t.Fatal(err)
			}
			if p := recordedConfigPath(dir); p != "" {
				t.Fatalf("recorded %q, want nothing", p)
			}
		})
	}
}

// After a shim crash, `shim delete` runs the container's poststop hooks (nerdctl's
// network teardown), with the container's state on their stdin, as runc's delete does.
func TestStopRunsPoststopHooksOfADeadShim(t *testing.T) {
	if os.Getenv(config.EnvPath) != "" {
		t.Skipf("%s is set: the test writes its own configuration", config.EnvPath)
	}
	stateRoot := filepath.Join(testutil.ShortTempDir(t), "state") // state_dir is bounded (sockets)
	cfgPath := filepath.Join(t.TempDir(), "caisson.toml")
	if err := os.WriteFile(cfgPath, []byte("state_dir = \""+stateRoot+"\"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	out := filepath.Join(t.TempDir(), "state.json")
	hook := filepath.Join(t.TempDir(), "hook")
	if err := os.WriteFile(hook, []byte("#!/bin/sh\ncat > "+out+"\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	spec := `{"ociVersion": "1.1.0", "hooks": {"poststop": [{"path": "` + hook + `"}]}}`
	if err := os.WriteFile(filepath.Join(dir, "config.json"), []byte(spec), 0o600); err != nil {
		t.Fatal(err)
	}
	t.Chdir(dir)
	params := &bootapi.BootstrapParams{InstanceID: "c1", Namespace: "default"}
	if err := params.AddExtension(&runtimeoptions.Options{ConfigPath: cfgPath}); err != nil {
		t.Fatal(err)
	}
	if err := recordConfigPath(dir, params); err != nil {
		t.Fatal(err)
	}
	stateDir := filepath.Join(stateRoot, "default-c1") // shim/podid
	if err := os.MkdirAll(stateDir, 0o700); err != nil {
		t.Fatal(err)
	}

	ctx := namespaces.WithNamespace(context.Background(), "default")
	if _, err := New("io.containerd.caisson.v2").Stop(ctx, "c1"); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(out)
	if err != nil {
		t.Fatalf("the poststop hook did not run: %v", err)
	}
	for _, want := range []string{`"id":"c1"`, `"status":"stopped"`, `"bundle":"` + dir + `"`} {
		if !strings.Contains(string(b), want) {
			t.Errorf("the hook's state %s lacks %s", b, want)
		}
	}
}
