package transport

import (
	"encoding/binary"
	"io"
)

// frameJoiner writes each yamux data frame to the port in one write instead of two.
//
// yamux's sender (hashicorp/yamux Session.sendLoop) writes a frame's 12-byte header and
// its body in two Write calls, one after the other from the same goroutine. On
// virtio-serial each write is a buffer of its own: the guest queues and notifies the host
// twice per frame, and under TCG each notification is emulated device work in QEMU's
// vCPU thread and a write into the host's socket; the host's two writes may reach QEMU's
// chardev apart and fill two guest buffers, each read by the agent with a syscall.
//
// The joiner keeps a data frame's header, when its length field says a body of at most
// maxJoin bytes follows, and writes it with the next Write (that body) as one. Every
// other write (a frame without a body: window update, ping, go-away, or a data frame of
// length 0) goes out at once, so no frame waits for a later one; so does the header of
// a bigger body (a stdio stream's bulk, where a write more or less costs nothing that
// counts), which then follows in a write of its own. Bytes go out in the order written
// either way: joining a kept header with whatever Write comes next can never reorder the
// stream, and yamux writes nothing between a header and its body.
//
// It is no more than the writer's half of one session: yamux calls Write from its one
// sending goroutine, and the joiner has no lock.
type frameJoiner struct {
	w    io.Writer
	buf  []byte // the header kept, then the header and the body being written
	kept bool
}

// maxJoin is the biggest body the joiner writes with its header: a ttrpc call's
// message, the buffer kept for it.
const maxJoin = 16 << 10

func newFrameJoiner(w io.Writer) *frameJoiner {
	return &frameJoiner{w: w, buf: make([]byte, 0, yamuxHeaderSize+maxJoin)}
}

func (j *frameJoiner) Write(p []byte) (int, error) {
	if j.kept {
		j.kept = false
		j.buf = append(j.buf[:yamuxHeaderSize], p...)
		n, err := j.w.Write(j.buf)
		// The header was reported written when it was kept.
		n = max(n-yamuxHeaderSize, 0)
		if err == nil && n < len(p) {
			err = io.ErrShortWrite
		}
		return n, err
	}
	if len(p) == yamuxHeaderSize && p[0] == yamuxVersion && p[1] == yamuxTypeData {
		if l := binary.BigEndian.Uint32(p[8:12]); l > 0 && l <= maxJoin {
			j.buf = append(j.buf[:0], p...)
			j.kept = true
			return len(p), nil
		}
	}
	return j.w.Write(p)
}
