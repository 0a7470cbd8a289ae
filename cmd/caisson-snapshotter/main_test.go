package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/core/snapshots/proxy"
	"github.com/containerd/containerd/v2/core/snapshots/testsuite"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/caisson-containers/caisson/internal/testutil"
)

var (
	daemonOnce sync.Once
	daemonDir  string
	daemonBin  string
	daemonErr  error
)

// buildDaemon builds this command into a temporary directory once per test binary.
func buildDaemon(t testing.TB) string {
	t.Helper()
	testutil.RequireRoot(t)
	testutil.RequireBinary(t, "mkfs.erofs")
	testutil.RequireBinary(t, "mkfs.ext4")
	daemonOnce.Do(func() {
		dir, err := os.MkdirTemp("", "caisson-snapshotter-bin-")
		if err != nil {
			daemonErr = err
			return
		}
		daemonDir = dir
		daemonBin = filepath.Join(dir, "caisson-snapshotter")
		out, err := exec.Command("go", "build", "-o", daemonBin, ".").CombinedOutput()
		if err != nil {
			daemonErr = fmt.Errorf("go build: %v: %s", err, out)
		}
	})
	if daemonErr != nil {
		t.Fatal(daemonErr)
	}
	return daemonBin
}

func TestMain(m *testing.M) {
	code := m.Run()
	if daemonDir != "" {
		os.RemoveAll(daemonDir)
	}
	os.Exit(code)
}

// daemon is a running caisson-snapshotter process.
type daemon struct {
	cmd     *exec.Cmd
	address string
	conn    *grpc.ClientConn
	exited  chan error
}

// startDaemon runs the binary on root with config file cfg ("" for none) and
// connects to it.
func startDaemon(t testing.TB, root, address, cfg string) *daemon {
	t.Helper()
	bin := buildDaemon(t)
	args := []string{"--root", root, "--address", address, "--log-level", "debug"}
	if cfg != "" {
		args = append(args, "--config", cfg)
	}
	cmd := exec.Command(bin, args...)
	logf, err := os.Create(filepath.Join(filepath.Dir(address), filepath.Base(address)+".log"))
	if err != nil {
		t.Fatal(err)
	}
	defer logf.Close()
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	d := &daemon{cmd: cmd, address: address, exited: make(chan error, 1)}
	go func() { d.exited <- cmd.Wait() }()
	deadline := time.Now().Add(20 * time.Second)
	for {
		// Dial, not stat: a killed daemon leaves its socket file behind.
		if c, err := net.Dial("unix", address); err == nil {
			c.Close()
			break
		}
		select {
		case err := <-d.exited:
			log, _ := os.ReadFile(logf.Name())
			t.Fatalf("caisson-snapshotter exited at start: %v\n%s", err, log)
		case <-time.After(20 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			cmd.Process.Kill()
			<-d.exited
			t.Fatal("caisson-snapshotter did not create its socket")
		}
	}
	conn, err := grpc.NewClient("unix://"+address, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		cmd.Process.Kill()
		<-d.exited
		t.Fatal(err)
	}
	d.conn = conn
	return d
}

func (d *daemon) snapshotter() snapshots.Snapshotter {
	return proxy.NewSnapshotter(snapshotsapi.NewSnapshotsClient(d.conn), "caisson")
}

// stop sends SIGTERM and expects a clean exit that removes the socket.
func (d *daemon) stop() error {
	d.conn.Close()
	if err := d.cmd.Process.Signal(syscall.SIGTERM); err != nil && !errors.Is(err, os.ErrProcessDone) {
		return err
	}
	select {
	case err := <-d.exited:
		if err != nil {
			return fmt.Errorf("caisson-snapshotter exited with %v after SIGTERM", err)
		}
	case <-time.After(60 * time.Second):
		d.cmd.Process.Kill()
		<-d.exited
		return errors.New("caisson-snapshotter did not stop on SIGTERM")
	}
	if _, err := os.Stat(d.address); !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("socket %s left behind after SIGTERM", d.address)
	}
	return nil
}

// kill sends SIGKILL and waits for the process.
func (d *daemon) kill() {
	d.conn.Close()
	d.cmd.Process.Kill()
	<-d.exited
}

// writeConfig writes the config the suite needs on this host (see the in-process
// suite in package snapshotter for why redirect_dir=on).
func writeConfig(t testing.TB, dir, writableSize string) string {
	t.Helper()
	p := filepath.Join(dir, "config.toml")
	cfg := fmt.Sprintf("default_writable_size = %q\noverlay_options = [\"redirect_dir=on\"]\n", writableSize)
	if err := os.WriteFile(p, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

// TestProxySuite runs containerd's snapshotter conformance suite through the
// daemon's socket, one daemon per case, each stopped with SIGTERM.
func TestProxySuite(t *testing.T) {
	buildDaemon(t)
	testsuite.SnapshotterSuite(t, "caisson", func(ctx context.Context, root string) (snapshots.Snapshotter, func() error, error) {
		dir := filepath.Dir(root)
		d := startDaemon(t, root, filepath.Join(dir, "snapshotter.sock"), writeConfig(t, dir, "64MiB"))
		return d.snapshotter(), d.stop, nil
	})
}

// TestBadConfig: a config error stops the daemon at start with a message naming
// the problem, and it serves nothing.
func TestBadConfig(t *testing.T) {
	bin := buildDaemon(t)
	dir := t.TempDir()
	cfg := filepath.Join(dir, "bad.toml")
	if err := os.WriteFile(cfg, []byte("default_writable_size = \"1GiB\"\nlayer_fs = \"erofs\"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(dir, "s.sock")
	out, err := exec.Command(bin, "--root", filepath.Join(dir, "root"), "--address", sock, "--config", cfg).CombinedOutput()
	var ee *exec.ExitError
	if !errors.As(err, &ee) || ee.ExitCode() != 1 {
		t.Fatalf("exit: %v, want status 1", err)
	}
	if !strings.Contains(string(out), `unknown configuration key "layer_fs"`) {
		t.Fatalf("output %q does not name the unknown key", out)
	}
	if _, err := os.Stat(sock); !errors.Is(err, os.ErrNotExist) {
		t.Fatal("a socket was created despite the bad config")
	}
}
