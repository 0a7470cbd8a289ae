package transport

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"io"
	"runtime"
	"testing"
	"time"

	"github.com/hashicorp/yamux"
)

// A compromised agent opens streams to the host (which never accepts any) and fills
// them: the host keeps at most one of them, so what it buffers for the guest is
// bounded by one receive window, and the session still carries the shim's own streams.
func TestGuestOpenedStreamsAreNotKept(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	hostEnd, guestEnd := socketPair(t)
	host, err := NewSerialSession(hostEnd)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { host.Close() })
	l, err := ListenSerial(guestEnd)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	accepted := make(chan io.ReadWriteCloser, 1)
	go func() {
		// The first Accept runs the handshake; the host's first stream comes out of it.
		if c, err := l.Accept(); err == nil {
			accepted <- c
		}
	}()
	guest := waitGuestSession(t, l.(*serialListener))
	hs := host.(*serialSession)
	select {
	case <-hs.ready:
	case <-ctx.Done():
		t.Fatal("host session not ready")
	}
	if hs.err != nil {
		t.Fatal(hs.err)
	}

	const streams, each = 64, 64 << 10
	junk := bytes.Repeat([]byte("x"), each)
	for i := range streams {
		st, err := guest.OpenStream()
		if err != nil {
			t.Fatalf("guest stream %d: %v", i, err)
		}
		// Within the initial window, so this does not wait for the host; a stream the
		// host has reset already fails, which is fine.
		st.Write(junk)
	}
	// The guest learns of each reset, so its count falls to what the host kept.
	for guest.NumStreams() > 1 {
		select {
		case <-ctx.Done():
			t.Fatalf("host keeps %d of the %d streams the guest opened (guest still has %d open), want at most 1",
				hs.ys.NumStreams(), streams, guest.NumStreams())
		case <-time.After(10 * time.Millisecond):
		}
	}
	if n := hs.ys.NumStreams(); n > 1 {
		t.Fatalf("host keeps %d guest-opened streams, want at most 1", n)
	}

	// The shim's own streams still work.
	c, err := host.Open(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := c.Write([]byte("ping")); err != nil {
		t.Fatal(err)
	}
	var g io.ReadWriteCloser
	select {
	case g = <-accepted:
	case <-ctx.Done():
		t.Fatal("guest did not accept the host's stream")
	}
	defer g.Close()
	b := make([]byte, 4)
	if _, err := io.ReadFull(g, b); err != nil || string(b) != "ping" {
		t.Fatalf("guest read %q, %v", b, err)
	}
}

// waitGuestSession returns the guest listener's yamux session once its handshake is over.
func waitGuestSession(t *testing.T, l *serialListener) *yamux.Session {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		l.mu.Lock()
		ys := l.ys
		l.mu.Unlock()
		if ys != nil {
			return ys
		}
		time.Sleep(5 * time.Millisecond)
	}
	t.Fatal("guest handshake did not finish")
	return nil
}

// yamuxFrame is a raw yamux frame: a header and, for data, the body.
func yamuxFrame(typ uint8, flags uint16, stream uint32, body []byte, length uint32) []byte {
	b := make([]byte, yamuxHeaderSize, yamuxHeaderSize+len(body))
	b[1] = typ
	binary.BigEndian.PutUint16(b[2:4], flags)
	binary.BigEndian.PutUint32(b[4:8], stream)
	binary.BigEndian.PutUint32(b[8:12], length)
	return append(b, body...)
}

func TestPingLimiter(t *testing.T) {
	pingSYN := yamuxFrame(yamuxTypePing, yamuxFlagSYN, 0, nil, 7)
	pingACK := yamuxFrame(yamuxTypePing, 2, 0, nil, 7)
	// A data frame whose body is made of ping requests: it is data, and passes whole.
	pingsAsData := bytes.Repeat(pingSYN, 100)
	data := yamuxFrame(yamuxTypeData, 0, 3, pingsAsData, uint32(len(pingsAsData)))
	window := yamuxFrame(1, yamuxFlagSYN, 5, nil, 0)
	cat := func(parts ...[]byte) []byte { return bytes.Join(parts, nil) }
	for _, tc := range []struct {
		name string
		in   []byte
		want []byte
	}{
		{"other frames pass", cat(window, data, pingACK), cat(window, data, pingACK)},
		{"pings up to the burst pass", bytes.Repeat(pingSYN, guestPingBurst), bytes.Repeat(pingSYN, guestPingBurst)},
		{"a flood of pings is cut to the burst", cat(bytes.Repeat(pingSYN, 10_000), data),
			cat(bytes.Repeat(pingSYN, guestPingBurst), data)},
		{"answers to the host's pings are not limited", bytes.Repeat(pingACK, 1000), bytes.Repeat(pingACK, 1000)},
		{"a frame cut short ends the stream", data[:50], data[:50]},
	} {
		t.Run(tc.name, func(t *testing.T) {
			// One byte at a time, then all at once: frames split anywhere.
			for _, chunk := range []int{1, 7, 4096} {
				var got bytes.Buffer
				p := newPingLimiter(bytes.NewReader(tc.in))
				buf := make([]byte, chunk)
				for {
					n, err := p.Read(buf)
					got.Write(buf[:n])
					if err != nil {
						break
					}
				}
				// The rate may refill a ping or two while the test runs.
				gotPings, gotRest := leadingFrames(got.Bytes(), pingSYN)
				wantPings, wantRest := leadingFrames(tc.want, pingSYN)
				if gotPings < wantPings || gotPings > wantPings+2 || !bytes.Equal(gotRest, wantRest) {
					t.Fatalf("reads of %d: got %d pings then %d bytes, want %d pings then %d bytes",
						chunk, gotPings, len(gotRest), wantPings, len(wantRest))
				}
			}
		})
	}
}

// leadingFrames counts the copies of frame b starts with, and returns what follows.
func leadingFrames(b, frame []byte) (int, []byte) {
	n := 0
	for bytes.HasPrefix(b, frame) {
		b, n = b[len(frame):], n+1
	}
	return n, b
}

// A compromised agent sends ping requests without end and reads nothing, so that the
// host's answers wait: yamux answers each from a goroutine of its own that waits for
// room to send (30 s). The host must not start one per ping.
func TestGuestPingFloodIsBounded(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	hostEnd, guestEnd := socketPair(t)
	host, err := NewSerialSession(hostEnd)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { host.Close() })
	// The guest shakes hands, then speaks raw yamux and never reads again.
	gr := bufio.NewReader(guestEnd)
	if err := guestHandshake(gr, guestEnd); err != nil {
		t.Fatal(err)
	}
	hs := host.(*serialSession)
	select {
	case <-hs.ready:
	case <-ctx.Done():
		t.Fatal("host session not ready")
	}
	if hs.err != nil {
		t.Fatal(hs.err)
	}
	before := runtime.NumGoroutine()
	const pings = 200_000 // 2.4 MB, a fraction of a second of a virtio-serial port
	ping := yamuxFrame(yamuxTypePing, yamuxFlagSYN, 0, nil, 1)
	batch := bytes.Repeat(ping, 1000)
	for range pings / 1000 {
		if _, err := guestEnd.Write(batch); err != nil {
			t.Fatal(err)
		}
	}
	// Let the host read them all: it answers the allowed ones, then nothing else
	// is pending; a frame after the pings proves they were read.
	if _, err := guestEnd.Write(yamuxFrame(1, yamuxFlagSYN, 2, nil, 0)); err != nil {
		t.Fatal(err)
	}
	for hs.ys.NumStreams() == 0 {
		select {
		case <-ctx.Done():
			t.Fatal("the host did not read the guest's frames")
		case <-time.After(10 * time.Millisecond):
		}
	}
	if grown := runtime.NumGoroutine() - before; grown > 100 {
		t.Fatalf("%d goroutines more after %d pings from a guest that reads nothing, want at most 100", grown, pings)
	}
}
