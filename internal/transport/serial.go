package transport

import (
	"context"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/containerd/errdefs"
	"github.com/hashicorp/yamux"
)

// The serial transport is host-initiated, because of how QEMU's virtio-serial
// behaves: bytes the host writes before the guest opens its port wait in QEMU
// (it stops reading the socket), but bytes the guest writes while no host is
// connected are discarded. So the guest never speaks first: the shim connects,
// opens a yamux stream and makes its first call, which completes once the agent
// serves. That call is the readiness report; nothing polls.

func yamuxConfig() *yamux.Config {
	c := yamux.DefaultConfig()
	c.LogOutput = io.Discard
	// The guest may take seconds to boot (TCG); the first stream waits for it.
	c.StreamOpenTimeout = 0
	// A guest that stops answering is detected by keepalive.
	c.KeepAliveInterval = 10 * time.Second
	c.ConnectionWriteTimeout = 30 * time.Second
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

// NewSerialSession runs the host (yamux client) side over conn.
func NewSerialSession(conn io.ReadWriteCloser) (Session, error) {
	ys, err := yamux.Client(conn, yamuxConfig())
	if err != nil {
		return nil, fmt.Errorf("start yamux client: %w", err)
	}
	return &serialSession{ys: ys}, nil
}

type serialSession struct {
	ys *yamux.Session
}

func (s *serialSession) Open(ctx context.Context) (net.Conn, error) {
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

func (s *serialSession) Close() error { return s.ys.Close() }

// ListenSerial runs the guest (yamux server) side over the agent's port and
// returns a listener of the connections the shim opens.
func ListenSerial(port io.ReadWriteCloser) (net.Listener, error) {
	ys, err := yamux.Server(port, yamuxConfig())
	if err != nil {
		return nil, fmt.Errorf("start yamux server: %w", err)
	}
	return ys, nil
}

// OpenSerialPort opens the guest's virtio-serial port called name. Without udev
// there is no /dev/virtio-ports/NAME link, so the port is found by the name
// sysfs gives it (/sys/class/virtio-ports/vportNpM/name).
func OpenSerialPort(name string) (*os.File, error) {
	return openSerialPort("/sys/class/virtio-ports", "/dev", name)
}

func openSerialPort(sysDir, devDir, name string) (*os.File, error) {
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
		return f, nil
	}
	return nil, fmt.Errorf("virtio port %q: %w", name, errdefs.ErrNotFound)
}
