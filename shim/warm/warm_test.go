package warm

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"
)

// The test binary is also the warm shim of these tests (helperEnv set): it owns the slot
// whose lock it inherited as descriptor 3, waits for a claim, and serves the claimed
// socket by answering "served <bundle>" on each connection.
const helperEnv = "CAISSON_WARM_TEST_HELPER"

func TestMain(m *testing.M) {
	if dir := os.Getenv(helperEnv); dir != "" {
		os.Exit(helper(dir))
	}
	os.Exit(m.Run())
}

func helper(dir string) int {
	idle, _ := time.ParseDuration(os.Getenv(helperEnv + "_IDLE"))
	if idle == 0 {
		idle = time.Minute
	}
	if err := Own(dir); err != nil {
		return 1
	}
	w, err := Listen(dir)
	if err != nil {
		return 1
	}
	ctx, cancel := context.WithCancel(context.Background())
	go func() {
		ch := make(chan os.Signal, 1)
		signal.Notify(ch, syscall.SIGTERM)
		<-ch
		cancel()
	}()
	c, f, err := w.Wait(ctx, idle)
	if err != nil {
		return 0 // idle or terminated: the slot goes with the lock
	}
	l, err := net.FileListener(f)
	if err != nil {
		return 1
	}
	for {
		conn, err := l.Accept()
		if err != nil {
			return 1
		}
		fmt.Fprintf(conn, "served %s %s", c.Bundle, strings.Join(c.Args, " "))
		conn.Close()
	}
}

// startHelper is Fill's start: the helper inherits the slot's lock.
func startHelper(t *testing.T, idle time.Duration, cmds *[]*exec.Cmd) func(string, *os.File) error {
	return func(slot string, lock *os.File) error {
		cmd := exec.Command(os.Args[0], "-test.run=^$")
		cmd.Env = append(os.Environ(), helperEnv+"="+slot, helperEnv+"_IDLE="+idle.String())
		cmd.ExtraFiles = []*os.File{lock}
		if err := cmd.Start(); err != nil {
			return err
		}
		*cmds = append(*cmds, cmd)
		t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
		return nil
	}
}

func waitReady(t *testing.T, p *Pool, n int) []Slot {
	t.Helper()
	for end := time.Now().Add(20 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		slots, err := p.Slots()
		if err != nil {
			t.Fatal(err)
		}
		var ready []Slot
		for _, s := range slots {
			if s.Ready {
				ready = append(ready, s)
			}
		}
		if len(ready) == n {
			return ready
		}
		if time.Now().After(end) {
			t.Fatalf("%d slots ready, want %d: %+v", len(ready), n, slots)
		}
	}
}

// shimSocket is a listening socket as `start` makes for a pod's shim.
func shimSocket(t *testing.T) (string, *os.File) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "s.sock")
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	f, err := l.File()
	if err != nil {
		t.Fatal(err)
	}
	l.SetUnlinkOnClose(false)
	l.Close() // f keeps the socket listening
	t.Cleanup(func() { f.Close() })
	return path, f
}

func dialRead(t *testing.T, path string) string {
	t.Helper()
	c, err := net.Dial("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	b := make([]byte, 4096)
	n, _ := c.Read(b)
	return string(b[:n])
}

// TestPoolLifecycle fills a pool, claims a shim from it (which then serves the socket
// it was handed), refills, sweeps the slot of a killed shim (kept while the pool's
// Release fails for it, removed once it succeeds) and drains the rest, leaving nothing
// but the claimed shim's slot.
func TestPoolLifecycle(t *testing.T) {
	root := t.TempDir()
	var released []string
	var releaseErr error
	p, err := Open(filepath.Join(root, Dir, "pool"), func(dir string) error {
		released = append(released, dir)
		return releaseErr
	})
	if err != nil {
		t.Fatal(err)
	}
	var cmds []*exec.Cmd
	start := startHelper(t, time.Minute, &cmds)
	if n, err := p.Fill(2, start); err != nil || n != 2 {
		t.Fatalf("Fill: %d, %v", n, err)
	}
	if n, err := p.Fill(2, start); err != nil || n != 0 {
		t.Fatalf("Fill of a full pool (warming up): %d, %v", n, err)
	}
	waitReady(t, p, 2)

	path, listener := shimSocket(t)
	bundle := t.TempDir()
	slot, err := p.Claim(Claim{Args: []string{"-id", "pod1"}, Bundle: bundle}, listener)
	if err != nil || slot == "" {
		t.Fatalf("Claim: %q, %v", slot, err)
	}
	listener.Close()
	if got, want := dialRead(t, path), "served "+bundle+" -id pod1"; got != want {
		t.Fatalf("the pod's socket: %q, want %q", got, want)
	}
	if slotOf(slot).Claimed == "" {
		t.Fatal("the claimed slot is not marked")
	}
	if _, err := os.Stat(filepath.Join(slot, claimSocket)); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("the claimed slot still listens: %v", err)
	}
	if n, err := p.Fill(2, start); err != nil || n != 1 {
		t.Fatalf("refill after a claim: %d, %v", n, err)
	}
	ready := waitReady(t, p, 2)

	// A shim killed outright leaves its slot, which the next sweep removes.
	syscall.Kill(ready[0].Pid, syscall.SIGKILL)
	for end := time.Now().Add(10 * time.Second); held(ready[0].Dir); time.Sleep(20 * time.Millisecond) {
		if time.Now().After(end) {
			t.Fatal("the killed shim's lock is still held")
		}
	}
	releaseErr = errors.New("its cgroup still holds a process")
	if waiting, err := p.Sweep(); !errors.Is(err, releaseErr) || waiting != 1 {
		t.Fatalf("Sweep with the dead slot's release failing: %d waiting, %v", waiting, err)
	}
	if _, err := os.Stat(ready[0].Dir); err != nil {
		t.Fatalf("the killed shim's slot, not released: %v", err)
	}
	// The slot kept does not keep the pool from filling.
	if n, err := p.Fill(2, start); !errors.Is(err, releaseErr) || n != 1 {
		t.Fatalf("Fill beside a slot not released: %d started, %v; want 1 and the release's error", n, err)
	}
	waitReady(t, p, 2)
	releaseErr = nil
	if waiting, err := p.Sweep(); err != nil || waiting != 2 {
		t.Fatalf("Sweep: %d waiting, %v", waiting, err)
	}
	if _, err := os.Stat(ready[0].Dir); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("the killed shim's slot: %v", err)
	}
	if want := []string{ready[0].Dir, ready[0].Dir, ready[0].Dir}; !slices.Equal(released, want) {
		t.Fatalf("released %v, want the dead slot three times (two sweeps kept it)", released)
	}

	n, err := Drain(root, 10*time.Second, nil)
	if err != nil || n != 2 {
		t.Fatalf("Drain: %d, %v", n, err)
	}
	slots, _ := p.Slots()
	if len(slots) != 1 || slots[0].Dir != slot || !slots[0].Live {
		t.Fatalf("after Drain: %+v, want only the claimed slot %s", slots, slot)
	}
	if got := dialRead(t, path); !strings.HasPrefix(got, "served") {
		t.Fatalf("Drain ended the claimed shim: %q", got)
	}
	if err := RemoveSlot(slot); err == nil {
		t.Fatal("RemoveSlot of a live shim's slot succeeded")
	}
}

// TestClaimRefused: claims that are not sound are answered with an error, the shim
// keeps waiting, and a sound claim after them is taken.
func TestClaimRefused(t *testing.T) {
	p, err := Open(filepath.Join(t.TempDir(), Dir, "pool"), nil)
	if err != nil {
		t.Fatal(err)
	}
	var cmds []*exec.Cmd
	if _, err := p.Fill(1, startHelper(t, time.Minute, &cmds)); err != nil {
		t.Fatal(err)
	}
	slot := waitReady(t, p, 1)[0].Dir
	sock := filepath.Join(slot, claimSocket)

	notListening, err := os.Open(os.DevNull)
	if err != nil {
		t.Fatal(err)
	}
	defer notListening.Close()
	_, listener := shimSocket(t)
	for _, tc := range []struct {
		name string
		msg  string
		fd   *os.File
	}{
		{"not JSON", "{", listener},
		{"no bundle", `{"Bundle":"/nonexistent"}`, listener},
		{"relative bundle", `{"Bundle":"."}`, listener},
		{"not a socket", `{"Bundle":"/"}`, notListening},
	} {
		if claimOne(sock, []byte(tc.msg), tc.fd) {
			t.Fatalf("%s: claim taken", tc.name)
		}
	}
	path, listener := shimSocket(t)
	if got, err := p.Claim(Claim{Bundle: "/"}, listener); err != nil || got != slot {
		t.Fatalf("a sound claim after refused ones: %q, %v", got, err)
	}
	listener.Close()
	if got := dialRead(t, path); got != "served / " {
		t.Fatalf("the pod's socket: %q", got)
	}
}

// TestIdleShimGoes: a shim no pod claimed within its idle timeout ends, and its slot is
// swept; a pool without ready shims claims nothing.
func TestIdleShimGoes(t *testing.T) {
	p, err := Open(filepath.Join(t.TempDir(), Dir, "pool"), nil)
	if err != nil {
		t.Fatal(err)
	}
	var cmds []*exec.Cmd
	if _, err := p.Fill(1, startHelper(t, 500*time.Millisecond, &cmds)); err != nil {
		t.Fatal(err)
	}
	if err := cmds[0].Wait(); err != nil {
		t.Fatalf("the idle shim: %v", err)
	}
	if waiting, err := p.Sweep(); err != nil || waiting != 0 {
		t.Fatalf("Sweep: %d, %v", waiting, err)
	}
	_, listener := shimSocket(t)
	if slot, err := p.Claim(Claim{Bundle: "/"}, listener); err != nil || slot != "" {
		t.Fatalf("Claim from an empty pool: %q, %v", slot, err)
	}
}

// TestPoolDir: the pool's name changes with each part of its key.
func TestPoolDir(t *testing.T) {
	dir := t.TempDir()
	cfgA, cfgB := filepath.Join(dir, "a.toml"), filepath.Join(dir, "b.toml")
	os.WriteFile(cfgA, []byte("[hypervisor]\nwarm_vms = 1\n"), 0o600)
	os.WriteFile(cfgB, []byte("[hypervisor]\nwarm_vms = 1\n"), 0o600)
	exe, _ := os.Executable()
	base := Key{Exe: exe, ConfigPath: cfgA, Namespace: "k8s.io", Address: "/run/containerd/containerd.sock"}
	want, err := PoolDir("/run/caisson", base)
	if err != nil {
		t.Fatal(err)
	}
	if again, _ := PoolDir("/run/caisson", base); again != want {
		t.Fatalf("the same key gives %s and %s", want, again)
	}
	if len(want) != len("/run/caisson/warm/")+12 {
		t.Fatalf("pool dir %s", want)
	}
	for name, change := range map[string]func(k *Key){
		"namespace":      func(k *Key) { k.Namespace = "default" },
		"address":        func(k *Key) { k.Address = "/other.sock" },
		"config path":    func(k *Key) { k.ConfigPath = cfgB },
		"config content": func(k *Key) { os.WriteFile(cfgA, []byte("[hypervisor]\nwarm_vms = 2\n"), 0o600) },
	} {
		k := base
		change(&k)
		if got, err := PoolDir("/run/caisson", k); err != nil || got == want {
			t.Errorf("%s changed: %s, %v", name, got, err)
		}
		os.WriteFile(cfgA, []byte("[hypervisor]\nwarm_vms = 1\n"), 0o600)
	}
	if _, err := PoolDir("/run/caisson", Key{Exe: "/nonexistent"}); err == nil {
		t.Error("a missing binary gives a pool")
	}
}
