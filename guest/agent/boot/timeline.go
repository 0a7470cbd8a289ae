package boot

import (
	"cmp"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/containerd/errdefs"
	"golang.org/x/sys/unix"
)

// Timeline records when the steps of the agent's start ended (the guest's uptime), to be
// logged at once: under TCG every byte written to the serial console costs, so a line
// per step would slow down the start it measures.
type Timeline struct {
	steps []string
	at    []time.Duration
}

// Mark records that step ended now.
func (t *Timeline) Mark(step string) {
	t.steps = append(t.steps, step)
	t.at = append(t.at, Uptime())
}

// String is "step=uptime(+since the previous step) ...", in milliseconds, in the order
// of the uptimes.
func (t *Timeline) String() string {
	order := make([]int, len(t.steps))
	for i := range order {
		order[i] = i
	}
	slices.SortStableFunc(order, func(i, j int) int { return cmp.Compare(t.at[i], t.at[j]) })
	var b strings.Builder
	for k, i := range order {
		if k > 0 {
			fmt.Fprintf(&b, " %s=%d(+%d)", t.steps[i], t.at[i].Milliseconds(), (t.at[i] - t.at[order[k-1]]).Milliseconds())
			continue
		}
		fmt.Fprintf(&b, "%s=%d", t.steps[i], t.at[i].Milliseconds())
	}
	return b.String()
}

// MarkAt records that step ended at uptime at.
func (t *Timeline) MarkAt(step string, at time.Duration) {
	t.steps = append(t.steps, step)
	t.at = append(t.at, at)
}

// runInitMessage is what the kernel logs when it starts the init process.
const runInitMessage = "Run /init as init process"

// InitStarted returns the uptime at which the kernel started /init, from its log
// (/dev/kmsg, which has every message, `quiet` or not).
func InitStarted() (time.Duration, error) {
	// Raw reads: an *os.File would wait in Go's poller at the end of the log, where a
	// non-blocking read fails with EAGAIN.
	fd, err := unix.Open("/dev/kmsg", unix.O_RDONLY|unix.O_NONBLOCK|unix.O_CLOEXEC, 0)
	if err != nil {
		return 0, fmt.Errorf("open /dev/kmsg: %w", err)
	}
	defer unix.Close(fd)
	buf := make([]byte, 8192) // a read returns one record
	for {
		n, err := unix.Read(fd, buf)
		if errors.Is(err, unix.EPIPE) || errors.Is(err, unix.EINTR) {
			continue // records overwritten since the last read: read on
		}
		if err != nil || n <= 0 {
			// EAGAIN: the end of the log
			return 0, fmt.Errorf("%q not in the kernel log: %w", runInitMessage, errdefs.ErrNotFound)
		}
		// PRIORITY,SEQUENCE,MICROSECONDS,FLAGS[,...];MESSAGE
		head, msg, ok := strings.Cut(string(buf[:n]), ";")
		if !ok || !strings.HasPrefix(msg, runInitMessage) {
			continue
		}
		f := strings.Split(head, ",")
		if len(f) < 3 {
			continue
		}
		us, err := strconv.ParseInt(f[2], 10, 64)
		if err != nil {
			continue
		}
		return time.Duration(us) * time.Microsecond, nil
	}
}
