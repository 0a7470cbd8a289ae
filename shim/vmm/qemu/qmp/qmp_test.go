package qmp

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/containerd/errdefs"
)

const greeting = `{"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": "Debian"}, "capabilities": ["oob"]}}`

// socketpair returns two connected unix stream sockets, closed at the end of the test.
func socketpair(t *testing.T) (net.Conn, net.Conn) {
	t.Helper()
	fds, err := syscall.Socketpair(syscall.AF_UNIX, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	conn := func(fd int) net.Conn {
		f := os.NewFile(uintptr(fd), "socketpair")
		defer f.Close()
		c, err := net.FileConn(f)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		return c
	}
	return conn(fds[0]), conn(fds[1])
}

// fakeQEMU speaks the server side of QMP on conn: it sends the greeting, then hands every
// request to handle, which writes whatever lines it wants (replies, events) with send.
type fakeQEMU struct {
	conn net.Conn
	reqs chan map[string]any
}

func startFake(t *testing.T, conn net.Conn, greet string) *fakeQEMU {
	t.Helper()
	f := &fakeQEMU{conn: conn, reqs: make(chan map[string]any, 16)}
	if greet != "" {
		f.send(t, greet)
	}
	go func() {
		defer close(f.reqs)
		sc := bufio.NewScanner(conn)
		for sc.Scan() {
			var m map[string]any
			if err := json.Unmarshal(sc.Bytes(), &m); err != nil {
				return
			}
			f.reqs <- m
		}
	}()
	return f
}

func (f *fakeQEMU) send(t *testing.T, line string) {
	t.Helper()
	if _, err := f.conn.Write([]byte(line + "\r\n")); err != nil {
		t.Errorf("fake qemu write: %v", err)
	}
}

// next returns the next request, failing the test if none comes.
func (f *fakeQEMU) next(t *testing.T) map[string]any {
	t.Helper()
	select {
	case m, ok := <-f.reqs:
		if !ok {
			t.Fatal("client closed the connection")
		}
		return m
	case <-time.After(5 * time.Second):
		t.Fatal("no request from the client")
	}
	return nil
}

func (f *fakeQEMU) reply(t *testing.T, req map[string]any, body string) {
	t.Helper()
	id, _ := json.Marshal(req["id"])
	f.send(t, fmt.Sprintf(`{%s, "id": %s}`, body, id))
}

// connect runs New against a fake that accepts qmp_capabilities.
func connect(t *testing.T) (*Client, *fakeQEMU) {
	t.Helper()
	cc, sc := socketpair(t)
	f := startFake(t, sc, greeting)
	type result struct {
		c   *Client
		err error
	}
	res := make(chan result, 1)
	go func() {
		c, err := New(context.Background(), cc)
		res <- result{c, err}
	}()
	req := f.next(t)
	if req["execute"] != "qmp_capabilities" {
		t.Fatalf("first command %v, want qmp_capabilities", req)
	}
	f.reply(t, req, `"return": {}`)
	r := <-res
	if r.err != nil {
		t.Fatal(r.err)
	}
	t.Cleanup(func() { r.c.Close() })
	return r.c, f
}

func TestHandshake(t *testing.T) {
	c, _ := connect(t)
	if v := c.Version(); v.Major != 7 || v.Minor != 2 || v.Micro != 22 || v.Package != "Debian" {
		t.Fatalf("version %+v", v)
	}
}

func TestBadGreeting(t *testing.T) {
	for _, tc := range []struct {
		name  string
		greet string
		close bool
	}{
		{name: "not json", greet: "hello"},
		{name: "not a greeting", greet: `{"return": {}}`},
		{name: "eof", close: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cc, sc := socketpair(t)
			if tc.greet != "" {
				startFake(t, sc, tc.greet)
			}
			if tc.close {
				sc.Close()
			}
			if _, err := New(context.Background(), cc); err == nil {
				t.Fatal("New succeeded")
			}
		})
	}
}

func TestGreetingTimeout(t *testing.T) {
	cc, _ := socketpair(t)
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	_, err := New(ctx, cc)
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("got %v, want deadline exceeded", err)
	}
}

func TestExecute(t *testing.T) {
	c, f := connect(t)
	type status struct {
		Running bool   `json:"running"`
		Status  string `json:"status"`
	}
	done := make(chan error, 1)
	var st status
	go func() {
		done <- c.Execute(context.Background(), "query-status", nil, &st)
	}()
	req := f.next(t)
	if req["execute"] != "query-status" {
		t.Fatalf("request %v", req)
	}
	if _, ok := req["arguments"]; ok {
		t.Fatalf("request %v has arguments", req)
	}
	f.reply(t, req, `"return": {"running": true, "status": "running"}`)
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if !st.Running || st.Status != "running" {
		t.Fatalf("status %+v", st)
	}

	go func() {
		done <- c.Execute(context.Background(), "device_del", map[string]string{"id": "blk0"}, nil)
	}()
	req = f.next(t)
	if args, _ := req["arguments"].(map[string]any); args["id"] != "blk0" {
		t.Fatalf("request %v", req)
	}
	f.reply(t, req, `"error": {"class": "DeviceNotFound", "desc": "Device 'blk0' not found"}`)
	err := <-done
	var qerr *Error
	if !errors.As(err, &qerr) || qerr.Class != "DeviceNotFound" || qerr.Desc != "Device 'blk0' not found" {
		t.Fatalf("got %v, want a DeviceNotFound *Error", err)
	}
	if !errdefs.IsNotFound(err) {
		t.Fatalf("%v is not ErrNotFound", err)
	}
}

// Replies are matched by id, not by order.
func TestConcurrentRepliesOutOfOrder(t *testing.T) {
	c, f := connect(t)
	const n = 5
	errs := make(chan error, n)
	for i := range n {
		go func() {
			var got string
			if err := c.Execute(context.Background(), "echo", map[string]int{"n": i}, &got); err != nil {
				errs <- err
				return
			}
			if want := fmt.Sprint(i); got != want {
				errs <- fmt.Errorf("command %d got reply %q", i, got)
				return
			}
			errs <- nil
		}()
	}
	var reqs []map[string]any
	for range n {
		reqs = append(reqs, f.next(t))
	}
	for i := n - 1; i >= 0; i-- {
		nn := reqs[i]["arguments"].(map[string]any)["n"]
		f.reply(t, reqs[i], fmt.Sprintf(`"return": "%v"`, nn))
	}
	for range n {
		if err := <-errs; err != nil {
			t.Error(err)
		}
	}
}

// Events arrive in order on Events, even when nobody reads them while commands run.
func TestEvents(t *testing.T) {
	c, f := connect(t)
	const n = 300 // more than any reasonable channel buffer
	for i := range n {
		f.send(t, fmt.Sprintf(`{"timestamp": {"seconds": 1700000000, "microseconds": %d}, "event": "DEVICE_DELETED", "data": {"device": "d%d"}}`, i, i))
	}
	executeDespiteEvents(t, c, f, 5*time.Second)
	for i := range n {
		select {
		case ev := <-c.Events():
			var data struct{ Device string }
			if err := json.Unmarshal(ev.Data, &data); err != nil {
				t.Fatal(err)
			}
			if ev.Name != "DEVICE_DELETED" || data.Device != fmt.Sprintf("d%d", i) {
				t.Fatalf("event %d: %s %s", i, ev.Name, ev.Data)
			}
			if want := time.Unix(1700000000, int64(i)*1000); !ev.Timestamp.Equal(want) {
				t.Fatalf("event %d at %v, want %v", i, ev.Timestamp, want)
			}
		case <-time.After(5 * time.Second):
			t.Fatalf("event %d not delivered", i)
		}
	}
}

// When QEMU goes away, waiting commands fail with ErrClosed, later ones too, and Events
// is closed after the events that came before.
func TestConnectionLost(t *testing.T) {
	c, f := connect(t)
	done := make(chan error, 1)
	go func() { done <- c.Execute(context.Background(), "quit", nil, nil) }()
	f.next(t)
	f.send(t, `{"timestamp": {"seconds": 1, "microseconds": 0}, "event": "SHUTDOWN", "data": {"guest": false, "reason": "host-qmp-quit"}}`)
	f.conn.Close()
	if err := <-done; !errors.Is(err, ErrClosed) || !errdefs.IsUnavailable(err) {
		t.Fatalf("pending command: %v, want ErrClosed", err)
	}
	if err := c.Execute(context.Background(), "query-status", nil, nil); !errors.Is(err, ErrClosed) {
		t.Fatalf("later command: %v, want ErrClosed", err)
	}
	select {
	case <-c.Done():
	case <-time.After(5 * time.Second):
		t.Fatal("Done not closed")
	}
	ev, ok := <-c.Events()
	if !ok || ev.Name != "SHUTDOWN" {
		t.Fatalf("got %v %v, want the SHUTDOWN event", ev, ok)
	}
	if _, ok := <-c.Events(); ok {
		t.Fatal("Events not closed")
	}
}

func TestExecuteContextCanceled(t *testing.T) {
	c, f := connect(t)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- c.Execute(ctx, "slow", nil, nil) }()
	req := f.next(t)
	cancel()
	if err := <-done; !errors.Is(err, context.Canceled) {
		t.Fatalf("got %v, want context.Canceled", err)
	}
	// The late reply is dropped and the connection still works.
	f.reply(t, req, `"return": {}`)
	go func() { done <- c.Execute(context.Background(), "fast", nil, nil) }()
	f.reply(t, f.next(t), `"return": {}`)
	if err := <-done; err != nil {
		t.Fatal(err)
	}
}

func TestCloseDropsUnreadEvents(t *testing.T) {
	c, f := connect(t)
	f.send(t, `{"event": "RESUME"}`)
	f.send(t, `{"event": "STOP"}`)
	// Make sure the client has read them before closing.
	done := make(chan error, 1)
	go func() { done <- c.Execute(context.Background(), "x", nil, nil) }()
	f.reply(t, f.next(t), `"return": {}`)
	<-done
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	deadline := time.After(5 * time.Second)
	for {
		select {
		case _, ok := <-c.Events():
			if !ok {
				return
			}
		case <-deadline:
			t.Fatal("Events not closed after Close")
		}
	}
}

// floodLine writes one line of n bytes (no newline) to conn, in chunks, stopping early
// when the peer closes: what a misbehaving QEMU does with an endless message.
func floodLine(conn net.Conn, prefix string, n int) {
	conn.Write([]byte(prefix))
	chunk := bytes.Repeat([]byte("a"), 64<<10)
	for sent := 0; sent < n; sent += len(chunk) {
		if _, err := conn.Write(chunk); err != nil {
			return
		}
	}
}

// A line longer than MaxLineBytes ends the connection with an error naming the limit,
// instead of growing the shim's buffer for as long as the peer writes.
func TestOversizedLineEndsTheConnection(t *testing.T) {
	c, f := connect(t)
	done := make(chan error, 1)
	go func() { done <- c.Execute(context.Background(), "query-status", nil, nil) }()
	f.next(t)
	// Eight times the limit, then silence with the connection open: a reader without a
	// bound would still be waiting for the newline.
	go floodLine(f.conn, `{"return": "`, 8*MaxLineBytes)
	select {
	case err := <-done:
		if !errdefs.IsResourceExhausted(err) || !errors.Is(err, ErrClosed) {
			t.Fatalf("pending command: %v, want ErrClosed and ResourceExhausted", err)
		}
		if !strings.Contains(err.Error(), strconv.Itoa(MaxLineBytes)) {
			t.Fatalf("error %q does not name the limit %d", err, MaxLineBytes)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("a line 8 times MaxLineBytes long did not end the connection")
	}
	select {
	case <-c.Done():
	case <-time.After(5 * time.Second):
		t.Fatal("Done not closed")
	}
}

// The greeting is bounded the same way.
func TestOversizedGreeting(t *testing.T) {
	cc, sc := socketpair(t)
	go floodLine(sc, `{"QMP": "`, 8*MaxLineBytes)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	_, err := New(ctx, cc)
	if !errdefs.IsResourceExhausted(err) {
		t.Fatalf("New: %v, want ResourceExhausted", err)
	}
}

// A QEMU that floods events nobody reads neither blocks the connection nor grows the
// queue past MaxQueuedEvents: a burst of identical events takes one place (Count), and
// distinct events beyond the bound are dropped and counted, in order otherwise.
func TestEventFloodIsBounded(t *testing.T) {
	c, f := connect(t)
	const same, distinct = 100000, 3 * MaxQueuedEvents
	var b bytes.Buffer
	for range same {
		b.WriteString(`{"timestamp": {"seconds": 1, "microseconds": 0}, "event": "BLOCK_IO_ERROR", "data": {"node-name": "blk0-node", "operation": "write", "action": "report", "nospace": true}}` + "\n")
	}
	for i := range distinct {
		fmt.Fprintf(&b, `{"event": "DEVICE_DELETED", "data": {"device": "d%d"}}`+"\n", i)
	}
	// The burst goes out whole before the reply (written on the same connection from
	// another goroutine, the reply could overtake it); the client reads it as it comes,
	// or the write never ends.
	wrote := make(chan error, 1)
	go func() { _, err := f.conn.Write(b.Bytes()); wrote <- err }()
	select {
	case err := <-wrote:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("the client stopped reading: the event burst was not read in 30 s")
	}
	// Once the reply comes, everything before it has been read.
	executeDespiteEvents(t, c, f, 30*time.Second)
	c.mu.Lock()
	queued := len(c.events)
	c.mu.Unlock()
	if queued > MaxQueuedEvents {
		t.Fatalf("%d events queued, more than %d", queued, MaxQueuedEvents)
	}
	// The pump may hold one event it is delivering, outside the queue.
	if d, max := c.Dropped(), uint64(distinct+1-MaxQueuedEvents); d == 0 || d > max {
		t.Fatalf("Dropped() = %d, want 1 to %d", d, max)
	}
	// The connection ends; Events delivers what was queued, then closes.
	f.conn.Close()
	var blockErrs, blockEvents int
	next := 0
	for ev := range c.Events() {
		switch ev.Name {
		case "BLOCK_IO_ERROR":
			if next > 0 {
				t.Fatalf("BLOCK_IO_ERROR after DEVICE_DELETED d%d", next-1)
			}
			blockErrs += ev.Count
			blockEvents++
		case "DEVICE_DELETED":
			var data struct{ Device string }
			json.Unmarshal(ev.Data, &data)
			if data.Device != fmt.Sprintf("d%d", next) || ev.Count != 1 {
				t.Fatalf("event %d: %s %s x%d, want d%d", next, ev.Name, ev.Data, ev.Count, next)
			}
			next++
		default:
			t.Fatalf("unexpected event %s", ev.Name)
		}
	}
	// One may have been on its way out while the rest of the burst coalesced.
	if blockErrs != same || blockEvents > 2 {
		t.Fatalf("%d BLOCK_IO_ERROR in %d events, want %d in at most 2", blockErrs, blockEvents, same)
	}
	if got := uint64(next) + c.Dropped(); got != distinct {
		t.Fatalf("%d delivered + %d dropped, want %d", next, c.Dropped(), distinct)
	}
}

// ExecuteWithFile sends the file's descriptor with the command, in the same message, as
// QEMU's add-fd expects it.
func TestExecuteWithFile(t *testing.T) {
	cc, sc := socketpair(t)
	go func() {
		sc.Write([]byte(greeting + "\n"))
	}()
	type result struct {
		c   *Client
		err error
	}
	res := make(chan result, 1)
	go func() {
		c, err := New(context.Background(), cc)
		res <- result{c, err}
	}()
	us := sc.(*net.UnixConn)
	readReq := func() (map[string]any, []byte) {
		buf := make([]byte, 4096)
		oob := make([]byte, syscall.CmsgSpace(4))
		n, oobn, _, _, err := us.ReadMsgUnix(buf, oob)
		if err != nil {
			t.Fatal(err)
		}
		var m map[string]any
		if err := json.Unmarshal(bytes.TrimSpace(buf[:n]), &m); err != nil {
			t.Fatalf("%q: %v", buf[:n], err)
		}
		return m, oob[:oobn]
	}
	reply := func(req map[string]any, body string) {
		id, _ := json.Marshal(req["id"])
		fmt.Fprintf(sc, `{%s, "id": %s}`+"\n", body, id)
	}
	req, _ := readReq()
	reply(req, `"return": {}`)
	r := <-res
	if r.err != nil {
		t.Fatal(r.err)
	}
	defer r.c.Close()

	f, err := os.CreateTemp(t.TempDir(), "disk")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	f.WriteString("disk content")
	done := make(chan error, 1)
	var got struct {
		FD int `json:"fd"`
	}
	go func() { done <- r.c.ExecuteWithFile(context.Background(), "add-fd", nil, &got, f) }()
	req, oob := readReq()
	if req["execute"] != "add-fd" {
		t.Fatalf("request %v", req)
	}
	msgs, err := syscall.ParseSocketControlMessage(oob)
	if err != nil || len(msgs) != 1 {
		t.Fatalf("control messages %v, %v", msgs, err)
	}
	fds, err := syscall.ParseUnixRights(&msgs[0])
	if err != nil || len(fds) != 1 {
		t.Fatalf("rights %v, %v", fds, err)
	}
	passed := os.NewFile(uintptr(fds[0]), "passed")
	defer passed.Close()
	b := make([]byte, 12)
	if _, err := passed.ReadAt(b, 0); err != nil || string(b) != "disk content" {
		t.Fatalf("the passed descriptor reads %q (%v)", b, err)
	}
	reply(req, `"return": {"fdset-id": 0, "fd": 42}`)
	if err := <-done; err != nil || got.FD != 42 {
		t.Fatalf("ExecuteWithFile: %v, fd %d", err, got.FD)
	}
}

// executeDespiteEvents runs a command while events wait unread, and fails the test if
// its reply does not come within timeout.
func executeDespiteEvents(t *testing.T, c *Client, f *fakeQEMU, timeout time.Duration) {
	t.Helper()
	done := make(chan error, 1)
	go func() { done <- c.Execute(context.Background(), "query-status", nil, nil) }()
	f.reply(t, f.next(t), `"return": {}`)
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(timeout):
		t.Fatal("unread events blocked a reply")
	}
}
