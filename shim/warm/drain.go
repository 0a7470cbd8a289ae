package warm

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"syscall"
	"time"
)

// Pools lists the pools under stateDir, for listing: their sweeps release nothing.
func Pools(stateDir string) ([]*Pool, error) {
	entries, err := os.ReadDir(filepath.Join(stateDir, Dir))
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var pools []*Pool
	for _, e := range entries {
		if e.IsDir() {
			pools = append(pools, &Pool{dir: filepath.Join(stateDir, Dir, e.Name())})
		}
	}
	return pools, nil
}

// Drain ends every waiting (unclaimed) warm shim of the pools under stateDir, and their
// VMs with them: SIGTERM, then SIGKILL for one still alive after timeout (an error names
// it). Slots of dead shims are released (release, if not nil) and removed, and pools
// left empty. Claimed slots serve pods and stay. It returns how many shims it ended.
func Drain(stateDir string, timeout time.Duration, release Release) (int, error) {
	pools, err := Pools(stateDir)
	if err != nil {
		return 0, err
	}
	for _, p := range pools {
		p.release = release
	}
	var ended []Slot
	for _, p := range pools {
		slots, err := p.Slots()
		if err != nil {
			return 0, err
		}
		for _, s := range slots {
			if !s.Live || s.Claimed != "" {
				continue
			}
			if s.Pid <= 0 {
				// A shim that has just started and not recorded its pid yet: wait for
				// it, then end it as the others.
				s.Pid = waitPid(s.Dir, timeout)
			}
			if s.Pid > 0 {
				syscall.Kill(s.Pid, syscall.SIGTERM)
				ended = append(ended, s)
			}
		}
	}
	deadline := time.Now().Add(timeout)
	for _, s := range ended {
		for held(s.Dir) && time.Now().Before(deadline) {
			time.Sleep(20 * time.Millisecond)
		}
		if held(s.Dir) {
			// A warm shim ends on SIGTERM: one that does not is a bug to report.
			err = errors.Join(err, fmt.Errorf("warm shim %d did not end within %s of SIGTERM: killed", s.Pid, timeout))
			syscall.Kill(s.Pid, syscall.SIGKILL)
			for end := time.Now().Add(5 * time.Second); held(s.Dir) && time.Now().Before(end); {
				time.Sleep(20 * time.Millisecond)
			}
		}
	}
	for _, p := range pools {
		if serr := p.removeIfEmpty(); serr != nil {
			err = errors.Join(err, serr)
		}
	}
	os.Remove(filepath.Join(stateDir, Dir)) // once no pool is left
	if err != nil {
		return len(ended), fmt.Errorf("warm VM pools: %w", err)
	}
	return len(ended), nil
}

// waitPid waits at most timeout for the slot's shim to record its pid.
func waitPid(dir string, timeout time.Duration) int {
	for end := time.Now().Add(timeout); time.Now().Before(end); time.Sleep(20 * time.Millisecond) {
		if s := slotOf(dir); s.Pid > 0 || !s.Live {
			return s.Pid
		}
	}
	return 0
}

// removeIfEmpty sweeps the pool and removes it if no slot is left, under its lock (a
// Fill that holds it finishes first; one that waits for it then finds no pool and fails,
// and its `start` boots the pod's VM as without a pool).
func (p *Pool) removeIfEmpty() error {
	l, err := p.lock()
	if err != nil {
		return err
	}
	defer l.Close()
	if _, err := p.Sweep(); err != nil {
		return err
	}
	if slots, err := p.Slots(); err != nil || len(slots) > 0 {
		return err
	}
	return os.RemoveAll(p.dir)
}
