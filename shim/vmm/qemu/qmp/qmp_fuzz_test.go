package qmp

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"net"
	"strings"
	"testing"

	"github.com/containerd/errdefs"
)

// FuzzClient runs the client against a QEMU that sends arbitrary bytes: its first line
// as the greeting, the rest (replies, events, junk) once the client has sent
// qmp_capabilities, then a line of MaxLineBytes+1 bytes if long is set, then the end of
// the connection. New must fail or return a client whose events each have a name and
// whose Events channel closes once the stream has ended; afterwards Execute fails with
// ErrClosed (ResourceExhausted after the long line). Nothing may panic or block.
func FuzzClient(f *testing.F) {
	f.Add(greeting+"\n"+`{"return": {}, "id": "caisson-1"}`+"\n"+
		`{"timestamp": {"seconds": 1700000000, "microseconds": 5}, "event": "DEVICE_DELETED", "data": {"device": "d1"}}`+"\n", false)
	f.Add(greeting+"\n"+`{"error": {"class": "CommandNotFound", "desc": "no"}, "id": "caisson-1"}`+"\n", false)
	f.Add(greeting+"\n"+`{"return": {}, "id": "caisson-1"}`+"\n"+`{"event": "STOP"}`+"\n"+
		`{"event": "BLOCK_IO_ERROR", "data": {"device": "", "node-name": "l1", "operation": "write", "action": "report", "nospace": true}}`+"\n", true)
	f.Add(`{"QMP": {}}`+"\n"+`{"return": {}, "id": 7}`+"\n"+`{"id": ["x"]}`+"\nnot json\n"+`{"event": ""}`+"\n", false)
	f.Add(`{"QMP": null}`+"\n", false)
	f.Add(greeting, false)
	f.Fuzz(func(t *testing.T, stream string, long bool) {
		greet, rest, _ := strings.Cut(stream, "\n")
		conn, qemu := net.Pipe()
		defer qemu.Close()
		go func() {
			defer qemu.Close()
			if _, err := qemu.Write([]byte(greet + "\n")); err != nil {
				return
			}
			// The client's qmp_capabilities, then everything else, as QEMU would.
			br := bufio.NewReader(qemu)
			if _, err := br.ReadBytes('\n'); err != nil {
				return
			}
			go br.WriteTo(discard{}) // later commands: read, never answered
			if _, err := qemu.Write([]byte(rest)); err != nil {
				return
			}
			if long {
				qemu.Write(append(bytes.Repeat([]byte{' '}, MaxLineBytes), '\n'))
			}
		}()
		c, err := New(context.Background(), conn)
		if err != nil {
			return
		}
		defer c.Close()
		for ev := range c.Events() {
			if ev.Name == "" {
				t.Errorf("event without a name: %+v", ev)
			}
		}
		<-c.Done()
		err = c.Execute(context.Background(), "query-status", nil, nil)
		if !errors.Is(err, ErrClosed) {
			t.Errorf("Execute after the stream ended: %v, want ErrClosed", err)
		}
		if long && !errdefs.IsResourceExhausted(err) {
			t.Errorf("Execute after a line over MaxLineBytes: %v, want ResourceExhausted", err)
		}
	})
}

type discard struct{}

func (discard) Write(p []byte) (int, error) { return len(p), nil }
