package transport

import (
	"encoding/binary"
	"io"

	"golang.org/x/time/rate"
)

// yamux's framing (hashicorp/yamux const.go): a 12-byte header (version, type, flags,
// stream id, length); only a data frame has a body, of length bytes.
const (
	yamuxHeaderSize = 12
	yamuxVersion    = 0
	yamuxTypeData   = 0
	yamuxTypePing   = 2
	yamuxFlagSYN    = 1
)

const (
	// guestPingRate and guestPingBurst bound the ping requests of the guest the host
	// answers. The agent does not ping (liveness.go); a compromised one may.
	guestPingRate  = rate.Limit(1)
	guestPingBurst = 8
)

// pingLimiter passes the guest's yamux frames to the host's session, but drops the
// guest's ping requests beyond guestPingRate. yamux answers each ping request from a
// goroutine of its own, which waits up to ConnectionWriteTimeout (30 s) for room to
// send (Session.handlePing): a guest that pings without end while it reads nothing
// (so that the shim's writes wait) would make the shim start goroutines, each with
// its stack, without end: hundreds of thousands a second over a virtio-serial port.
// A ping dropped is one the guest sees unanswered, which can end only its own session.
// Other frames pass untouched, so yamux still rejects what is malformed; each one that
// passes counts as news from the guest for the host's liveness check (liveness.go).
type pingLimiter struct {
	r       io.Reader
	limit   *rate.Limiter
	hdr     [yamuxHeaderSize]byte
	pending []byte // of hdr, to hand out
	body    uint32 // bytes of the current data frame's body still to pass
	dropped uint64
	live    *liveness // told of each frame passed, if not nil
}

func newPingLimiter(r io.Reader) *pingLimiter {
	return &pingLimiter{r: r, limit: rate.NewLimiter(guestPingRate, guestPingBurst)}
}

func (p *pingLimiter) Read(b []byte) (int, error) {
	if len(b) == 0 {
		return 0, nil
	}
	for {
		if len(p.pending) > 0 {
			n := copy(b, p.pending)
			p.pending = p.pending[n:]
			return n, nil
		}
		if p.body > 0 {
			n, err := p.r.Read(b[:min(uint32(len(b)), p.body)])
			p.body -= uint32(n)
			return n, err
		}
		if _, err := io.ReadFull(p.r, p.hdr[:]); err != nil {
			return 0, err
		}
		typ, flags := p.hdr[1], binary.BigEndian.Uint16(p.hdr[2:4])
		switch {
		case typ == yamuxTypeData:
			p.body = binary.BigEndian.Uint32(p.hdr[8:12])
		case typ == yamuxTypePing && flags&yamuxFlagSYN != 0 && !p.limit.Allow():
			p.dropped++
			continue
		}
		p.pending = p.hdr[:]
		if p.live != nil {
			p.live.heard()
		}
	}
}

// limitedConn is the host's connection as its yamux session sees it: reads through the
// ping limiter, writes and closes as the connection does.
type limitedConn struct {
	io.Reader
	io.Writer
	io.Closer
}
