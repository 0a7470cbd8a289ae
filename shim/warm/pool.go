// Package warm is the pool of warm VMs (hypervisor.warm_vms): shims started ahead of
// their pods, each holding a VM restored from the configuration's template and warmed
// up, each waiting for a pod's first container to claim it. This package holds the
// pool's files and its protocol; what a warm VM is belongs to shim/pod, and who starts
// and claims warm shims to shim/manager.
//
// A pool is one directory per shim binary, configuration, containerd and namespace,
// below the configuration's state_dir (root's only). Each waiting shim has a slot:
//
//	<state_dir>/warm/<pool>/<slot>/lock        flock'd by the slot's shim for its whole life
//	<state_dir>/warm/<pool>/<slot>/pid         the shim's pid
//	<state_dir>/warm/<pool>/<slot>/claim.sock  where it waits, once its VM is warm
//	<state_dir>/warm/<pool>/<slot>/claimed     the pod that claimed it (then it is that pod's shim)
//	<state_dir>/warm/<pool>/<slot>/...         the VM's own state (pod.StateDir's layout)
//
// The lock is taken by whoever makes the slot (Fill) and inherited by the shim it starts,
// so a slot is never unowned while it is being set up: a slot whose lock is free belongs
// to a shim that died, and is released (the pool's Release: the VM's cgroup) and removed
// (Sweep). Nothing of a warm VM outlives its shim: QEMU dies with it (Pdeathsig) and the
// slot is swept.
//
// Claiming: `shim start` connects to a slot's claim.sock and sends one Claim (JSON) with
// the listening socket of the pod's shim attached (SCM_RIGHTS). The warm shim removes
// claim.sock, answers "ok" and goes on as that pod's shim. Any other answer, or none
// within ClaimTimeout, and `start` tries the next slot, then starts a shim as it would
// without a pool.
package warm

import (
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// Dir is where, under the configuration's state_dir, the pools are.
const Dir = "warm"

// Files of a slot.
const (
	lockFile    = "lock"
	pidFile     = "pid"
	claimSocket = "claim.sock"
	claimedFile = "claimed"
)

// ClaimTimeout bounds how long `start` waits for a warm shim's answer.
const ClaimTimeout = 5 * time.Second

// Key is what makes a warm VM right for a pod: a warm shim is the binary that would
// serve the pod, under the same configuration, for the same containerd and namespace.
type Key struct {
	// Exe is the shim binary.
	Exe string
	// ConfigPath is the configuration's file ("" for the defaults).
	ConfigPath string
	Namespace  string
	// Address is containerd's.
	Address string
}

// PoolDir is the pool of k under stateDir. The binary is named by its file's identity
// and the configuration by its content, so that an upgraded shim or an edited
// configuration starts a new pool (the old one's shims end at their idle timeout, or by
// `caisson warm remove`).
func PoolDir(stateDir string, k Key) (string, error) {
	h := sha256.New()
	st, err := os.Stat(k.Exe)
	if err != nil {
		return "", fmt.Errorf("warm VM pool: the shim binary: %w", err)
	}
	sys, _ := st.Sys().(*syscall.Stat_t)
	var ino uint64
	if sys != nil {
		ino = sys.Ino
	}
	fmt.Fprintf(h, "exe %s %d %d %d\n", k.Exe, ino, st.Size(), st.ModTime().UnixNano())
	fmt.Fprintf(h, "config %q\n", k.ConfigPath)
	if k.ConfigPath != "" {
		b, err := os.ReadFile(k.ConfigPath)
		if err != nil {
			return "", fmt.Errorf("warm VM pool: the configuration: %w", err)
		}
		h.Write(b)
	}
	fmt.Fprintf(h, "\nnamespace %q address %q\n", k.Namespace, k.Address)
	// 12 hex digits: a slot's sockets must stay within a unix socket path's length
	// (config.MaxStateDirLen counts on 38 bytes below state_dir for a pod's directory).
	return filepath.Join(stateDir, Dir, hex.EncodeToString(h.Sum(nil))[:12]), nil
}

// Claim is what `start` sends the warm shim it hands a pod to: what the shim it would
// have started gets (its arguments, environment and working directory).
type Claim struct {
	// Args are the shim's arguments after the binary's name.
	Args []string
	// Env is its environment.
	Env []string
	// Bundle is its working directory: the bundle of the pod's first container.
	Bundle string
}

// Pool is one pool's directory.
type Pool struct {
	dir     string
	release Release
}

// Release frees what the slot in dir, whose shim died, holds outside the directory (its
// VM's cgroup), before the sweep removes the slot. It must not wait: the sweep runs in a
// container's start. An error keeps the slot for the next sweep.
type Release func(dir string) error

// Open returns the pool in dir, made if missing (root's only), whose sweeps call release
// (nil: none) for each slot of a dead shim.
func Open(dir string, release Release) (*Pool, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("warm VM pool: %w", err)
	}
	return &Pool{dir: dir, release: release}, nil
}

// Dir is the pool's directory.
func (p *Pool) Dir() string { return p.dir }

// Slot is one slot of a pool, as a listing sees it.
type Slot struct {
	Dir string
	// Pid is the slot's shim (0 if it has not written it yet).
	Pid int
	// Live: a shim holds the slot.
	Live bool
	// Ready: its VM is warm and it waits for a pod.
	Ready bool
	// Claimed names the pod it serves ("namespace/id"), once claimed.
	Claimed string
}

// Slots lists the pool's slots.
func (p *Pool) Slots() ([]Slot, error) {
	entries, err := os.ReadDir(p.dir)
	if err != nil {
		return nil, err
	}
	var slots []Slot
	for _, e := range entries {
		if !e.IsDir() {
			continue
		}
		slots = append(slots, slotOf(filepath.Join(p.dir, e.Name())))
	}
	return slots, nil
}

func slotOf(dir string) Slot {
	s := Slot{Dir: dir, Live: held(dir)}
	if b, err := os.ReadFile(filepath.Join(dir, pidFile)); err == nil {
		s.Pid, _ = strconv.Atoi(strings.TrimSpace(string(b)))
	}
	if b, err := os.ReadFile(filepath.Join(dir, claimedFile)); err == nil {
		s.Claimed = string(b)
	}
	_, err := os.Stat(filepath.Join(dir, claimSocket))
	s.Ready = err == nil && s.Live && s.Claimed == ""
	return s
}

// held reports whether a shim holds the slot in dir (its lock is taken).
func held(dir string) bool {
	f, err := os.Open(filepath.Join(dir, lockFile))
	if err != nil {
		// No lock file: a slot Fill is making holds its lock already; any other has gone.
		return false
	}
	defer f.Close()
	if err := unix.Flock(int(f.Fd()), unix.LOCK_SH|unix.LOCK_NB); err != nil {
		return true
	}
	return false
}

// Sweep removes the slots no shim holds: those of shims that died, released first (the
// pool's Release). It returns how many slots are held and not claimed (waiting, or
// warming up), and what it could not release or remove, counted all the same.
func (p *Pool) Sweep() (waiting int, err error) {
	slots, err := p.Slots()
	if err != nil {
		return 0, err
	}
	for _, s := range slots {
		switch {
		case !s.Live:
			if p.release != nil {
				if rerr := p.release(s.Dir); rerr != nil {
					err = errors.Join(err, fmt.Errorf("warm VM slot %s of a dead shim kept: %w", s.Dir, rerr))
					continue
				}
			}
			if rerr := os.RemoveAll(s.Dir); rerr != nil {
				err = errors.Join(err, rerr)
			}
		case s.Claimed == "":
			waiting++
		}
	}
	return waiting, err
}

// lock takes the pool's own lock, which Fill holds while it counts and adds slots.
func (p *Pool) lock() (*os.File, error) {
	f, err := os.OpenFile(filepath.Join(p.dir, ".lock"), os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		return nil, err
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX); err != nil {
		f.Close()
		return nil, err
	}
	return f, nil
}

// Fill sweeps the pool and starts shims until want wait (or warm up) in it. start is
// given each new slot's directory and its lock, taken: the shim it starts must inherit
// the lock (as an extra file) and hold it for its life; Fill closes its own copy. It
// returns how many shims it started, and the sweep's errors: a dead shim's slot that
// could not go does not keep the pool from filling.
func (p *Pool) Fill(want int, start func(slot string, lock *os.File) error) (int, error) {
	l, err := p.lock()
	if err != nil {
		return 0, fmt.Errorf("warm VM pool %s: %w", p.dir, err)
	}
	defer l.Close()
	// A pool that cannot be listed cannot take a slot either: add says why.
	have, sweepErr := p.Sweep()
	started := 0
	for ; have+started < want; started++ {
		if err := p.add(start); err != nil {
			return started, errors.Join(sweepErr, err)
		}
	}
	return started, sweepErr
}

// add makes a slot and starts its shim.
func (p *Pool) add(start func(slot string, lock *os.File) error) (retErr error) {
	name := make([]byte, 6)
	rand.Read(name) // never fails (crypto/rand)
	dir := filepath.Join(p.dir, hex.EncodeToString(name))
	if err := os.Mkdir(dir, 0o700); err != nil {
		return fmt.Errorf("warm VM slot: %w", err)
	}
	defer func() {
		if retErr != nil {
			os.RemoveAll(dir)
		}
	}()
	f, err := os.OpenFile(filepath.Join(dir, lockFile), os.O_CREATE|os.O_RDWR|os.O_EXCL, 0o600)
	if err != nil {
		return fmt.Errorf("warm VM slot: %w", err)
	}
	defer f.Close()
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		return fmt.Errorf("warm VM slot %s: lock: %w", dir, err)
	}
	if err := start(dir, f); err != nil {
		return fmt.Errorf("warm VM slot %s: start its shim: %w", dir, err)
	}
	return nil
}

// Claim hands a pod to one of the pool's ready shims: c, with listener (the pod's
// shim's listening socket) attached. It returns the slot that took it, or "" if none
// did; the pool is left as it was then.
func (p *Pool) Claim(c Claim, listener *os.File) (string, error) {
	slots, err := p.Slots()
	if err != nil {
		return "", err
	}
	msg, err := json.Marshal(c)
	if err != nil {
		return "", err
	}
	for _, s := range slots {
		if s.Ready && claimOne(filepath.Join(s.Dir, claimSocket), msg, listener) {
			return s.Dir, nil
		}
	}
	return "", nil
}

// claimOne sends msg and listener to the shim waiting on socket.
func claimOne(socket string, msg []byte, listener *os.File) bool {
	conn, err := net.DialTimeout("unix", socket, ClaimTimeout)
	if err != nil {
		return false
	}
	defer conn.Close()
	uc := conn.(*net.UnixConn)
	uc.SetDeadline(time.Now().Add(ClaimTimeout))
	if _, _, err := uc.WriteMsgUnix(msg, unix.UnixRights(int(listener.Fd())), nil); err != nil {
		return false
	}
	uc.CloseWrite()
	answer, err := io.ReadAll(io.LimitReader(uc, 16))
	return err == nil && string(answer) == claimOK
}

// claimOK is the warm shim's answer to a claim it took.
const claimOK = "ok"
