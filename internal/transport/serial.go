package transport

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/containerd/errdefs"
	"github.com/hashicorp/yamux"
)

// The serial transport is host-initiated, because of how QEMU's virtio-serial
// behaves: bytes the host writes before the guest opens its port wait in QEMU
// (it stops reading the socket), but bytes the guest writes while no host is
// connected are lost. So the guest speaks first only to ask for the host's hello
// (handshake.go): the shim connects, and its first stream opens once the agent's
// session and its connection have shaken hands; its first call completes once the
// agent serves. That call is the readiness report; nothing polls.

func yamuxConfig() *yamux.Config {
	c := yamux.DefaultConfig()
	c.LogOutput = io.Discard
	// The guest may take seconds to boot (TCG); the first stream waits for it.
	c.StreamOpenTimeout = 0
	// Only the host checks that the other end answers, and only when the session is
	// silent (liveness.go); yamux's own keep-alive pings whatever the session carries.
	c.EnableKeepAlive = false
	c.ConnectionWriteTimeout = 30 * time.Second
	return c
}

// hostYamuxConfig is the host's: the host never accepts a stream (the agent never
// opens one; every connection is the shim's), yet yamux queues each stream the guest
// opens, up to AcceptBacklog, and buffers up to a full receive window (256 KiB) of
// what the guest writes into it. With the default backlog of 256, a compromised agent
// could pin 64 MiB of the shim's memory. A backlog of one bounds that to one stream
// (one window); yamux resets every further stream the guest opens as soon as it
// arrives. Accepting and closing them would not do: a half-closed stream still
// buffers the guest's writes until yamux's close timeout, for as many streams as the
// guest cares to open.
func hostYamuxConfig() *yamux.Config {
	c := yamuxConfig()
	c.AcceptBacklog = 1
	return c
}

// DialSerial connects to the host end of the agent's virtio-serial port (the
// unix socket of QEMU's chardev) and returns a Session over it.
func DialSerial(ctx context.Context, socketPath string) (Session, error) {
	var d net.Dialer
	conn, err := d.DialContext(ctx, "unix", socketPath)
	if err != nil {
		return nil, fmt.Errorf("connect agent serial port %s: %w", socketPath, err)
	}
	s, err := NewSerialSession(conn)
	if err != nil {
		conn.Close()
		return nil, err
	}
	return s, nil
}

// NewSerialSession runs the host (yamux client) side over conn. It returns at once;
// the handshake with the agent goes on in the background, and Open waits for it.
func NewSerialSession(conn io.ReadWriteCloser) (Session, error) {
	return newSerialSession(conn, hostYamuxConfig(), livenessInterval), nil
}

// newSerialSession is NewSerialSession with yamux's configuration and the liveness
// check's interval given.
func newSerialSession(conn io.ReadWriteCloser, cfg *yamux.Config, interval time.Duration) *serialSession {
	s := &serialSession{conn: conn, ready: make(chan struct{})}
	go s.start(cfg, interval)
	return s
}

type serialSession struct {
	conn  io.ReadWriteCloser
	live  liveness
	ready chan struct{} // closed once ys or err is set
	ys    *yamux.Session
	err   error
}

// start shakes hands, then runs yamux with cfg and the liveness check every interval.
func (s *serialSession) start(cfg *yamux.Config, interval time.Duration) {
	defer close(s.ready)
	bc := newBufferedConn(s.conn)
	if err := hostHandshake(bc, bc); err != nil {
		s.err = err
		return
	}
	// The guest's frames reach yamux through the ping limiter (pinglimit.go); the host's
	// go out a frame a write (join.go). The liveness check hears of both (liveness.go).
	pl := newPingLimiter(bc)
	pl.live = &s.live
	conn := &limitedConn{Reader: pl, Writer: newFrameJoiner(watchedWriter{w: bc, l: &s.live}), Closer: bc}
	if s.ys, s.err = yamux.Client(conn, cfg); s.err != nil {
		s.err = fmt.Errorf("start yamux client: %w", s.err)
		return
	}
	go s.live.watch(s.ys, interval)
}

func (s *serialSession) Open(ctx context.Context) (net.Conn, error) {
	select {
	case <-s.ready:
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	if s.err != nil {
		return nil, fmt.Errorf("open agent stream: %w", s.err)
	}
	type result struct {
		c   net.Conn
		err error
	}
	ch := make(chan result, 1)
	go func() {
		c, err := s.ys.OpenStream()
		ch <- result{c, err}
	}()
	select {
	case r := <-ch:
		if r.err != nil {
			return nil, fmt.Errorf("open agent stream: %w", r.err)
		}
		return r.c, nil
	case <-ctx.Done():
		go func() {
			if r := <-ch; r.c != nil {
				r.c.Close()
			}
		}()
		return nil, ctx.Err()
	}
}

// Close ends the session; a handshake still going on ends with the connection.
func (s *serialSession) Close() error {
	err := s.conn.Close()
	<-s.ready
	if s.ys != nil {
		s.ys.Close()
	}
	return err
}

// GuestHandshake runs the guest's side of the serial handshake (handshake.go) over a
// port just opened, and returns the reader yamux is then to read the port through: it
// holds what the handshake read past its last frame; yamux writes to port. ListenSerial
// does this in its first Accept; agents that drive yamux themselves call it (the
// hostile agent of the tests, integration-tests/hostile).
func GuestHandshake(port io.ReadWriter) (io.Reader, error) {
	br := bufio.NewReader(port)
	if err := guestHandshake(br, port); err != nil {
		return nil, err
	}
	return br, nil
}

// ListenSerial runs the guest (yamux server) side over the agent's port and
// returns a listener of the connections the shim opens. The handshake with the
// host happens in the first Accept. Once Accept fails, the port is closed (a
// virtio-serial port opens once at a time: the caller may open it again at once).
func ListenSerial(port io.ReadWriteCloser) (net.Listener, error) {
	return &serialListener{port: &closeOnce{c: port}}, nil
}

type serialListener struct {
	port *closeOnce

	started sync.Once
	err     error // of the handshake or yamux's start

	mu sync.Mutex
	ys *yamux.Session
}

func (l *serialListener) start() {
	bc := newBufferedConn(l.port)
	if err := guestHandshake(bc, bc); err != nil {
		l.err = err
		return
	}
	// The handshake's writes are done: yamux's go out a frame a write (join.go).
	bc.Writer = newFrameJoiner(bc.Writer)
	ys, err := yamux.Server(bc, yamuxConfig())
	if err != nil {
		l.err = fmt.Errorf("start yamux server: %w", err)
		return
	}
	l.mu.Lock()
	l.ys = ys
	l.mu.Unlock()
	if l.port.closed() { // Close came during the handshake
		ys.Close()
	}
}

func (l *serialListener) Accept() (net.Conn, error) {
	l.started.Do(l.start)
	if l.err != nil {
		l.Close()
		return nil, l.err
	}
	c, err := l.ys.Accept()
	if err != nil {
		// yamux may still be closing the port when its Accept fails.
		l.Close()
		return nil, err
	}
	return c, nil
}

// Close closes the session and the port, and returns once the port is closed.
func (l *serialListener) Close() error {
	l.mu.Lock()
	ys := l.ys
	l.mu.Unlock()
	if ys != nil {
		ys.Close()
	}
	return l.port.Close()
}

func (l *serialListener) Addr() net.Addr { return serialAddr{} }

type serialAddr struct{}

func (serialAddr) Network() string { return "virtio-serial" }
func (serialAddr) String() string  { return SerialPortName }

// closeOnce closes c once; every Close, the first and those during or after it,
// returns once c is closed.
type closeOnce struct {
	c      io.ReadWriteCloser
	once   sync.Once
	err    error
	isDone atomic.Bool
}

func (c *closeOnce) Read(p []byte) (int, error)  { return c.c.Read(p) }
func (c *closeOnce) Write(p []byte) (int, error) { return c.c.Write(p) }

func (c *closeOnce) Close() error {
	c.once.Do(func() {
		c.isDone.Store(true)
		c.err = c.c.Close()
	})
	return c.err
}

func (c *closeOnce) closed() bool { return c.isDone.Load() }

// OpenSerialPort opens the guest's virtio-serial port called name. Without udev
// there is no /dev/virtio-ports/NAME link, so the port is found by the name
// sysfs gives it (/sys/class/virtio-ports/vportNpM/name). The port is read and
// written raw (rawport.go).
func OpenSerialPort(name string) (io.ReadWriteCloser, error) {
	return openSerialPort("/sys/class/virtio-ports", "/dev", name)
}

func openSerialPort(sysDir, devDir, name string) (io.ReadWriteCloser, error) {
	entries, err := os.ReadDir(sysDir)
	if err != nil {
		return nil, fmt.Errorf("list virtio ports: %w", err)
	}
	for _, e := range entries {
		b, err := os.ReadFile(filepath.Join(sysDir, e.Name(), "name"))
		if err != nil || strings.TrimSpace(string(b)) != name {
			continue
		}
		f, err := os.OpenFile(filepath.Join(devDir, e.Name()), os.O_RDWR, 0)
		if err != nil {
			return nil, fmt.Errorf("open virtio port %s: %w", name, err)
		}
		port, err := newRawPort(f)
		if err != nil {
			f.Close()
			return nil, fmt.Errorf("open virtio port %s: %w", name, err)
		}
		return port, nil
	}
	return nil, fmt.Errorf("virtio port %q: %w", name, errdefs.ErrNotFound)
}
