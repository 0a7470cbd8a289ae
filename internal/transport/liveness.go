package transport

import (
	"io"
	"sync/atomic"
	"time"

	"github.com/hashicorp/yamux"
)

// livenessInterval is how long the host lets the guest be silent, or one of its own
// writes wait, before it pings the guest.
const livenessInterval = 10 * time.Second

// The host, and only the host, checks that the guest still answers. yamux's keep-alive
// would ping every interval whatever the session carries, from both ends, and each ping
// wakes an idle guest: an interrupt and a reply, under TCG each a round of QEMU's main
// loop and vCPU thread on the host (docs/guest.md, "An idle guest"). The calls the shim
// makes anyway prove as much (containerd's stats collection reaches an idle guest every
// 10 s, shim/task/stats.go), so the host pings only after an interval in which it heard
// no frame from the guest, or in which one of its writes waited the whole interval (a
// guest that stops reading: its frames alone prove nothing). A ping unanswered within
// the session's ConnectionWriteTimeout ends the session, as yamux's keep-alive would.
//
// The guest does not ping: a host that closes its end is an end of file on the guest's
// port (rawport.go), and a host that is there but silent is no reason for the agent to
// drop a session the host may use again.

// liveness records what the host's session hears from the guest and how long its own
// write has waited.
type liveness struct {
	frames  atomic.Uint64 // frames read from the guest
	writing atomic.Int64  // when the write under way began (Unix ns), 0 between writes
}

// heard counts one frame read from the guest.
func (l *liveness) heard() { l.frames.Add(1) }

// stuck says whether a write has been waiting since at least interval before now.
func (l *liveness) stuck(now time.Time, interval time.Duration) bool {
	w := l.writing.Load()
	return w != 0 && now.Sub(time.Unix(0, w)) >= interval
}

// watch pings the guest over ys after each interval that did not show it alive, and
// closes ys if a ping fails. It returns once ys is closed.
func (l *liveness) watch(ys *yamux.Session, interval time.Duration) {
	t := time.NewTicker(interval)
	defer t.Stop()
	seen := l.frames.Load()
	for {
		var now time.Time
		select {
		case <-ys.CloseChan():
			return
		case now = <-t.C:
		}
		if n := l.frames.Load(); n != seen && !l.stuck(now, interval) {
			seen = n
			continue
		}
		if _, err := ys.Ping(); err != nil {
			ys.Close()
			return
		}
		// The ping's answer is no news of the next interval.
		seen = l.frames.Load()
	}
}

// watchedWriter is the host's writer as its liveness sees it: it marks when each write
// begins and ends.
type watchedWriter struct {
	w io.Writer
	l *liveness
}

func (w watchedWriter) Write(p []byte) (int, error) {
	w.l.writing.Store(time.Now().UnixNano())
	defer w.l.writing.Store(0)
	return w.w.Write(p)
}
