package main

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/caisson-containers/caisson/internal/testutil"
	"github.com/caisson-containers/caisson/shim/config"
)

func build(t *testing.T) string {
	t.Helper()
	bin := filepath.Join(t.TempDir(), "caisson")
	if out, err := exec.Command("go", "build", "-o", bin, ".").CombinedOutput(); err != nil {
		t.Fatalf("build: %v\n%s", err, out)
	}
	return bin
}

func TestConfigDefaultLoads(t *testing.T) {
	out, err := exec.Command(build(t), "config", "default").Output()
	if err != nil {
		t.Fatal(err)
	}
	p := filepath.Join(t.TempDir(), "config.toml")
	os.WriteFile(p, out, 0o644)
	if _, _, err := config.Load(p); err != nil {
		t.Fatalf("`caisson config default` output does not load: %v\n%s", err, out)
	}
}

func TestCheckExitCode(t *testing.T) {
	testutil.RequireRoot(t)
	testutil.RequireBinary(t, "qemu-system-x86_64")
	g := testutil.RequireGuest(t)
	bin := build(t)

	good := filepath.Join(t.TempDir(), "good.toml")
	c := config.Default(filepath.Dir(g.Kernel))
	f, _ := os.Create(good)
	c.Write(f)
	f.Close()
	out, err := exec.Command(bin, "check", "--config", good, "--probe-timeout", "60s").CombinedOutput()
	if err != nil {
		t.Fatalf("check on a working host failed: %v\n%s", err, out)
	}
	if !strings.Contains(string(out), "Caisson can run here") {
		t.Fatalf("no positive verdict:\n%s", out)
	}

	bad := filepath.Join(t.TempDir(), "bad.toml")
	os.WriteFile(bad, []byte("[guest]\nkernel = \"/nonexistent/vmlinuz\"\n"), 0o644)
	out, err = exec.Command(bin, "check", "--config", bad).CombinedOutput()
	if ee, ok := err.(*exec.ExitError); !ok || ee.ExitCode() != 1 {
		t.Fatalf("check without a kernel: err %v, want exit 1\n%s", err, out)
	}
	if !strings.Contains(string(out), "guest-kernel   FAIL") {
		t.Fatalf("missing kernel not reported:\n%s", out)
	}

	out, err = exec.Command(bin, "check", "--config", filepath.Join(t.TempDir(), "missing.toml")).CombinedOutput()
	if err == nil || !strings.Contains(string(out), "missing.toml") {
		t.Fatalf("check with a missing config file: %v\n%s", err, out)
	}
}
