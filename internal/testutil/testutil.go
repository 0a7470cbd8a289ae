// Package testutil gates tests on what the machine offers, so that `go test ./...` runs
// everywhere and the root/QEMU tests run where they can (as root, after `make deps guest`).
// A gated test is skipped with the reason, never silently passed.
package testutil

import (
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"testing"
)

// RequireRoot skips t unless the test runs as root and not in -short mode
// (`make test` runs the unit tests with -short first).
func RequireRoot(t testing.TB) {
	t.Helper()
	if testing.Short() {
		t.Skip("root test: skipped in -short mode")
	}
	if os.Geteuid() != 0 {
		t.Skip("needs root (mounts, loop devices, tap devices, QEMU)")
	}
}

// RequireBinary returns the path of name on PATH (or in the project's tools directory),
// skipping t if it is missing.
func RequireBinary(t testing.TB, name string) string {
	t.Helper()
	if p, err := exec.LookPath(name); err == nil {
		return p
	}
	p := filepath.Join(RepoRoot(t), "_output", "tools", "bin", name)
	if _, err := os.Stat(p); err == nil {
		return p
	}
	t.Skipf("needs %s (run `make deps`)", name)
	return ""
}

// RepoRoot is the checkout's top directory.
func RepoRoot(t testing.TB) string {
	t.Helper()
	_, file, _, ok := runtime.Caller(0)
	if !ok {
		t.Fatal("cannot locate testutil source")
	}
	return filepath.Join(filepath.Dir(file), "..", "..")
}

// GuestImage holds the guest artifacts `make guest` builds.
type GuestImage struct {
	Kernel    string
	Initramfs string
}

// RequireGuest returns the built guest kernel and initramfs, skipping t if `make guest`
// has not run. CAISSON_GUEST_DIR overrides the directory.
func RequireGuest(t testing.TB) GuestImage {
	t.Helper()
	if testing.Short() {
		t.Skip("guest test: skipped in -short mode")
	}
	dir := os.Getenv("CAISSON_GUEST_DIR")
	if dir == "" {
		dir = filepath.Join(RepoRoot(t), "_output", "guest")
	}
	g := GuestImage{Kernel: filepath.Join(dir, "vmlinux"), Initramfs: filepath.Join(dir, "initramfs.cpio.lz4")}
	for _, p := range []string{g.Kernel, g.Initramfs} {
		if _, err := os.Stat(p); err != nil {
			t.Skipf("needs the guest image (run `make guest`): %v", err)
		}
	}
	return g
}

// ShortTempDir is a temporary directory, removed after t, whose path is short
// enough for the unix sockets a VM's state directory holds (at most 107 bytes).
func ShortTempDir(t testing.TB) string {
	t.Helper()
	d, err := os.MkdirTemp("", "cs")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(d) })
	return d
}
