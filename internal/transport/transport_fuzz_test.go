package transport

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"sync"
	"testing"

	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"github.com/sirupsen/logrus"
	"google.golang.org/protobuf/proto"

	agent "github.com/caisson-containers/caisson/api/agent/v1"
)

// preambleBytes is p as WritePreamble writes it.
func preambleBytes(p *agent.Preamble) []byte {
	var b bytes.Buffer
	if err := WritePreamble(&b, p); err != nil {
		panic(err)
	}
	return b.Bytes()
}

// FuzzPreamble feeds arbitrary bytes to ReadPreamble, and as a connection to Demux.
// ReadPreamble must accept only a TTRPC preamble or a STDIO one naming a container and a
// known stream, read exactly its preamble and no byte of what follows (the stream's own
// data), and what it accepts must survive WritePreamble unchanged. Demux must route
// each connection as ReadPreamble decides, handing on the bytes after the preamble.
func FuzzPreamble(f *testing.F) {
	f.Add(preambleBytes(&agent.Preamble{Kind: agent.Preamble_KIND_TTRPC}))
	f.Add(append(preambleBytes(&agent.Preamble{Kind: agent.Preamble_KIND_STDIO,
		Stdio: &agent.StdioStream{ContainerId: "c1", ExecId: "e1", Stream: agent.StreamKind_STREAM_KIND_STDOUT}}), "output"...))
	f.Add(preambleBytes(&agent.Preamble{Kind: agent.Preamble_KIND_STDIO, Stdio: &agent.StdioStream{ContainerId: "c1"}}))
	f.Add([]byte{0, 0, 0, 2, 8, 9})       // an unknown kind
	f.Add([]byte{0, 0, 0x10, 1})          // longer than maxPreamble
	f.Add([]byte{0, 0, 0, 9, 8})          // cut short
	f.Add([]byte{0, 0, 0, 3, 0x12, 5, 1}) // a broken message
	f.Fuzz(func(t *testing.T, data []byte) {
		r := bytes.NewReader(data)
		p, err := ReadPreamble(r)
		if err != nil {
			if !errdefs.IsInvalidArgument(err) && !errors.Is(err, io.EOF) && !errors.Is(err, io.ErrUnexpectedEOF) {
				t.Errorf("ReadPreamble: %v: neither InvalidArgument nor a short read", err)
			}
		} else {
			switch p.GetKind() {
			case agent.Preamble_KIND_TTRPC:
			case agent.Preamble_KIND_STDIO:
				s := p.GetStdio()
				if s.GetContainerId() == "" || agent.StreamKind_name[int32(s.GetStream())] == "" ||
					s.GetStream() == agent.StreamKind_STREAM_KIND_UNSPECIFIED {
					t.Errorf("ReadPreamble accepted a stdio preamble without a container or a known stream: %v", p)
				}
			default:
				t.Errorf("ReadPreamble accepted kind %v", p.GetKind())
			}
			if n := 4 + int(binary.BigEndian.Uint32(data)); r.Len() != len(data)-n {
				t.Errorf("ReadPreamble read %d bytes of a %d-byte preamble", len(data)-r.Len(), n)
			}
			var b bytes.Buffer
			if err := WritePreamble(&b, p); err != nil {
				t.Fatalf("WritePreamble of what ReadPreamble accepted: %v", err)
			}
			if p2, err := ReadPreamble(&b); err != nil || !proto.Equal(p, p2) {
				t.Errorf("round trip: %v, %v; want %v", p2, err, p)
			}
		}
		checkDemux(t, data, p, r.Len())
	})
}

// checkDemux sends data as one connection through Demux and checks it is routed as
// ReadPreamble decided (p, or an error if p is nil), with rest bytes after the preamble.
func checkDemux(t *testing.T, data []byte, p *agent.Preamble, rest int) {
	l := &oneConnListener{conns: make(chan net.Conn, 1), closed: make(chan struct{})}
	host, guestEnd := net.Pipe()
	defer host.Close()
	guest := &closeNotifier{Conn: guestEnd, closed: make(chan struct{})}
	l.conns <- guest
	type routed struct {
		stream *agent.StdioStream
		conn   net.Conn
	}
	stdio := make(chan routed, 1)
	d := Demux(quietCtx, l, func(s *agent.StdioStream, c net.Conn) { stdio <- routed{s, c} })
	defer d.Close()
	ttrpcConn := make(chan net.Conn, 1)
	go func() {
		if c, err := d.Accept(); err == nil {
			ttrpcConn <- c
		}
	}()
	go func() {
		// net.Pipe's Write returns once the other end has read it all (or closed);
		// the close is the end of file after data.
		host.Write(data)
		host.Close()
	}()
	var got net.Conn
	switch {
	case p == nil:
		<-guest.closed
		select {
		case r := <-stdio:
			t.Errorf("Demux routed a connection ReadPreamble refuses to stdio %v", r.stream)
		case <-ttrpcConn:
			t.Errorf("Demux routed a connection ReadPreamble refuses to ttrpc")
		default:
		}
		return
	case p.GetKind() == agent.Preamble_KIND_STDIO:
		r := <-stdio
		if !proto.Equal(r.stream, p.GetStdio()) {
			t.Errorf("Demux routed stdio stream %v, ReadPreamble read %v", r.stream, p.GetStdio())
		}
		got = r.conn
	default:
		got = <-ttrpcConn
	}
	b, err := io.ReadAll(got)
	got.Close()
	if err != nil || !bytes.Equal(b, data[len(data)-rest:]) {
		t.Errorf("after the preamble the connection reads %q (%v), want %q", b, err, data[len(data)-rest:])
	}
}

// quietCtx drops Demux's warnings about the connections it drops: fuzzing makes
// thousands a second.
var quietCtx = func() context.Context {
	l := logrus.New()
	l.Out = io.Discard
	return log.WithLogger(context.Background(), logrus.NewEntry(l))
}()

// closeNotifier closes closed when the connection is closed.
type closeNotifier struct {
	net.Conn
	once   sync.Once
	closed chan struct{}
}

func (c *closeNotifier) Close() error {
	c.once.Do(func() { close(c.closed) })
	return c.Conn.Close()
}

// oneConnListener accepts the connections sent on conns, then waits for Close.
type oneConnListener struct {
	conns  chan net.Conn
	closed chan struct{}
	once   sync.Once
}

func (l *oneConnListener) Accept() (net.Conn, error) {
	select {
	case c := <-l.conns:
		return c, nil
	case <-l.closed:
		return nil, net.ErrClosed
	}
}

func (l *oneConnListener) Close() error {
	l.once.Do(func() { close(l.closed) })
	return nil
}

func (l *oneConnListener) Addr() net.Addr { return serialAddr{} }

// countingReader counts the bytes read through it.
type countingReader struct {
	r *bytes.Reader
	n int
}

func (c *countingReader) ReadByte() (byte, error) {
	b, err := c.r.ReadByte()
	if err == nil {
		c.n++
	}
	return b, err
}

// FuzzReadFrame reads frames out of arbitrary bytes until the input ends: each frame
// returned must be the bytes just read (magic, kind, nonce), never a frame put together
// from bytes further apart, and a cut frame at the end is ErrUnexpectedEOF.
func FuzzReadFrame(f *testing.F) {
	hello := frame{kind: frameHello, nonce: nonce{1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16}}
	f.Add(hello.bytes())
	f.Add(append([]byte{0, 1, 0, 2, 0, 0, 0, 1, 0xca, 'c', 0xca}, hello.bytes()...))
	f.Add(append(frameMagic[:4], frame{kind: frameRequest}.bytes()...))
	f.Add(hello.bytes()[:frameLen-3])
	f.Fuzz(func(t *testing.T, data []byte) {
		cr := &countingReader{r: bytes.NewReader(data)}
		for {
			start := cr.n
			fr, err := readFrame(cr)
			if err != nil {
				if cr.n != len(data) {
					t.Errorf("readFrame: %v after %d of %d bytes", err, cr.n, len(data))
				}
				if !errors.Is(err, io.EOF) && !errors.Is(err, io.ErrUnexpectedEOF) {
					t.Errorf("readFrame: %v", err)
				}
				return
			}
			if read := data[start:cr.n]; !bytes.HasSuffix(read, fr.bytes()) {
				t.Fatalf("readFrame returned %x after reading %x", fr.bytes(), read)
			}
		}
	})
}

// resync is what a side's next frame may need after junk cut in the middle of a frame:
// a frame swallows up to 17 bytes after its magic (kind and nonce), and a junk frame of
// the right kind with a wrong nonce is ignored, so no frame is lost past them.
var resync = make([]byte, 1+len(nonce{}))

// FuzzHostHandshake runs the host's side against a guest whose port holds arbitrary
// bytes before it answers the host's HELLO: stale yamux frames of an earlier session,
// REQUESTs and ACKs of earlier hosts. The host must start yamux exactly after the ACK of
// its own nonce (no byte of what follows consumed), and write only HELLOs and a last
// START of that nonce.
func FuzzHostHandshake(f *testing.F) {
	f.Add([]byte{})
	f.Add(frame{kind: frameRequest}.bytes())
	f.Add(append([]byte{0, 2, 0, 1, 0, 0, 0, 3, 0, 0, 0, 4, 'a', 'b', 'c', 'd'}, frame{kind: frameAck, nonce: nonce{9}}.bytes()...))
	f.Add(append(frame{kind: frameRequest}.bytes(), frameMagic[:]...))
	f.Fuzz(func(t *testing.T, junk []byte) {
		payload := []byte("\x00\x01\x00\x01yamux after the handshake")
		g := &scriptedGuest{junk: junk, payload: payload, hellos: make(chan nonce, 64)}
		w := &frameRecorder{onHello: g.hello}
		br := bufio.NewReader(g)
		if err := hostHandshake(br, w); err != nil {
			t.Fatalf("hostHandshake: %v", err)
		}
		rest, _ := io.ReadAll(br)
		if !bytes.Equal(rest, payload) {
			t.Errorf("after the handshake yamux reads %q, want %q", rest, payload)
		}
		frames := w.frames()
		if len(frames) < 2 || frames[len(frames)-1].kind != frameStart {
			t.Fatalf("host wrote %v: want HELLOs then a START", frames)
		}
		n := frames[0].nonce
		for i, fr := range frames {
			if fr.nonce != n || (fr.kind != frameHello && i < len(frames)-1) {
				t.Errorf("host frame %d is %c %x; want HELLO %x", i, fr.kind, fr.nonce, n)
			}
		}
	})
}

// scriptedGuest is the guest's side of the port as the host reads it: junk, then,
// once the host's first HELLO is written, resync bytes, the ACK of its nonce and
// payload, then end of file.
type scriptedGuest struct {
	junk, payload []byte
	hellos        chan nonce
	answer        []byte
}

func (g *scriptedGuest) hello(n nonce) {
	select {
	case g.hellos <- n:
	default:
	}
}

func (g *scriptedGuest) Read(p []byte) (int, error) {
	if len(g.junk) > 0 {
		n := copy(p, g.junk)
		g.junk = g.junk[n:]
		return n, nil
	}
	if g.answer == nil {
		n := <-g.hellos
		g.answer = append(append(append([]byte{}, resync...), frame{kind: frameAck, nonce: n}.bytes()...), g.payload...)
	}
	if len(g.answer) == 0 {
		return 0, io.EOF
	}
	n := copy(p, g.answer)
	g.answer = g.answer[n:]
	if len(g.answer) == 0 {
		g.answer = []byte{}
	}
	return n, nil
}

// frameRecorder decodes the frames a side writes (whole frames, one per Write).
type frameRecorder struct {
	mu      sync.Mutex
	written []frame
	onHello func(nonce)
}

func (w *frameRecorder) Write(p []byte) (int, error) {
	fr, err := readFrame(bytes.NewReader(p))
	if err != nil || len(p) != frameLen {
		panic("a handshake write that is not one frame")
	}
	w.mu.Lock()
	w.written = append(w.written, fr)
	w.mu.Unlock()
	if fr.kind == frameHello && w.onHello != nil {
		w.onHello(fr.nonce)
	}
	return len(p), nil
}

func (w *frameRecorder) frames() []frame {
	w.mu.Lock()
	defer w.mu.Unlock()
	return append([]frame(nil), w.written...)
}

// FuzzGuestHandshake runs the guest's side over a port that holds arbitrary bytes (what
// earlier hosts wrote and no guest read: their yamux frames, HELLOs and STARTs) before
// a host's HELLO and START of nonce n. The guest must start yamux right after a START of
// the last nonce it acknowledged, with no byte of what follows consumed.
func FuzzGuestHandshake(f *testing.F) {
	f.Add([]byte{}, []byte("0123456789abcdef"))
	f.Add(frame{kind: frameHello, nonce: nonce{7}}.bytes(), []byte("0123456789abcdef"))
	f.Add(append(frame{kind: frameHello, nonce: nonce{7}}.bytes(), frame{kind: frameStart, nonce: nonce{7}}.bytes()...), []byte("0123456789abcdef"))
	f.Add(append([]byte{0, 0, 0, 2, 0, 0, 0, 1}, frame{kind: frameStart, nonce: nonce{3}}.bytes()...), []byte("fedcba9876543210"))
	f.Fuzz(func(t *testing.T, junk, nonceBytes []byte) {
		var n nonce
		copy(n[:], nonceBytes)
		var in []byte
		in = append(in, junk...)
		in = append(in, resync...)
		in = append(in, frame{kind: frameHello, nonce: n}.bytes()...)
		in = append(in, frame{kind: frameStart, nonce: n}.bytes()...)
		in = append(in, "\x00\x01\x00\x01yamux"...)
		w := &frameRecorder{}
		cr := &countingReader{r: bytes.NewReader(in)}
		if err := guestHandshake(cr, w); err != nil {
			t.Fatalf("guestHandshake: %v", err)
		}
		frames := w.frames()
		if len(frames) < 2 || frames[0].kind != frameRequest {
			t.Fatalf("guest wrote %v: want a REQUEST then ACKs", frames)
		}
		last := frames[len(frames)-1]
		for i, fr := range frames[1:] {
			if fr.kind != frameAck {
				t.Errorf("guest frame %d is %c, want an ACK", i+1, fr.kind)
			}
		}
		start := frame{kind: frameStart, nonce: last.nonce}.bytes()
		if !bytes.HasSuffix(in[:cr.n], start) {
			t.Errorf("guest started yamux after %x, not after the START of the nonce it acknowledged last (%x)", in[:cr.n], last.nonce)
		}
	})
}
