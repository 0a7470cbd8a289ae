package container

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/containerd/errdefs"
	"github.com/opencontainers/runc/libcontainer"
	_ "github.com/opencontainers/runc/libcontainer/nsenter"
	"github.com/opencontainers/runc/libcontainer/seccomp"
	"github.com/opencontainers/runc/libcontainer/specconv"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"

	"github.com/caisson-containers/caisson/guest/agent/reaper"
	"github.com/caisson-containers/caisson/internal/testutil"
)

func init() {
	// The test binary is libcontainer's "runc init" too.
	if len(os.Args) > 1 && os.Args[1] == "init" {
		libcontainer.Init()
	}
}

// busyboxRootfs makes a root filesystem of Debian's static busybox.
func busyboxRootfs(t *testing.T) string {
	t.Helper()
	bb := testutil.RequireBinary(t, "busybox")
	root := t.TempDir()
	for _, d := range []string{"bin", "proc", "sys", "dev", "etc", "tmp", "work"} {
		if err := os.MkdirAll(filepath.Join(root, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	data, err := os.ReadFile(bb)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(root, "bin", "busybox"), data, 0o755); err != nil {
		t.Fatal(err)
	}
	for _, applet := range []string{"sh", "echo", "cat", "sleep", "stty", "id", "hostname", "ls", "true", "nc", "wc", "head"} {
		if err := os.Symlink("busybox", filepath.Join(root, "bin", applet)); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.WriteFile(filepath.Join(root, "etc", "secret"), []byte("secret\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	return root
}

func requireSeccomp(t *testing.T) {
	if !seccomp.Enabled {
		t.Skip("built without seccomp support (go test -tags seccomp)")
	}
}

func newTestRuntime(t *testing.T) *Runtime {
	t.Helper()
	testutil.RequireRoot(t)
	if err := reaper.Subreaper(); err != nil {
		t.Fatal(err)
	}
	r := reaper.New()
	go r.Run()
	t.Cleanup(r.Stop)
	parent := fmt.Sprintf("caisson-test-%d", os.Getpid())
	rt, err := NewRuntime(t.TempDir(), "/"+parent, r)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		// libcontainer removes a container's cgroup, not the parent it created.
		dirs, _ := filepath.Glob("/sys/fs/cgroup/*/" + parent)
		if d := "/sys/fs/cgroup/" + parent; fileExists(d) {
			dirs = append(dirs, d)
		}
		for _, d := range dirs {
			if err := os.Remove(d); err != nil {
				t.Errorf("remove cgroup parent: %v", err)
			}
		}
	})
	t.Cleanup(func() {
		ctx := context.Background()
		for _, c := range rt.List() {
			if _, err := rt.Delete(ctx, c.ID(), true); err != nil {
				t.Errorf("cleanup: delete %s: %v", c.ID(), err)
			}
		}
	})
	return rt
}

func fileExists(p string) bool {
	_, err := os.Stat(p)
	return err == nil
}

func testSpec(rootfs string, args ...string) *specs.Spec {
	s := specconv.Example()
	s.Root.Path = rootfs
	s.Root.Readonly = false
	s.Process.Terminal = false
	s.Process.Args = args
	s.Process.Env = []string{"PATH=/bin", "HOME=/"}
	s.Hostname = "caisson-test"
	return s
}

type output struct {
	stdout, stderr bytes.Buffer
	done           chan struct{}
}

// collect reads the process's streams until EOF.
func collect(p *Process) *output {
	o := &output{done: make(chan struct{})}
	n := 0
	if p.Stdout() != nil {
		n++
		go func() { io.Copy(&o.stdout, p.Stdout()); o.done <- struct{}{} }()
	}
	if p.Stderr() != nil {
		n++
		go func() { io.Copy(&o.stderr, p.Stderr()); o.done <- struct{}{} }()
	}
	ch := make(chan struct{})
	go func() {
		for i := 0; i < n; i++ {
			<-o.done
		}
		close(ch)
	}()
	o.done = ch
	return o
}

func wait(t *testing.T, p *Process) Exit {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	e, err := p.Wait(ctx)
	if err != nil {
		t.Fatal(err)
	}
	return e
}

func run(t *testing.T, rt *Runtime, id string, spec *specs.Spec, stdio Stdio) (*Container, *output) {
	t.Helper()
	ctx := context.Background()
	c, err := rt.Create(ctx, CreateOpts{ID: id, Spec: spec, Rootfs: spec.Root.Path, Stdio: stdio})
	if err != nil {
		t.Fatal(err)
	}
	o := collect(c.Init())
	if err := c.Start(ctx); err != nil {
		t.Fatal(err)
	}
	return c, o
}

func TestRun(t *testing.T) {
	rt := newTestRuntime(t)
	rootfs := busyboxRootfs(t)
	for _, tc := range []struct {
		name             string
		args             []string
		wantStatus       int
		wantOut, wantErr string
		spec             func(*testing.T, *specs.Spec)
	}{
		{name: "echo", args: []string{"echo", "hello"}, wantOut: "hello\n"},
		{name: "script exit 3", args: []string{"sh", "-c", "echo out; echo err >&2; exit 3"}, wantStatus: 3, wantOut: "out\n", wantErr: "err\n"},
		{name: "env cwd user", args: []string{"sh", "-c", `echo "$FOO $(pwd) $(id -u):$(id -g) $(id -G)"`},
			wantOut: "bar /tmp 1000:1000 1000 5 7\n", spec: func(t *testing.T, s *specs.Spec) {
				s.Process.Env = append(s.Process.Env, "FOO=bar")
				s.Process.Cwd = "/tmp"
				s.Process.User = specs.User{UID: 1000, GID: 1000, AdditionalGids: []uint32{5, 7}}
			}},
		{name: "hostname", args: []string{"hostname"}, wantOut: "caisson-test\n"},
		{name: "read-only rootfs", args: []string{"sh", "-c", "touch /x 2>/dev/null || echo ro"}, wantOut: "ro\n",
			spec: func(t *testing.T, s *specs.Spec) { s.Root.Readonly = true }},
		{name: "rlimit", args: []string{"sh", "-c", "ulimit -n"}, wantOut: "77\n", spec: func(t *testing.T, s *specs.Spec) {
			s.Process.Rlimits = []specs.POSIXRlimit{{Type: "RLIMIT_NOFILE", Hard: 77, Soft: 77}}
		}},
		{name: "no_new_privileges", args: []string{"sh", "-c", "grep NoNewPrivs /proc/self/status"}, wantOut: "NoNewPrivs:\t1\n",
			spec: func(t *testing.T, s *specs.Spec) { s.Process.NoNewPrivileges = true }},
		{name: "masked and read-only paths", args: []string{"sh", "-c", "cat /etc/secret; touch /work/x 2>/dev/null || echo ro"}, wantOut: "ro\n",
			spec: func(t *testing.T, s *specs.Spec) {
				s.Linux.MaskedPaths = append(s.Linux.MaskedPaths, "/etc/secret")
				s.Linux.ReadonlyPaths = append(s.Linux.ReadonlyPaths, "/work")
			}},
		{name: "sysctl", args: []string{"cat", "/proc/sys/net/ipv4/ip_forward"}, wantOut: "1\n",
			spec: func(t *testing.T, s *specs.Spec) { s.Linux.Sysctl = map[string]string{"net.ipv4.ip_forward": "1"} }},
		{name: "capabilities", args: []string{"sh", "-c", "grep CapEff /proc/self/status"}, wantOut: "CapEff:\t0000000000000400\n",
			spec: func(t *testing.T, s *specs.Spec) {
				caps := []string{"CAP_NET_BIND_SERVICE"}
				s.Process.Capabilities = &specs.LinuxCapabilities{Bounding: caps, Effective: caps, Permitted: caps}
			}},
		{name: "seccomp", args: []string{"sh", "-c", "mkdir /tmp/d 2>/dev/null || echo denied"}, wantOut: "denied\n",
			spec: func(t *testing.T, s *specs.Spec) {
				requireSeccomp(t)
				s.Linux.Seccomp = &specs.LinuxSeccomp{DefaultAction: specs.ActAllow, Syscalls: []specs.LinuxSyscall{
					{Names: []string{"mkdir", "mkdirat"}, Action: specs.ActErrno}}}
			}},
		{name: "big output not lost at exit", args: []string{"sh", "-c", "i=0; while [ $i -lt 2000 ]; do echo 0123456789012345678901234567890123456789; i=$((i+1)); done"},
			wantOut: strings.Repeat("0123456789012345678901234567890123456789\n", 2000)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			spec := testSpec(rootfs, tc.args...)
			if tc.spec != nil {
				tc.spec(t, spec)
			}
			id := strings.ReplaceAll(tc.name, " ", "-")
			c, o := run(t, rt, id, spec, Stdio{Stdout: true, Stderr: true})
			e := wait(t, c.Init())
			<-o.done
			if e.Status != tc.wantStatus {
				t.Errorf("status %d, want %d (stderr %q)", e.Status, tc.wantStatus, o.stderr.String())
			}
			if got := o.stdout.String(); got != tc.wantOut {
				t.Errorf("stdout %q, want %q", truncate(got), truncate(tc.wantOut))
			}
			if got := o.stderr.String(); got != tc.wantErr {
				t.Errorf("stderr %q, want %q", got, tc.wantErr)
			}
			if _, err := rt.Delete(context.Background(), id, false); err != nil {
				t.Fatal(err)
			}
		})
	}
}

func truncate(s string) string {
	if len(s) > 200 {
		return s[:200] + fmt.Sprintf("...(%d bytes)", len(s))
	}
	return s
}

func TestKillExecStdin(t *testing.T) {
	rt := newTestRuntime(t)
	rootfs := busyboxRootfs(t)
	ctx := context.Background()

	c, _ := run(t, rt, "sleeper", testSpec(rootfs, "sleep", "1000"), Stdio{})

	// exec with stdin: cat echoes until stdin is closed.
	p, err := c.Exec(ctx, "cat", &specs.Process{Args: []string{"cat"}, Cwd: "/", Env: []string{"PATH=/bin"}}, Stdio{Stdin: true, Stdout: true, Stderr: true})
	if err != nil {
		t.Fatal(err)
	}
	o := collect(p)
	if _, err := io.WriteString(p.Stdin(), "through stdin\n"); err != nil {
		t.Fatal(err)
	}
	if err := p.CloseStdin(); err != nil {
		t.Fatal(err)
	}
	if e := wait(t, p); e.Status != 0 {
		t.Errorf("cat exit %d", e.Status)
	}
	<-o.done
	if o.stdout.String() != "through stdin\n" {
		t.Errorf("cat stdout %q", o.stdout.String())
	}
	if _, err := c.Exec(ctx, "cat", &specs.Process{Args: []string{"true"}, Cwd: "/"}, Stdio{}); !errdefs.IsAlreadyExists(err) {
		t.Errorf("duplicate exec id: %v, want AlreadyExists", err)
	}
	if _, err := c.DeleteExec("cat"); err != nil {
		t.Fatal(err)
	}

	// An exec deleted before it started counts as exited; its waiters are released.
	if _, err := c.CreateExec(ctx, "never", &specs.Process{Args: []string{"true"}, Cwd: "/"}, Stdio{Stdout: true}); err != nil {
		t.Fatal(err)
	}
	never, _ := c.Process("never")
	if e, err := c.DeleteExec("never"); err != nil || e.Status != 255 {
		t.Errorf("delete of an exec never started: %+v, %v", e, err)
	}
	if e := wait(t, never); e.Status != 255 {
		t.Errorf("wait for an exec never started: %+v", e)
	}

	if _, err := c.Exec(ctx, "nobin", &specs.Process{Args: []string{"/bin/nope"}, Cwd: "/"}, Stdio{}); !errdefs.IsNotFound(err) {
		t.Errorf("exec of a missing binary: %v, want NotFound", err)
	}
	pids, err := c.Pids()
	if id, ok := pids[c.Init().Pid()]; err != nil || len(pids) != 1 || !ok || id != "" {
		t.Errorf("pids %v (%v), want only %d", pids, err, c.Init().Pid())
	}
	st, err := c.Stats()
	if err != nil {
		t.Fatal(err)
	}
	if st.PidsStats.Current != 1 || st.MemoryStats.Usage.Usage == 0 {
		t.Errorf("stats: pids %d memory %d", st.PidsStats.Current, st.MemoryStats.Usage.Usage)
	}
	limit := int64(64 << 20)
	if err := c.Update(ctx, &specs.LinuxResources{Memory: &specs.LinuxMemory{Limit: &limit}}); err != nil {
		t.Fatal(err)
	}
	if st, err = c.Stats(); err != nil || st.MemoryStats.Usage.Limit != uint64(limit) {
		t.Errorf("memory limit after update: %d (%v), want %d", st.MemoryStats.Usage.Limit, err, limit)
	}
	if err := c.Pause(); err != nil {
		t.Fatal(err)
	}
	if s, _ := c.Status(); s != "paused" {
		t.Errorf("status %q after pause", s)
	}
	if err := c.Resume(); err != nil {
		t.Fatal(err)
	}

	if err := c.Kill(ctx, unix.SIGKILL, false); err != nil {
		t.Fatal(err)
	}
	if e := wait(t, c.Init()); e.Status != 137 {
		t.Errorf("killed exit %d, want 137", e.Status)
	}
	if _, err := c.Exec(ctx, "late", &specs.Process{Args: []string{"true"}, Cwd: "/"}, Stdio{}); !errdefs.IsFailedPrecondition(err) {
		t.Errorf("exec into a stopped container: %v, want FailedPrecondition", err)
	}
}

func TestTerminal(t *testing.T) {
	rt := newTestRuntime(t)
	rootfs := busyboxRootfs(t)
	spec := testSpec(rootfs, "sh", "-c", "read line; stty size; echo got $line")
	spec.Process.Terminal = true
	spec.Process.ConsoleSize = &specs.Box{Width: 80, Height: 25}
	c, o := run(t, rt, "tty", spec, Stdio{Terminal: true, Stdin: true, Stdout: true})
	p := c.Init()
	if p.Stderr() != nil {
		t.Error("a terminal process has a separate stderr")
	}
	if err := p.Resize(100, 40); err != nil {
		t.Fatal(err)
	}
	if _, err := io.WriteString(p.Stdin(), "typed\n"); err != nil {
		t.Fatal(err)
	}
	if e := wait(t, p); e.Status != 0 {
		t.Errorf("exit %d", e.Status)
	}
	<-o.done
	out := strings.ReplaceAll(o.stdout.String(), "\r", "")
	if !strings.Contains(out, "40 100\n") || !strings.Contains(out, "got typed\n") {
		t.Errorf("terminal output %q, want the resized size and the line", out)
	}
}

func TestTerminalStdinEOF(t *testing.T) {
	rt := newTestRuntime(t)
	rootfs := busyboxRootfs(t)
	spec := testSpec(rootfs, "sh", "-c", "cat; echo eof")
	spec.Process.Terminal = true
	c, o := run(t, rt, "tty-eof", spec, Stdio{Terminal: true, Stdin: true, Stdout: true})
	if err := c.Init().CloseStdin(); err != nil {
		t.Fatal(err)
	}
	if e := wait(t, c.Init()); e.Status != 0 {
		t.Errorf("exit %d", e.Status)
	}
	<-o.done
	if !strings.Contains(o.stdout.String(), "eof") {
		t.Errorf("output %q", o.stdout.String())
	}
}

func TestBadInput(t *testing.T) {
	rt := newTestRuntime(t)
	rootfs := busyboxRootfs(t)
	ctx := context.Background()
	c, _ := run(t, rt, "good", testSpec(rootfs, "sleep", "1000"), Stdio{})

	for _, tc := range []struct {
		name string
		id   string
		spec func() *specs.Spec
		want func(error) bool
		says string // the error names it
	}{
		{name: "duplicate id", id: "good", spec: func() *specs.Spec { return testSpec(rootfs, "true") }, want: errdefs.IsAlreadyExists},
		{name: "relative cwd", id: "relcwd", spec: func() *specs.Spec {
			s := testSpec(rootfs, "true")
			s.Process.Cwd = "tmp"
			return s
		}, want: errdefs.IsInvalidArgument},
		{name: "no such binary", id: "nobin", spec: func() *specs.Spec { return testSpec(rootfs, "/no/such/binary") }, want: errdefs.IsNotFound},
		{name: "no such command in PATH", id: "nocmd", spec: func() *specs.Spec { return testSpec(rootfs, "nope") }, want: errdefs.IsNotFound},
		{name: "not executable", id: "noexec", spec: func() *specs.Spec { return testSpec(rootfs, "/etc/secret") }, want: errdefs.IsNotFound},
		{name: "bad id", id: "../x", spec: func() *specs.Spec { return testSpec(rootfs, "true") }, want: errdefs.IsInvalidArgument},
		{name: "unknown capability", id: "cap", spec: func() *specs.Spec {
			s := testSpec(rootfs, "true")
			s.Process.Capabilities = &specs.LinuxCapabilities{Bounding: []string{"CAP_CHOWN", "CAP_NO_SUCH_THING"}}
			return s
		}, want: errdefs.IsInvalidArgument, says: "CAP_NO_SUCH_THING"},
		{name: "sysctl outside the container's namespaces", id: "sysctl", spec: func() *specs.Spec {
			s := testSpec(rootfs, "true")
			s.Linux.Sysctl = map[string]string{"vm.swappiness": "10"}
			return s
		}, want: errdefs.IsInvalidArgument, says: "vm.swappiness"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := tc.spec()
			_, err := rt.Create(ctx, CreateOpts{ID: tc.id, Spec: s, Rootfs: s.Root.Path})
			if !tc.want(err) || !strings.Contains(fmt.Sprint(err), tc.says) {
				t.Fatalf("err = %v", err)
			}
			t.Log(err)
		})
	}
	if _, err := rt.Get("nope"); !errdefs.IsNotFound(err) {
		t.Errorf("unknown container: %v, want NotFound", err)
	}
	if _, err := rt.Delete(ctx, "nope", false); !errdefs.IsNotFound(err) {
		t.Errorf("delete unknown container: %v, want NotFound", err)
	}
	// The runtime still works after the failures.
	if s, err := c.Status(); err != nil || s != "running" {
		t.Errorf("good container %q (%v)", s, err)
	}
	c2, o := run(t, rt, "after", testSpec(rootfs, "echo", "still serving"), Stdio{Stdout: true})
	wait(t, c2.Init())
	<-o.done
	if o.stdout.String() != "still serving\n" {
		t.Errorf("stdout %q", o.stdout.String())
	}
	if len(rt.List()) != 2 {
		t.Errorf("containers %d, want 2 (failed creates must leave nothing)", len(rt.List()))
	}
	_ = errors.Is
}

// TestSharedPIDNamespaceInitExit: a container in another's PID namespace (the CRI's pod
// PID namespace) whose init exits leaving a child behind has that child killed, so its
// streams reach EOF and its exit is reported, as on runc.
func TestSharedPIDNamespaceInitExit(t *testing.T) {
	rt := newTestRuntime(t)
	holder, _ := run(t, rt, "holder", testSpec(busyboxRootfs(t), "sleep", "1000"), Stdio{})
	s := testSpec(busyboxRootfs(t), "sh", "-c", "sleep 1000 & echo started")
	for i := range s.Linux.Namespaces {
		if s.Linux.Namespaces[i].Type == specs.PIDNamespace {
			s.Linux.Namespaces[i].Path = fmt.Sprintf("/proc/%d/ns/pid", holder.Init().Pid())
		}
	}
	c, o := run(t, rt, "joiner", s, Stdio{Stdout: true})
	wait(t, c.Init())
	select {
	case <-o.done:
	case <-time.After(30 * time.Second):
		t.Fatal("stdout did not reach EOF: the child the init left behind still holds it")
	}
	if got := o.stdout.String(); got != "started\n" {
		t.Errorf("stdout %q", got)
	}
}
