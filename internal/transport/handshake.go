package transport

import (
	"bufio"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"time"
)

// The serial handshake ties one host connection to one fresh guest session before
// yamux starts on either side.
//
// The port is a byte pipe that outlives both ends. The guest does not always see the
// host go (virtio-serial reports a disconnect as a port event; when the next host
// connects before the agent has read it, the agent's read never ends), so a guest
// yamux session can outlive its host and swallow the first bytes of the next one; and
// a guest session that ends while its host is connected leaves the host mid-stream.
// Either way the two yamux sessions would disagree from their first byte: the new
// host's first stream collided with the stale session's streams, the guest answered
// with a go-away, and the host waited for a reply that never came.
//
// So each side starts with frames that are never yamux (yamux frames begin with a 0
// version byte, these with 0xca), and each skips whatever comes before a frame:
//
//	guest (fresh session):   REQUEST            "send me your hello"
//	host (new connection):   HELLO nonce        on connecting, and again on each REQUEST
//	guest:                   ACK nonce          for the latest HELLO it read
//	host:                    START nonce        on the ACK of its own nonce; yamux follows
//
// The guest starts yamux at the START of the nonce it acknowledged, the host at the ACK
// of its own nonce: both then read only bytes the other wrote for this session. A stale
// guest session that reads a HELLO fails on its version byte and ends, so the agent
// opens the port again and its fresh session's REQUEST gets the HELLO resent. A host
// session that reads a REQUEST fails the same way, so the shim sees at once that the
// guest's session it talked to is gone. The guest never speaks unless asked, except for
// the one REQUEST: if no host is connected it is lost (or waits for the next host), and
// the next host's HELLO on connecting starts the handshake anyway.

// frameMagic starts every handshake frame; 0xca appears nowhere else in it, so a
// mismatch can restart the search at the byte that broke it.
var frameMagic = [8]byte{0xca, 'c', 'a', 'i', 's', 's', 'o', 'n'}

type frameKind byte

const (
	frameRequest frameKind = 'R'
	frameHello   frameKind = 'H'
	frameAck     frameKind = 'A'
	frameStart   frameKind = 'S'
)

type nonce [16]byte

type frame struct {
	kind  frameKind
	nonce nonce
}

const frameLen = len(frameMagic) + 1 + len(nonce{})

func (f frame) bytes() []byte {
	b := make([]byte, 0, frameLen)
	b = append(b, frameMagic[:]...)
	b = append(b, byte(f.kind))
	return append(b, f.nonce[:]...)
}

// readFrame skips bytes up to the next frame's magic and reads that frame.
func readFrame(r io.ByteReader) (frame, error) {
	matched := 0
	for matched < len(frameMagic) {
		b, err := r.ReadByte()
		if err != nil {
			return frame{}, err
		}
		switch {
		case b == frameMagic[matched]:
			matched++
		case b == frameMagic[0]:
			matched = 1
		default:
			matched = 0
		}
	}
	var f frame
	b, err := r.ReadByte()
	if err != nil {
		return frame{}, noEOF(err)
	}
	f.kind = frameKind(b)
	for i := range f.nonce {
		if f.nonce[i], err = r.ReadByte(); err != nil {
			return frame{}, noEOF(err)
		}
	}
	return f, nil
}

func noEOF(err error) error {
	if err == io.EOF {
		return io.ErrUnexpectedEOF
	}
	return err
}

// frameWriter writes frames from its own goroutine, so that a side keeps reading while
// its write waits (a pipe without a buffer, a port whose host is away).
type frameWriter struct {
	frames chan frame
	done   chan struct{}
}

func startFrameWriter(w io.Writer) *frameWriter {
	fw := &frameWriter{frames: make(chan frame, 16), done: make(chan struct{})}
	go func() {
		defer close(fw.done)
		for f := range fw.frames {
			// A frame that cannot be written is lost, as one the port discards:
			// the handshake goes on with the next, and a broken pipe shows in the reads.
			w.Write(f.bytes())
		}
	}()
	return fw
}

func (fw *frameWriter) send(f frame) { fw.frames <- f }

// trySend sends f unless frames are already waiting (one HELLO queued is enough).
func (fw *frameWriter) trySend(f frame) {
	select {
	case fw.frames <- f:
	default:
	}
}

// finish waits until every frame sent is written: yamux may write after it.
func (fw *frameWriter) finish() {
	close(fw.frames)
	<-fw.done
}

// abandon stops the writer without waiting for it: its pending write ends when the
// caller closes the connection.
func (fw *frameWriter) abandon() { close(fw.frames) }

// hostHandshake runs the host's side over a new connection to the port; r must be the
// connection's reader, through which yamux then reads.
func hostHandshake(r io.ByteReader, w io.Writer) error {
	var n nonce
	rand.Read(n[:])
	fw := startFrameWriter(w)
	fw.send(frame{kind: frameHello, nonce: n})
	for {
		f, err := readFrame(r)
		if err != nil {
			fw.abandon()
			return fmt.Errorf("agent handshake: %w", err)
		}
		switch {
		case f.kind == frameRequest:
			fw.trySend(frame{kind: frameHello, nonce: n})
		case f.kind == frameAck && f.nonce == n:
			fw.send(frame{kind: frameStart, nonce: n})
			fw.finish()
			return nil
		}
	}
}

// hostWait paces the guest's reads of its port while no host is connected.
const hostWait = 10 * time.Millisecond

// guestHandshake runs the guest's side over a port it has just opened; r must be the
// port's reader, through which yamux then reads. A virtio-serial port reads end-of-file
// while no host is connected (and data again once one is): the handshake waits for a
// host by reading again every hostWait, so the agent need not close and reopen the port.
func guestHandshake(r io.ByteReader, w io.Writer) error {
	fw := startFrameWriter(w)
	fw.send(frame{kind: frameRequest})
	var acked *nonce
	for {
		f, err := readFrame(r)
		if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
			time.Sleep(hostWait)
			continue
		}
		if err != nil {
			fw.abandon()
			return fmt.Errorf("host handshake: %w", err)
		}
		switch f.kind {
		case frameHello:
			// A HELLO of another nonce is another connection: the one acknowledged
			// went away before its START.
			if acked == nil || *acked != f.nonce {
				n := f.nonce
				acked = &n
				fw.send(frame{kind: frameAck, nonce: n})
			}
		case frameStart:
			if acked != nil && f.nonce == *acked {
				fw.finish()
				return nil
			}
		}
	}
}

// bufferedConn reads through the reader the handshake read from, so that yamux gets
// the bytes it buffered past the last frame.
type bufferedConn struct {
	*bufio.Reader
	io.Writer
	io.Closer
}

func newBufferedConn(c io.ReadWriteCloser) *bufferedConn {
	return &bufferedConn{Reader: bufio.NewReader(c), Writer: c, Closer: c}
}
