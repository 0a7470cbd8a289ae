package transport

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"sync"
	"testing"
	"time"

	agent "github.com/caisson-containers/caisson/api/agent/v1"
)

// writeLog records each Write it is given, and fails the writes it is told to.
type writeLog struct {
	writes [][]byte
	err    error // returned, with 0 bytes written, by every write
}

func (w *writeLog) Write(p []byte) (int, error) {
	if w.err != nil {
		return 0, w.err
	}
	w.writes = append(w.writes, bytes.Clone(p))
	return len(p), nil
}

func TestFrameJoiner(t *testing.T) {
	body := []byte("hello")
	data := yamuxFrame(yamuxTypeData, 0, 1, nil, uint32(len(body)))
	dataSYN := yamuxFrame(yamuxTypeData, yamuxFlagSYN, 3, nil, uint32(len(body)))
	emptyData := yamuxFrame(yamuxTypeData, yamuxFlagSYN, 5, nil, 0)
	windowUpdate := yamuxFrame(1, 0, 1, nil, 256<<10)
	ping := yamuxFrame(yamuxTypePing, yamuxFlagSYN, 0, nil, 7)
	goAway := yamuxFrame(3, 0, 0, nil, 0)
	big := bytes.Repeat([]byte{'b'}, maxJoin+1)
	bigData := yamuxFrame(yamuxTypeData, 0, 1, nil, uint32(len(big)))
	join := func(bs ...[]byte) []byte { return bytes.Join(bs, nil) }
	for _, tc := range []struct {
		name   string
		writes [][]byte
		want   [][]byte
	}{
		{"a data frame goes out in one write", [][]byte{data, body}, [][]byte{join(data, body)}},
		{"frames in a row", [][]byte{data, body, dataSYN, body}, [][]byte{join(data, body), join(dataSYN, body)}},
		{"a data frame without a body goes out at once", [][]byte{emptyData}, [][]byte{emptyData}},
		{"a window update goes out at once", [][]byte{windowUpdate}, [][]byte{windowUpdate}},
		{"a ping goes out at once", [][]byte{ping}, [][]byte{ping}},
		{"a go-away goes out at once", [][]byte{goAway}, [][]byte{goAway}},
		{"frames without a body between data frames", [][]byte{ping, data, body, windowUpdate, goAway}, [][]byte{ping, join(data, body), windowUpdate, goAway}},
		{"a big body's header goes at once", [][]byte{bigData, big}, [][]byte{bigData, big}},
		{"bytes that are no header pass", [][]byte{[]byte("not a header")[:7], bytes.Repeat([]byte{0xca}, yamuxHeaderSize)}, [][]byte{[]byte("not a h"), bytes.Repeat([]byte{0xca}, yamuxHeaderSize)}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var w writeLog
			j := newFrameJoiner(&w)
			for _, p := range tc.writes {
				if n, err := j.Write(p); err != nil || n != len(p) {
					t.Fatalf("Write(%d bytes) = %d, %v", len(p), n, err)
				}
			}
			if len(w.writes) != len(tc.want) {
				t.Fatalf("%d writes, want %d: %q", len(w.writes), len(tc.want), w.writes)
			}
			for i := range tc.want {
				if !bytes.Equal(w.writes[i], tc.want[i]) {
					t.Errorf("write %d = %q, want %q", i, w.writes[i], tc.want[i])
				}
			}
		})
	}
}

func TestFrameJoinerReportsTheBodysWriteError(t *testing.T) {
	broken := errors.New("port gone")
	w := &writeLog{}
	j := newFrameJoiner(w)
	if _, err := j.Write(yamuxFrame(yamuxTypeData, 0, 1, nil, 4)); err != nil {
		t.Fatalf("kept header: %v", err)
	}
	w.err = broken
	if n, err := j.Write([]byte("body")); !errors.Is(err, broken) || n != 0 {
		t.Fatalf("body: %d, %v; want 0, %v", n, err, broken)
	}
	// The joiner keeps nothing after a failed write: the next frame goes alone.
	w.err = nil
	ping := yamuxFrame(yamuxTypePing, 0, 0, nil, 1)
	if _, err := j.Write(ping); err != nil || len(w.writes) != 1 || !bytes.Equal(w.writes[0], ping) {
		t.Fatalf("ping after the failure: %v, writes %q", err, w.writes)
	}
}

// recordedPort is one end of the port that records the writes yamux makes to it (after
// the handshake's, whose frames start with frameMagic).
type recordedPort struct {
	*os.File
	mu     sync.Mutex
	writes [][]byte
}

func (p *recordedPort) Write(b []byte) (int, error) {
	if len(b) > 0 && b[0] != frameMagic[0] {
		p.mu.Lock()
		p.writes = append(p.writes, bytes.Clone(b))
		p.mu.Unlock()
	}
	return p.File.Write(b)
}

// wholeFrames checks that each write holds exactly one yamux frame, its header and its
// whole body, but for a body bigger than maxJoin, which follows its header in a write of
// its own. It counts the data frames with a body written with their header, and those
// written apart.
func (p *recordedPort) wholeFrames(t *testing.T, side string) (joined, apart int) {
	t.Helper()
	p.mu.Lock()
	defer p.mu.Unlock()
	for i := 0; i < len(p.writes); i++ {
		w := p.writes[i]
		if len(w) < yamuxHeaderSize || w[0] != yamuxVersion {
			t.Fatalf("%s write %d of %d bytes is no yamux frame: % x", side, i, len(w), w[:min(len(w), 16)])
		}
		body := 0
		if w[1] == yamuxTypeData {
			body = int(binary.BigEndian.Uint32(w[8:12]))
		}
		switch {
		case body > maxJoin && len(w) == yamuxHeaderSize:
			if i+1 == len(p.writes) || len(p.writes[i+1]) != body {
				t.Fatalf("%s write %d: the header of a %d-byte body not followed by it", side, i, body)
			}
			i++
			apart++
		case len(w) != yamuxHeaderSize+body:
			t.Fatalf("%s write %d: %d bytes, want one frame of %d", side, i, len(w), yamuxHeaderSize+body)
		case body > 0:
			joined++
		}
	}
	return joined, apart
}

// TestEachFrameIsOneWrite drives ttrpc calls and a stdio stream of several windows through
// both sides and checks that every frame each side wrote to the port went in one write.
func TestEachFrameIsOneWrite(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	hostFile, guestFile := socketPair(t)
	hostEnd, guestEnd := &recordedPort{File: hostFile}, &recordedPort{File: guestFile}

	const size = 1 << 20
	got := make(chan string, 1)
	startGuest(t, ctx, guestEnd, func(_ *agent.StdioStream, c net.Conn) {
		defer c.Close()
		h := sha256.New()
		n, err := io.Copy(h, c)
		got <- fmt.Sprintf("%d %x %v", n, h.Sum(nil), err)
	})
	s, c := hostTTRPC(t, ctx, hostEnd)
	for range 20 {
		resp, err := agent.NewSandboxClient(c).Check(ctx, &agent.CheckRequest{})
		if err != nil || resp.GetUptimeNs() != 42 {
			t.Fatalf("Check: %v, %v", resp, err)
		}
	}
	sc, err := OpenStdio(ctx, s, &agent.StdioStream{ContainerId: "c", Stream: agent.StreamKind_STREAM_KIND_STDIN})
	if err != nil {
		t.Fatal(err)
	}
	payload := bytes.Repeat([]byte("0123456789abcdef"), size/16)
	if _, err := sc.Write(payload); err != nil {
		t.Fatal(err)
	}
	sc.Close()
	if g, want := <-got, fmt.Sprintf("%d %x %v", size, sha256.Sum256(payload), nil); g != want {
		t.Fatalf("stdio stream: guest read %s, want %s", g, want)
	}

	// 20 requests and a preamble from the host, then 1 MiB in frames of up to a receive
	// window (256 KiB); 20 replies from the guest.
	if joined, apart := hostEnd.wholeFrames(t, "host"); joined < 20+1 || apart < 4 {
		t.Errorf("host wrote %d data frames with their header, %d apart; want at least 21 and 4", joined, apart)
	}
	if joined, _ := guestEnd.wholeFrames(t, "guest"); joined < 20 {
		t.Errorf("guest wrote %d data frames with their header, want at least 20", joined)
	}
}

// FuzzFrameJoiner writes data cut into writes at the given lengths through a joiner: what
// reaches the port is always what was written, in order, but for at most one kept header
// of a data frame whose body comes next.
func FuzzFrameJoiner(f *testing.F) {
	f.Add(append(yamuxFrame(yamuxTypeData, 0, 1, nil, 3), "abc"...), []byte{12, 3})
	f.Add(append(yamuxFrame(yamuxTypeData, 0, 1, nil, 3), yamuxFrame(yamuxTypePing, 0, 0, nil, 1)...), []byte{12, 12})
	f.Add(yamuxFrame(yamuxTypeData, 0, 1, nil, maxJoin+1), []byte{12})
	f.Fuzz(func(t *testing.T, data, cuts []byte) {
		var w writeLog
		j := newFrameJoiner(&w)
		var in []byte
		for _, c := range append(cuts, 255) {
			n := min(int(c), len(data))
			p := data[:n]
			data = data[n:]
			if n, err := j.Write(p); err != nil || n != len(p) {
				t.Fatalf("Write(%d bytes) = %d, %v", len(p), n, err)
			}
			in = append(in, p...)
			out := bytes.Join(w.writes, nil)
			if !j.kept {
				if !bytes.Equal(out, in) {
					t.Fatalf("nothing kept, yet %d bytes out of %d written", len(out), len(in))
				}
				continue
			}
			// Kept: exactly this write, a data frame's header announcing a body.
			if len(p) != yamuxHeaderSize || p[1] != yamuxTypeData {
				t.Fatalf("kept % x, no data frame's header", p)
			}
			if l := binary.BigEndian.Uint32(p[8:12]); l == 0 || l > maxJoin || !bytes.Equal(append(out, p...), in) {
				t.Fatalf("kept % x: out %d bytes of %d", p, len(out), len(in))
			}
		}
	})
}
