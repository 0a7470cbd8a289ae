package transport

import (
	"context"
	"net"
	"sync"
	"time"

	"github.com/containerd/log"

	agent "github.com/caisson-containers/caisson/api/agent/v1"
)

// preambleTimeout bounds how long an accepted connection may take to say what
// it is, so that a stuck peer cannot pin a goroutine.
const preambleTimeout = 10 * time.Second

// StdioHandler takes a standard-stream connection; it owns conn.
type StdioHandler func(stream *agent.StdioStream, conn net.Conn)

// Demux reads each accepted connection's preamble and routes it: ttrpc
// connections come out of the returned listener (hand it to ttrpc.Server.Serve),
// stdio connections go to onStdio. Closing the returned listener closes l.
func Demux(ctx context.Context, l net.Listener, onStdio StdioHandler) net.Listener {
	d := &demux{l: l, conns: make(chan net.Conn), done: make(chan struct{})}
	go d.run(ctx, onStdio)
	return d
}

type demux struct {
	l     net.Listener
	conns chan net.Conn
	done  chan struct{}
	once  sync.Once
	err   error
}

func (d *demux) run(ctx context.Context, onStdio StdioHandler) {
	for {
		c, err := d.l.Accept()
		if err != nil {
			d.close(err)
			return
		}
		go d.route(ctx, c, onStdio)
	}
}

func (d *demux) route(ctx context.Context, c net.Conn, onStdio StdioHandler) {
	c.SetReadDeadline(time.Now().Add(preambleTimeout))
	p, err := ReadPreamble(c)
	c.SetReadDeadline(time.Time{})
	if err != nil {
		log.G(ctx).WithError(err).Warn("dropping agent connection")
		c.Close()
		return
	}
	if p.GetKind() == agent.Preamble_KIND_STDIO {
		onStdio(p.GetStdio(), c)
		return
	}
	select {
	case d.conns <- c:
	case <-d.done:
		c.Close()
	}
}

func (d *demux) close(err error) {
	d.once.Do(func() {
		d.err = err
		close(d.done)
	})
}

func (d *demux) Accept() (net.Conn, error) {
	select {
	case c := <-d.conns:
		return c, nil
	case <-d.done:
		return nil, d.err
	}
}

func (d *demux) Close() error {
	err := d.l.Close()
	d.close(net.ErrClosed)
	return err
}

func (d *demux) Addr() net.Addr { return d.l.Addr() }
