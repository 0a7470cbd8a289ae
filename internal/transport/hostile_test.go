package transport

import (
	"bytes"
	"context"
	"io"
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
