package warm

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"time"

	"github.com/containerd/errdefs"
	"golang.org/x/sys/unix"
)

// ErrIdle is Wait's error when no pod came within the idle timeout.
var ErrIdle = errors.New("no pod claimed the warm VM")

// Waiter is a warm shim's side of its slot, once its VM is warm.
type Waiter struct {
	dir string
	l   *net.UnixListener
}

// Own records the calling process as the shim of the slot in dir (whose lock it holds),
// for Drain and listings.
func Own(dir string) error {
	return os.WriteFile(filepath.Join(dir, pidFile), []byte(strconv.Itoa(os.Getpid())), 0o600)
}

// Listen announces the slot in dir ready: claim.sock listens.
func Listen(dir string) (*Waiter, error) {
	path := filepath.Join(dir, claimSocket)
	os.Remove(path) // a crashed shim's; the slot is ours (we hold its lock)
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		return nil, fmt.Errorf("warm VM slot: %w", err)
	}
	l.SetUnlinkOnClose(true)
	return &Waiter{dir: dir, l: l}, nil
}

// Close stops waiting; claim.sock goes.
func (w *Waiter) Close() error { return w.l.Close() }

// Wait returns the first claim that is sound, with the pod shim's listening socket it
// carried, having answered it "ok" and stopped listening: the caller is that pod's shim
// now. It returns ErrIdle when nobody claimed the slot for idle, and ctx's error when
// ctx ends first; claims that are not sound are refused (the claimant boots a VM as
// without a pool) and the wait goes on.
func (w *Waiter) Wait(ctx context.Context, idle time.Duration) (Claim, *os.File, error) {
	stop := context.AfterFunc(ctx, func() { w.l.SetDeadline(time.Now()) })
	defer stop()
	if err := w.l.SetDeadline(time.Now().Add(idle)); err != nil {
		return Claim{}, nil, err
	}
	for {
		conn, err := w.l.AcceptUnix()
		if err != nil {
			if ctx.Err() != nil {
				return Claim{}, nil, ctx.Err()
			}
			if errors.Is(err, os.ErrDeadlineExceeded) {
				return Claim{}, nil, ErrIdle
			}
			return Claim{}, nil, err
		}
		c, listener, err := readClaim(conn)
		if err != nil {
			conn.Write([]byte(err.Error()))
			conn.Close()
			continue
		}
		if err := os.WriteFile(filepath.Join(w.dir, claimedFile), []byte(c.Bundle), 0o600); err != nil {
			listener.Close()
			conn.Close()
			return Claim{}, nil, err
		}
		w.l.Close()
		_, err = conn.Write([]byte(claimOK))
		conn.Close()
		if err != nil {
			// The claimant is gone and told containerd nothing: nobody will use the socket.
			listener.Close()
			return Claim{}, nil, fmt.Errorf("answer the claim: %w", err)
		}
		return c, listener, nil
	}
}

// readClaim reads one claim and checks it: one JSON Claim naming a directory, with one
// listening unix socket attached.
func readClaim(conn *net.UnixConn) (Claim, *os.File, error) {
	conn.SetDeadline(time.Now().Add(ClaimTimeout))
	buf, oob := make([]byte, 1<<20), make([]byte, unix.CmsgSpace(4*4))
	n, oobn, _, _, err := conn.ReadMsgUnix(buf, oob)
	if err != nil {
		return Claim{}, nil, err
	}
	scms, err := unix.ParseSocketControlMessage(oob[:oobn])
	if err != nil {
		return Claim{}, nil, err
	}
	var fds []int
	for _, scm := range scms {
		got, err := unix.ParseUnixRights(&scm)
		if err == nil {
			fds = append(fds, got...)
		}
	}
	closeAll := func() {
		for _, fd := range fds {
			unix.Close(fd)
		}
	}
	var c Claim
	if err := json.Unmarshal(buf[:n], &c); err != nil {
		closeAll()
		return Claim{}, nil, fmt.Errorf("claim: %v: %w", err, errdefs.ErrInvalidArgument)
	}
	if len(fds) != 1 {
		closeAll()
		return Claim{}, nil, fmt.Errorf("claim: %d descriptors, want the shim's socket: %w", len(fds), errdefs.ErrInvalidArgument)
	}
	if acc, err := unix.GetsockoptInt(fds[0], unix.SOL_SOCKET, unix.SO_ACCEPTCONN); err != nil || acc != 1 {
		closeAll()
		return Claim{}, nil, fmt.Errorf("claim: the descriptor is not a listening socket: %w", errdefs.ErrInvalidArgument)
	}
	if st, err := os.Stat(c.Bundle); err != nil || !st.IsDir() || !filepath.IsAbs(c.Bundle) {
		closeAll()
		return Claim{}, nil, fmt.Errorf("claim: bundle %q is not a directory: %w", c.Bundle, errdefs.ErrInvalidArgument)
	}
	return c, os.NewFile(uintptr(fds[0]), "shim socket"), nil
}

// RemoveSlot removes the slot in dir unless a shim holds it: after its shim died.
func RemoveSlot(dir string) error {
	if held(dir) {
		return fmt.Errorf("warm VM slot %s: its shim is alive: %w", dir, errdefs.ErrFailedPrecondition)
	}
	return os.RemoveAll(dir)
}
