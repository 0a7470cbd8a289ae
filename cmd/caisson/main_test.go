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
	// The transport named is the one pods use, whatever vhost-vsock the host has.
	if !strings.Contains(string(out), "Caisson can run here") || !strings.Contains(string(out), "transport serial") {
		t.Fatalf("no positive verdict with the serial transport:\n%s", out)
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

	// A configuration asking for vsock is refused when it loads: pods cannot use it yet.
	vsock := filepath.Join(t.TempDir(), "vsock.toml")
	os.WriteFile(vsock, []byte("[guest]\ntransport = \"vsock\"\n"), 0o644)
	out, err = exec.Command(bin, "check", "--config", vsock).CombinedOutput()
	if err == nil || !strings.Contains(string(out), "guest.transport = vsock: not supported for pods yet") {
		t.Fatalf("check with transport vsock: %v, want the config refused\n%s", err, out)
	}

	out, err = exec.Command(bin, "check", "--config", filepath.Join(t.TempDir(), "missing.toml")).CombinedOutput()
	if err == nil || !strings.Contains(string(out), "missing.toml") {
		t.Fatalf("check with a missing config file: %v\n%s", err, out)
	}
}

// TestTemplateCommands: `caisson template create` makes the configured pod VM's template
// (once: a second create finds it), `list` shows it, `remove` removes it.
func TestTemplateCommands(t *testing.T) {
	testutil.RequireRoot(t)
	testutil.RequireBinary(t, "qemu-system-x86_64")
	g := testutil.RequireGuest(t)
	bin := build(t)

	c := config.Default(filepath.Dir(g.Kernel))
	c.StateDir = testutil.ShortTempDir(t)
	c.Hypervisor.Accelerator = "tcg"
	c.Hypervisor.Template = true
	cfgPath := filepath.Join(t.TempDir(), "config.toml")
	f, _ := os.Create(cfgPath)
	c.Write(f)
	f.Close()
	run := func(args ...string) string {
		t.Helper()
		var stderr strings.Builder
		cmd := exec.Command(bin, append(args, "--config", cfgPath)...)
		cmd.Stderr = &stderr
		out, err := cmd.Output()
		if err != nil {
			t.Fatalf("caisson %v: %v\n%s%s", args, err, out, stderr.String())
		}
		return string(out)
	}
	dir := strings.Fields(run("template", "create"))[0]
	if _, err := os.Stat(filepath.Join(dir, "state")); err != nil {
		t.Fatalf("no template in %s: %v", dir, err)
	}
	if again := strings.Fields(run("template", "create"))[0]; again != dir {
		t.Fatalf("second create: %s, want %s", again, dir)
	}
	if list := run("template", "list"); !strings.Contains(list, dir) || !strings.Contains(list, g.Initramfs) {
		t.Fatalf("list lacks %s:\n%s", dir, list)
	}
	run("template", "remove")
	if _, err := os.Stat(dir); !os.IsNotExist(err) {
		t.Fatalf("template still there after remove: %v", err)
	}
	if list := run("template", "list"); strings.Contains(list, dir) {
		t.Fatalf("list after remove:\n%s", list)
	}
}
