package transport

import (
	"context"
	"encoding/binary"
	"io"
	"syscall"
	"testing"
	"time"

	"github.com/hashicorp/yamux"
)

// pings counts the ping requests among the host's writes: each of its frames is one
// write (join.go, TestEachFrameIsOneWrite), a ping a bare header.
func (p *recordedPort) pings() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	n := 0
	for _, w := range p.writes {
		if len(w) == yamuxHeaderSize && w[1] == yamuxTypePing && binary.BigEndian.Uint16(w[2:4])&yamuxFlagSYN != 0 {
			n++
		}
	}
	return n
}

// livenessPair is a host session checking liveness every interval, with a ping
// unanswered after timeout ending it, its end of the port recording its writes, and the
// guest's end of the port, handshake done.
func livenessPair(t *testing.T, interval, timeout time.Duration) (*serialSession, *recordedPort, io.Reader, io.WriteCloser) {
	t.Helper()
	hostEnd, guestEnd := socketPair(t)
	cfg := hostYamuxConfig()
	cfg.ConnectionWriteTimeout = timeout
	port := &recordedPort{File: hostEnd}
	host := newSerialSession(port, cfg, interval)
	t.Cleanup(func() { host.Close() })
	gr, err := GuestHandshake(guestEnd)
	if err != nil {
		t.Fatal(err)
	}
	<-host.ready
	if host.err != nil {
		t.Fatal(host.err)
	}
	return host, port, gr, guestEnd
}

// The host pings a guest that is silent, and not one that answers calls.
func TestLivenessPingsOnlyASilentGuest(t *testing.T) {
	const interval = 100 * time.Millisecond
	for _, tc := range []struct {
		name  string
		calls bool // the host writes on a stream every interval/5, the guest echoes
		pings func(int) bool
		want  string
	}{
		{name: "silent", pings: func(n int) bool { return n >= 5 }, want: "a ping an interval"},
		{name: "answering calls", calls: true, pings: func(n int) bool { return n == 0 }, want: "none"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			host, port, gr, gw := livenessPair(t, interval, time.Second)
			guest, err := yamux.Server(&limitedConn{Reader: gr, Writer: gw, Closer: gw}, yamuxConfig())
			if err != nil {
				t.Fatal(err)
			}
			defer guest.Close()
			go func() {
				for {
					st, err := guest.Accept()
					if err != nil {
						return
					}
					go io.Copy(st, st)
				}
			}()
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			st, err := host.Open(ctx)
			if err != nil {
				t.Fatal(err)
			}
			defer st.Close()
			b := make([]byte, 1)
			for end := time.Now().Add(10 * interval); time.Now().Before(end); {
				if tc.calls {
					if _, err := st.Write(b); err != nil {
						t.Fatal(err)
					}
					if _, err := io.ReadFull(st, b); err != nil {
						t.Fatal(err)
					}
				}
				time.Sleep(interval / 5)
			}
			if n := port.pings(); !tc.pings(n) {
				t.Errorf("the host pinged the guest %d times in 10 intervals, want %s", n, tc.want)
			}
			if host.ys.IsClosed() {
				t.Error("the session ended with a guest that answers")
			}
		})
	}
}

// The host ends the session with a guest that does not answer its pings, or that does
// not read (its frames go on, the host's writes wait).
func TestLivenessEndsTheSessionOfADeadGuest(t *testing.T) {
	const interval, timeout = 100 * time.Millisecond, 300 * time.Millisecond
	for _, tc := range []struct {
		name  string
		guest func(t *testing.T, host *serialSession, gr io.Reader, gw io.Writer)
	}{
		{name: "reads and never answers", guest: func(t *testing.T, _ *serialSession, gr io.Reader, _ io.Writer) {
			go io.Copy(io.Discard, gr)
		}},
		{name: "never reads, keeps writing", guest: func(t *testing.T, host *serialSession, _ io.Reader, gw io.Writer) {
			// A window update of a stream the host does not have: yamux ignores it,
			// the liveness check hears it.
			update := yamuxFrame(1, 0, 99, nil, 1)
			go func() {
				for !host.ys.IsClosed() {
					if _, err := gw.Write(update); err != nil {
						return
					}
					time.Sleep(interval / 10)
				}
			}()
			// The host writes more than the port buffers, so its write waits.
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			st, err := host.Open(ctx)
			if err != nil {
				t.Fatal(err)
			}
			go st.Write(make([]byte, 1<<20))
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			host, _, gr, gw := livenessPair(t, interval, timeout)
			// A small send buffer, so that the host's writes wait on what the guest
			// has not read whatever the machine's default.
			f := host.conn.(interface {
				SyscallConn() (syscall.RawConn, error)
			})
			rc, err := f.SyscallConn()
			if err != nil {
				t.Fatal(err)
			}
			rc.Control(func(fd uintptr) { syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_SNDBUF, 4096) })
			tc.guest(t, host, gr, gw)
			select {
			case <-host.ys.CloseChan():
			case <-time.After(30 * time.Second):
				t.Fatal("the session with a dead guest was not ended")
			}
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			if _, err := host.Open(ctx); err == nil {
				t.Error("a stream opened on the ended session")
			}
		})
	}
}
