package qemu

import (
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"

	"github.com/caisson-containers/caisson/internal/testutil"
)

// readableBy says whether uid can open path for reading (and writing, with write).
func readableBy(t *testing.T, path string, uid uint32, write bool) bool {
	t.Helper()
	script := "exec 3<" + path
	if write {
		script = "exec 3<>" + path
	}
	cmd := exec.Command("/bin/sh", "-c", script)
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uid, Gid: uid}}
	return cmd.Run() == nil
}

// A 0600 root file becomes readable (or writable) by the jail's user only, and a second
// grant, or one for another user, keeps the first.
func TestGrantAccess(t *testing.T) {
	testutil.RequireRoot(t)
	dir := t.TempDir()
	os.Chmod(dir, 0o755)
	os.Chmod(filepath.Dir(dir), 0o755) // t.TempDir makes it 0700
	f := filepath.Join(dir, "layer")
	if err := os.WriteFile(f, []byte("x"), 0o600); err != nil {
		t.Fatal(err)
	}
	const uid, other = 61234, 61240
	if readableBy(t, f, uid, false) {
		t.Fatal("a 0600 root file is readable by another user before the grant")
	}
	if err := grantAccess(f, uid, false); err != nil {
		t.Fatal(err)
	}
	if !readableBy(t, f, uid, false) || readableBy(t, f, uid, true) || readableBy(t, f, other, false) {
		t.Fatal("after a read grant: want readable by the user only, not writable")
	}
	if err := grantAccess(f, uid, false); err != nil {
		t.Fatal(err)
	}
	if err := grantAccess(f, other, true); err != nil {
		t.Fatal(err)
	}
	if !readableBy(t, f, uid, false) || !readableBy(t, f, other, true) || readableBy(t, f, uid, true) {
		t.Fatal("a second grant changed the first")
	}
}
