package transport

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/containerd/ttrpc"

	agent "github.com/caisson-containers/caisson/api/agent/v1"
)

func TestReadFrame(t *testing.T) {
	hello := frame{kind: frameHello, nonce: nonce{1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16}}
	cat := func(parts ...[]byte) []byte { return bytes.Join(parts, nil) }
	for _, tc := range []struct {
		name    string
		in      []byte
		want    frame
		wantErr error
	}{
		{"frame alone", hello.bytes(), hello, nil},
		{"after yamux bytes", cat([]byte{0, 1, 0, 2, 0, 0, 0, 1, 0, 0, 0, 0}, hello.bytes()), hello, nil},
		{"after a broken magic", cat(frameMagic[:5], []byte{'x'}, frameMagic[:3], hello.bytes()), hello, nil},
		{"magic restarting inside the magic", cat(frameMagic[:4], hello.bytes()), hello, nil},
		{"junk only", []byte("no frame here"), frame{}, io.EOF},
		{"cut after the magic", frameMagic[:], frame{}, io.ErrUnexpectedEOF},
		{"cut in the nonce", hello.bytes()[:frameLen-3], frame{}, io.ErrUnexpectedEOF},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := readFrame(bufio.NewReader(bytes.NewReader(tc.in)))
			if !errors.Is(err, tc.wantErr) || got != tc.want {
				t.Fatalf("readFrame = %v, %v; want %v, %v", got, err, tc.want, tc.wantErr)
			}
		})
	}
}

// fakeSerial stands in for QEMU's virtio-serial port with its host end on a unix socket,
// as the agent sees it at its worst: host bytes wait until the guest reads them, guest
// bytes are lost while no host is connected, one guest open at a time, and the guest
// never sees a host go away (its read just waits for the next host: the disconnect
// event it missed because the next host came first).
type fakeSerial struct {
	mu   sync.Mutex
	cond *sync.Cond
	qemu *os.File // QEMU's end of the connected host's socket; nil while none is
	open bool
}

func newFakeSerial() *fakeSerial {
	f := &fakeSerial{}
	f.cond = sync.NewCond(&f.mu)
	return f
}

// dial connects a new host and returns its end; the previous host, if any, is gone.
func (f *fakeSerial) dial(t *testing.T) *os.File {
	host, qemu := socketPair(t)
	f.mu.Lock()
	f.qemu = qemu
	f.cond.Broadcast()
	f.mu.Unlock()
	return host
}

// openPort opens the guest's port, waiting while it is open (as the agent retries EBUSY).
func (f *fakeSerial) openPort() *fakePort {
	f.mu.Lock()
	defer f.mu.Unlock()
	for f.open {
		f.cond.Wait()
	}
	f.open = true
	if f.qemu != nil {
		f.qemu.SetReadDeadline(time.Time{})
	}
	return &fakePort{f: f}
}

type fakePort struct {
	f      *fakeSerial
	closed bool // under f.mu
}

// host waits for a connected host; nil once the port is closed.
func (p *fakePort) host() *os.File {
	p.f.mu.Lock()
	defer p.f.mu.Unlock()
	for p.f.qemu == nil && !p.closed {
		p.f.cond.Wait()
	}
	if p.closed {
		return nil
	}
	return p.f.qemu
}

func (p *fakePort) Read(b []byte) (int, error) {
	for {
		q := p.host()
		if q == nil {
			return 0, os.ErrClosed
		}
		n, err := q.Read(b)
		if n > 0 {
			return n, nil
		}
		if errors.Is(err, os.ErrDeadlineExceeded) {
			continue // Close, or a deadline left from a previous guest's Close
		}
		// The host went away: the guest does not notice, and waits for the next.
		p.f.mu.Lock()
		if p.f.qemu == q {
			p.f.qemu = nil
		}
		p.f.mu.Unlock()
	}
}

func (p *fakePort) Write(b []byte) (int, error) {
	p.f.mu.Lock()
	q, closed := p.f.qemu, p.closed
	p.f.mu.Unlock()
	if closed {
		return 0, os.ErrClosed
	}
	if q != nil {
		q.Write(b)
	}
	return len(b), nil // without a host, lost
}

func (p *fakePort) Close() error {
	p.f.mu.Lock()
	defer p.f.mu.Unlock()
	if p.closed {
		return os.ErrClosed
	}
	p.closed, p.f.open = true, false
	if p.f.qemu != nil {
		p.f.qemu.SetReadDeadline(time.Now()) // ends a Read in progress
	}
	p.f.cond.Broadcast()
	return nil
}

// serveAgent serves the port as the agent does: open it, serve until the session ends,
// open it again; until the test ends.
func serveAgent(t *testing.T, f *fakeSerial) {
	srv, err := ttrpc.NewServer()
	if err != nil {
		t.Fatal(err)
	}
	agent.RegisterSandboxService(srv, testSandbox{})
	ctx, cancel := context.WithCancel(context.Background())
	var (
		mu   sync.Mutex
		port *fakePort
		done = make(chan struct{})
	)
	go func() {
		defer close(done)
		for ctx.Err() == nil {
			p := f.openPort()
			mu.Lock()
			port = p
			mu.Unlock()
			l, err := ListenSerial(p)
			if err != nil {
				t.Error(err)
				return
			}
			srv.Serve(ctx, Demux(ctx, l, func(_ *agent.StdioStream, c net.Conn) { c.Close() }))
		}
	}()
	t.Cleanup(func() {
		cancel()
		srv.Close()
		mu.Lock()
		if port != nil {
			port.Close()
		}
		mu.Unlock()
		<-done
	})
}

// TestSerialReconnectToStaleGuestSession: the host connects, calls, goes away and
// connects again, several times, and the guest never sees it go: its yamux session from
// the previous host is there when the next host's first bytes arrive. Each new host is
// served at its first attempt. (Without the handshake, the second host's first stream
// collided with the stale session's, and its call never returned.)
func TestSerialReconnectToStaleGuestSession(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	f := newFakeSerial()
	serveAgent(t, f)
	for i := range 4 {
		s, err := NewSerialSession(f.dial(t))
		if err != nil {
			t.Fatal(err)
		}
		c, err := OpenTTRPC(ctx, s)
		if err != nil {
			t.Fatalf("host %d: %v", i, err)
		}
		if _, err := agent.NewSandboxClient(c).Check(ctx, &agent.CheckRequest{}); err != nil {
			t.Fatalf("host %d: Check: %v", i, err)
		}
		c.Close()
		s.Close()
	}
}

// slowClosePort is a port whose Close takes a while, and says when it has finished.
type slowClosePort struct {
	io.ReadWriteCloser
	done atomic.Bool
}

func (p *slowClosePort) Close() error {
	time.Sleep(100 * time.Millisecond)
	err := p.ReadWriteCloser.Close()
	p.done.Store(true)
	return err
}

// TestSerialAcceptFailsAfterThePortIsClosed: when the host goes and the guest's session
// ends, the listener's Accept fails only once the port is closed, so that the agent can
// open it again at once (a virtio-serial port opens once at a time; opening it while the
// previous descriptor is still being closed fails with EBUSY, and the agent stopped).
func TestSerialAcceptFailsAfterThePortIsClosed(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	hostEnd, guestEnd := socketPair(t)
	port := &slowClosePort{ReadWriteCloser: guestEnd}
	l, err := ListenSerial(port)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	s, err := NewSerialSession(hostEnd)
	if err != nil {
		t.Fatal(err)
	}
	opened := make(chan error, 1)
	go func() {
		c, err := s.Open(ctx)
		if err == nil {
			c.Write([]byte("x")) // yamux tells the guest of a stream with its first frame
		}
		opened <- err
	}()
	c, err := l.Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if err := <-opened; err != nil {
		t.Fatal(err)
	}
	s.Close() // the host goes: the guest reads EOF
	if _, err := l.Accept(); err == nil {
		t.Fatal("Accept succeeded after the host went away")
	}
	if !port.done.Load() {
		t.Fatal("Accept failed before the port was closed")
	}
}
