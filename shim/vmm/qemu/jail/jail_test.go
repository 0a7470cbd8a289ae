package jail

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/containerd/errdefs"

	"github.com/caisson-containers/caisson/internal/testutil"
)

// testUID is a user id no account on a test host has.
const testUID = 61234

// A program in the jail runs as the jail's user with no capability at all and
// no_new_privs, in another mount namespace, sees the files it was given (read-only
// unless writable) and nothing else of the host.
func TestJail(t *testing.T) {
	testutil.RequireRoot(t)
	dir := t.TempDir()
	root := filepath.Join(dir, "root")
	given := filepath.Join(dir, "given")
	secret := filepath.Join(dir, "secret")
	work := filepath.Join(dir, "work")
	for _, d := range []string{root, work} {
		if err := os.Mkdir(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.Chown(work, testUID, testUID); err != nil {
		t.Fatal(err)
	}
	for path, content := range map[string]string{given: "given\n", secret: "secret\n"} {
		if err := os.WriteFile(path, []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	script := strings.Join([]string{
		"grep -E '^(Uid|Gid|Groups|CapInh|CapPrm|CapEff|CapBnd|CapAmb|NoNewPrivs):' /proc/self/status",
		"readlink /proc/self/ns/mnt /proc/self/ns/pid /proc/self/ns/net",
		"echo pid $$",
		"ls /proc | grep -c '^[0-9]'",
		"cat " + given,
		"cat " + secret + " 2>/dev/null && echo SECRET-READ",
		"echo x > " + given + " 2>/dev/null && echo GIVEN-WRITTEN",
		"echo x > " + work + "/w && echo WORK-WRITTEN",
		"ls /",
	}, "; ")
	s := Spec{
		Root: root,
		Mounts: []Mount{
			{Kind: Bind, Source: "/usr", Target: "/usr"},
			{Kind: Bind, Source: "/etc/ld.so.cache", Target: "/etc/ld.so.cache"},
			{Kind: Proc, Target: "/proc"},
			{Kind: Bind, Source: given, Target: given},
			{Kind: Bind, Source: work, Target: work, Writable: true},
		},
		Symlinks: map[string]string{"/bin": "usr/bin", "/lib": "usr/lib", "/lib64": "usr/lib64"},
		UID:      testUID, GID: testUID, Groups: []uint32{testUID + 1},
		Dir:    work,
		Argv:   []string{"/bin/sh", "-c", script},
		Parent: os.Getpid(),
	}
	cmd, err := Command(s)
	if err != nil {
		t.Fatal(err)
	}
	cmd.SysProcAttr.Pdeathsig = syscall.SIGKILL
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Run(); err != nil {
		t.Fatalf("%v: %s", err, out.String())
	}
	got := out.String()
	t.Log(got)
	for _, want := range []string{
		"Uid:\t61234\t61234\t61234\t61234", "Gid:\t61234\t61234\t61234\t61234", "Groups:\t61235",
		"CapInh:\t0000000000000000", "CapPrm:\t0000000000000000", "CapEff:\t0000000000000000",
		"CapBnd:\t0000000000000000", "CapAmb:\t0000000000000000", "NoNewPrivs:\t1",
		"given\n", "WORK-WRITTEN",
	} {
		if !strings.Contains(got, want) {
			t.Errorf("jailed program's output lacks %q", want)
		}
	}
	// The root holds what was given (and the directories leading to it), no more.
	for _, bad := range []string{"SECRET-READ", "GIVEN-WRITTEN", "\nvar\n", "\nhome\n", "\nrun\n", "\nroot\n"} {
		if strings.Contains(got, bad) {
			t.Errorf("jailed program's output has %q", bad)
		}
	}
	for _, ns := range []string{"mnt", "pid", "net"} {
		host, err := os.Readlink("/proc/self/ns/" + ns)
		if err != nil {
			t.Fatal(err)
		}
		if strings.Contains(got, host) {
			t.Errorf("jailed program in the host's %s namespace %s", ns, host)
		}
	}
	// Pid 1 of its own pid namespace, it sees its own processes only (itself, grep, ls).
	if !strings.Contains(got, "pid 1\n") {
		t.Errorf("jailed program is not pid 1 of its own pid namespace")
	}
	// Nothing of the jail is left mounted on the host.
	if ents, err := os.ReadDir(root); err != nil || len(ents) != 0 {
		t.Errorf("jail root on the host holds %v (%v)", ents, err)
	}
}

func TestSpecErrors(t *testing.T) {
	good := Spec{Root: "/r", UID: 1, GID: 1, Argv: []string{"/bin/true"}}
	for name, change := range map[string]func(s *Spec){
		"relative root":   func(s *Spec) { s.Root = "r" },
		"root user":       func(s *Spec) { s.UID = 0 },
		"root group":      func(s *Spec) { s.GID = 0 },
		"no program":      func(s *Spec) { s.Argv = nil },
		"relative target": func(s *Spec) { s.Mounts = []Mount{{Kind: Bind, Source: "/x", Target: "x"}} },
		"root target":     func(s *Spec) { s.Mounts = []Mount{{Kind: Bind, Source: "/x", Target: "/"}} },
		"unknown kind":    func(s *Spec) { s.Mounts = []Mount{{Kind: "overlay", Target: "/x"}} },
	} {
		s := good
		change(&s)
		if _, err := Command(s); !errdefs.IsInvalidArgument(err) {
			t.Errorf("%s: %v, want InvalidArgument", name, err)
		}
	}
	if _, err := Command(good); err != nil {
		t.Fatal(err)
	}
}

func TestLookupUser(t *testing.T) {
	if uid, gid, err := LookupUser("61234:61235"); err != nil || uid != 61234 || gid != 61235 {
		t.Fatalf("61234:61235: %d %d %v", uid, gid, err)
	}
	if uid, gid, err := LookupUser("nobody"); err != nil || uid == 0 || gid == 0 {
		t.Fatalf("nobody: %d %d %v", uid, gid, err)
	}
	for name, is := range map[string]func(error) bool{
		"root":                 errdefs.IsInvalidArgument,
		"0:0":                  errdefs.IsInvalidArgument,
		"5:x":                  errdefs.IsInvalidArgument,
		"no-such-user-caisson": errdefs.IsNotFound,
	} {
		if _, _, err := LookupUser(name); !is(err) {
			t.Errorf("%s: %v", name, err)
		}
	}
}
