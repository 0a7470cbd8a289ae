// Package qmp is a small client for the QEMU Machine Protocol: JSON objects over a stream
// (a unix socket), one per line.
//
// New reads QEMU's greeting and negotiates capabilities; Execute sends a command with a
// unique id and waits for the reply with that id; asynchronous events (DEVICE_DELETED,
// SHUTDOWN, ...) arrive on Events in the order QEMU sent them. Reading them never blocks
// the connection, and what waits to be read is bounded: identical events in a row are
// coalesced into one (Event.Count), and beyond MaxQueuedEvents new ones are dropped and
// counted (Dropped). A failed command returns an *Error carrying QMP's error class and
// text.
package qmp

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"runtime"
	"strconv"
	"sync"
	"syscall"
	"time"

	"github.com/containerd/errdefs"
)

// ErrClosed is returned by Execute once the connection is gone (QEMU exited, or Close).
var ErrClosed = fmt.Errorf("qmp connection closed: %w", errdefs.ErrUnavailable)

// MaxLineBytes bounds one QMP message (one line). QEMU's replies to the commands the shim
// sends (device_add, query-migrate, ...) and its events are a few KiB at most; the bound
// keeps a QEMU that misbehaves, or output a guest manages to steer into the monitor,
// from making the shim buffer a line without end. A longer line ends the connection.
const MaxLineBytes = 1 << 20

// MaxQueuedEvents bounds the events received and not yet delivered on Events. QEMU sends
// some events once per guest action (BLOCK_IO_ERROR for every failed request of a guest
// writing to a full disk); identical ones in a row take one place (Event.Count), and a
// reader that keeps up never sees the bound. Beyond it new events are dropped and
// counted, so that the reader never blocks and the queue never grows without end.
const MaxQueuedEvents = 1024

// errLineTooLong is why the connection ended when a line exceeded MaxLineBytes.
var errLineTooLong = fmt.Errorf("qmp message longer than %d bytes: %w", MaxLineBytes, errdefs.ErrResourceExhausted)

// readLine reads one line of at most MaxLineBytes (newline included) from br, whose
// buffer must be smaller than that. Unlike bufio.Reader.ReadBytes it stops at the bound.
func readLine(br *bufio.Reader) ([]byte, error) {
	var line []byte
	for {
		frag, err := br.ReadSlice('\n')
		if len(line)+len(frag) > MaxLineBytes {
			return nil, errLineTooLong
		}
		line = append(line, frag...)
		if err != bufio.ErrBufferFull {
			return line, err
		}
	}
}

// Error is a command's error reply.
type Error struct {
	// Class is QMP's error class: GenericError, CommandNotFound, DeviceNotFound, ...
	Class string
	// Desc is QEMU's human-readable description.
	Desc string
}

func (e *Error) Error() string { return fmt.Sprintf("qmp: %s: %s", e.Class, e.Desc) }

// Unwrap maps the classes that have an errdefs meaning.
func (e *Error) Unwrap() error {
	switch e.Class {
	case "DeviceNotFound":
		return errdefs.ErrNotFound
	case "CommandNotFound":
		return errdefs.ErrNotImplemented
	}
	return nil
}

// Event is an asynchronous message from QEMU.
type Event struct {
	Name      string
	Data      json.RawMessage
	Timestamp time.Time // of the first, if Count > 1
	// Count is how many identical events (same name and data) QEMU sent in a row that
	// this one stands for: 1 unless the reader fell behind a burst.
	Count int
}

// Version is QEMU's version from the greeting.
type Version struct {
	Major, Minor, Micro int
	Package             string
}

type message struct {
	// Greeting.
	QMP *struct {
		Version struct {
			QEMU struct {
				Major int `json:"major"`
				Minor int `json:"minor"`
				Micro int `json:"micro"`
			} `json:"qemu"`
			Package string `json:"package"`
		} `json:"version"`
	} `json:"QMP,omitempty"`
	// Reply.
	ID     json.RawMessage `json:"id,omitempty"`
	Return json.RawMessage `json:"return,omitempty"`
	Error  *struct {
		Class string `json:"class"`
		Desc  string `json:"desc"`
	} `json:"error,omitempty"`
	// Event.
	Event     string          `json:"event,omitempty"`
	Data      json.RawMessage `json:"data,omitempty"`
	Timestamp *struct {
		Seconds      int64 `json:"seconds"`
		Microseconds int64 `json:"microseconds"`
	} `json:"timestamp,omitempty"`
}

type request struct {
	Execute   string `json:"execute"`
	Arguments any    `json:"arguments,omitempty"`
	ID        string `json:"id"`
}

type reply struct {
	ret json.RawMessage
	err error
}

// Client is a QMP connection. Its methods are safe for concurrent use.
type Client struct {
	conn    net.Conn
	version Version

	wmu sync.Mutex // serialises writes

	mu      sync.Mutex
	nextID  uint64
	pending map[string]chan reply
	readErr error

	queue   chan struct{} // wakes the event pump
	events  []Event       // not yet delivered, guarded by mu, at most MaxQueuedEvents
	dropped uint64        // events dropped on a full queue, guarded by mu
	out     chan Event
	done    chan struct{} // closed when the reader stops

	closeOnce sync.Once
	closed    chan struct{} // closed by Close: undelivered events are dropped
}

// New takes over conn: it reads QEMU's greeting and enables command mode
// (qmp_capabilities). ctx bounds the handshake only. On error conn is closed.
func New(ctx context.Context, conn net.Conn) (*Client, error) {
	c := &Client{
		conn:    conn,
		pending: map[string]chan reply{},
		queue:   make(chan struct{}, 1),
		out:     make(chan Event),
		done:    make(chan struct{}),
		closed:  make(chan struct{}),
	}
	br := bufio.NewReader(conn)

	stop := context.AfterFunc(ctx, func() { conn.SetReadDeadline(time.Unix(1, 0)) })
	line, err := readLine(br)
	if !stop() {
		err = errors.Join(ctx.Err(), err)
	}
	conn.SetReadDeadline(time.Time{})
	if err != nil {
		conn.Close()
		return nil, fmt.Errorf("qmp greeting: %w", err)
	}
	var g message
	if err := json.Unmarshal(line, &g); err != nil || g.QMP == nil {
		conn.Close()
		return nil, fmt.Errorf("qmp greeting %q: not a QMP greeting", line)
	}
	v := g.QMP.Version
	c.version = Version{Major: v.QEMU.Major, Minor: v.QEMU.Minor, Micro: v.QEMU.Micro, Package: v.Package}

	go c.read(br)
	go c.pump()
	if err := c.Execute(ctx, "qmp_capabilities", nil, nil); err != nil {
		c.Close()
		return nil, err
	}
	return c, nil
}

// Version is QEMU's version as its greeting announced it.
func (c *Client) Version() Version { return c.version }

// Events delivers QEMU's events in order. It is closed after the connection ends and
// every event received before has been delivered (or Close dropped them). Events that
// nobody reads are kept until Close, coalesced and at most MaxQueuedEvents of them (see
// Dropped).
func (c *Client) Events() <-chan Event { return c.out }

// Dropped is how many events were dropped because MaxQueuedEvents were waiting to be read.
func (c *Client) Dropped() uint64 {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.dropped
}

// Done is closed when the connection has ended.
func (c *Client) Done() <-chan struct{} { return c.done }

// Close ends the connection. Events not yet read are dropped and Events is closed.
func (c *Client) Close() error {
	c.closeOnce.Do(func() { close(c.closed) })
	err := c.conn.Close()
	<-c.done
	if errors.Is(err, net.ErrClosed) {
		return nil
	}
	return err
}

// Execute runs command with args (marshalled to JSON; nil for none) and, if result is not
// nil, unmarshals the reply's "return" into it. A QMP error reply is an *Error.
func (c *Client) Execute(ctx context.Context, command string, args, result any) error {
	return c.execute(ctx, command, args, result, nil)
}

// ExecuteWithFile is Execute sending f's descriptor along with the command (SCM_RIGHTS),
// as QMP's add-fd and getfd take it. The connection must be a unix socket.
func (c *Client) ExecuteWithFile(ctx context.Context, command string, args, result any, f *os.File) error {
	sc, err := f.SyscallConn()
	if err != nil {
		return fmt.Errorf("%s: %w", command, err)
	}
	var rights []byte
	if err := sc.Control(func(fd uintptr) { rights = syscall.UnixRights(int(fd)) }); err != nil {
		return fmt.Errorf("%s: %w", command, err)
	}
	if _, ok := c.conn.(*net.UnixConn); !ok {
		return fmt.Errorf("%s: passing a descriptor needs a unix socket: %w", command, errdefs.ErrNotImplemented)
	}
	// f must stay open until the message is sent.
	defer runtime.KeepAlive(f)
	return c.execute(ctx, command, args, result, rights)
}

func (c *Client) execute(ctx context.Context, command string, args, result any, rights []byte) error {
	c.mu.Lock()
	if c.readErr != nil {
		err := c.readErr
		c.mu.Unlock()
		return fmt.Errorf("%s: %w", command, err)
	}
	c.nextID++
	id := "caisson-" + strconv.FormatUint(c.nextID, 10)
	ch := make(chan reply, 1)
	c.pending[id] = ch
	c.mu.Unlock()

	forget := func() {
		c.mu.Lock()
		delete(c.pending, id)
		c.mu.Unlock()
	}
	b, err := json.Marshal(request{Execute: command, Arguments: args, ID: id})
	if err != nil {
		forget()
		return fmt.Errorf("%s: %w", command, err)
	}
	b = append(b, '\n')
	c.wmu.Lock()
	if rights != nil {
		_, _, err = c.conn.(*net.UnixConn).WriteMsgUnix(b, rights, nil)
	} else {
		_, err = c.conn.Write(b)
	}
	c.wmu.Unlock()
	if err != nil {
		forget()
		return fmt.Errorf("%s: %w: %w", command, ErrClosed, err)
	}

	select {
	case r := <-ch:
		if r.err != nil {
			return fmt.Errorf("%s: %w", command, r.err)
		}
		if result != nil {
			if err := json.Unmarshal(r.ret, result); err != nil {
				return fmt.Errorf("%s: decoding reply %s: %w", command, r.ret, err)
			}
		}
		return nil
	case <-ctx.Done():
		forget()
		return fmt.Errorf("%s: %w", command, ctx.Err())
	}
}

// read dispatches replies to their callers and queues events, until the stream ends.
func (c *Client) read(br *bufio.Reader) {
	var err error
	for {
		var line []byte
		line, err = readLine(br)
		if len(line) > 0 {
			c.handle(line)
		}
		if err != nil {
			break
		}
	}
	switch {
	case errors.Is(err, io.EOF) || errors.Is(err, net.ErrClosed):
		err = ErrClosed
	case errors.Is(err, errLineTooLong):
		// Nothing after an oversized line can be trusted to start a message: the
		// connection is over, and QEMU must not block writing into it.
		c.conn.Close()
		err = fmt.Errorf("%w: %w", ErrClosed, err)
	default:
		err = fmt.Errorf("%w: %w", ErrClosed, err)
	}
	c.mu.Lock()
	c.readErr = err
	for id, ch := range c.pending {
		ch <- reply{err: err}
		delete(c.pending, id)
	}
	c.mu.Unlock()
	close(c.done)
	c.wake()
}

func (c *Client) handle(line []byte) {
	var m message
	if err := json.Unmarshal(line, &m); err != nil {
		// QEMU only sends JSON; a line that is not is ignored rather than fatal.
		return
	}
	switch {
	case m.Event != "":
		ev := Event{Name: m.Event, Data: m.Data, Count: 1}
		if m.Timestamp != nil {
			ev.Timestamp = time.Unix(m.Timestamp.Seconds, m.Timestamp.Microseconds*1000)
		}
		c.queueEvent(ev)
		c.wake()
	case m.ID != nil:
		var id string
		if err := json.Unmarshal(m.ID, &id); err != nil {
			return
		}
		c.mu.Lock()
		ch, ok := c.pending[id]
		delete(c.pending, id)
		c.mu.Unlock()
		if !ok {
			return // the caller gave up
		}
		if m.Error != nil {
			ch <- reply{err: &Error{Class: m.Error.Class, Desc: m.Error.Desc}}
		} else {
			ch <- reply{ret: m.Return}
		}
	}
}

// queueEvent queues ev for the pump: coalesced into the last queued event if identical,
// dropped if the queue is full.
func (c *Client) queueEvent(ev Event) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if n := len(c.events); n > 0 {
		last := &c.events[n-1]
		if last.Name == ev.Name && bytes.Equal(last.Data, ev.Data) {
			last.Count++
			return
		}
	}
	if len(c.events) >= MaxQueuedEvents {
		c.dropped++
		return
	}
	c.events = append(c.events, ev)
}

func (c *Client) wake() {
	select {
	case c.queue <- struct{}{}:
	default:
	}
}

// pump delivers queued events on out, one at a time (an event stays in the queue, where
// the next identical ones coalesce into it, until its turn), without ever blocking the
// reader.
func (c *Client) pump() {
	defer close(c.out)
	for {
		c.mu.Lock()
		if len(c.events) > 0 {
			ev := c.events[0]
			c.events[0] = Event{}
			c.events = c.events[1:]
			c.mu.Unlock()
			select {
			case c.out <- ev:
			case <-c.closed:
				return
			}
			continue
		}
		c.mu.Unlock()
		select {
		case <-c.queue:
		case <-c.done:
			c.mu.Lock()
			n := len(c.events)
			c.mu.Unlock()
			if n == 0 {
				return
			}
		}
	}
}
