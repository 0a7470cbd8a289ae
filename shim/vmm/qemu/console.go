package qemu

import (
	"fmt"
	"io"
	"os"

	"github.com/containerd/log"
)

const (
	// consoleHead is how much of the guest console's first output the console log
	// keeps: the kernel's boot messages and the agent's start.
	consoleHead = 64 << 10
	// consoleTail is how much of its latest output the log keeps at least (up to
	// twice as much between compactions): what led to a crash or a hang.
	consoleTail = 64 << 10
	// ConsoleLogMax bounds the console log file: the head, the marker that says how
	// much was dropped, and up to twice the tail.
	ConsoleLogMax = consoleHead + markerLen + 2*consoleTail

	// qemuLogHead and qemuLogTail are the same for QEMU's own output (qemu.log): its
	// start-up complaints and its last words. A guest may make QEMU print on every
	// occurrence of some device error, so it is bounded like the console.
	qemuLogHead = 16 << 10
	qemuLogTail = 16 << 10
	// QEMULogMax bounds qemu.log.
	QEMULogMax = qemuLogHead + qemuMarkerLen + 2*qemuLogTail
)

// markerLen and qemuMarkerLen are the lengths of every dropped-bytes marker of the
// console and of qemu.log: fixed (the count is padded to 20 digits, enough for any
// int64), so that the tail starts at the same offset each time.
const (
	markerLen     = 65
	qemuMarkerLen = 62
)

// Names of the output each log keeps, in its marker.
const (
	consoleOutput = "console output"
	qemuOutput    = "qemu output"
)

func marker(what string, dropped int64) string {
	return fmt.Sprintf("\n[caisson: %20d bytes of %s dropped]\n", dropped, what)
}

// consoleLog is the guest console's log file, of at most ConsoleLogMax bytes. The guest
// writes to its serial port as fast as it likes, and the file lives in the pod's state
// directory on /run (tmpfs: host memory), so QEMU writes into a pipe and the shim
// copies into the file, keeping the first consoleHead bytes, then the latest output
// behind a marker that counts what was dropped. The file stays readable as it grows
// (in order, the middle left out).
type consoleLog struct {
	f         *os.File
	what      string // what it logs, for the marker
	head      int64  // bytes kept from the start
	tail      int64  // least bytes of the latest output kept
	size      int64  // of the file
	tailStart int64  // where the latest output begins: head, or after the marker
	dropped   int64
	buf       []byte // scratch for compact
}

func newConsoleLog(f *os.File, head, tail int64) *consoleLog {
	return newBoundedLog(f, consoleOutput, head, tail)
}

// newBoundedLog is a log like the console's of another output, what.
func newBoundedLog(f *os.File, what string, head, tail int64) *consoleLog {
	return &consoleLog{f: f, what: what, head: head, tail: tail, tailStart: head}
}

// Write appends p to the log, dropping from the middle what exceeds the bound. It
// reports len(p) written unless the file fails.
func (c *consoleLog) Write(p []byte) (int, error) {
	total := len(p)
	for len(p) > 0 {
		var n int
		if c.size < c.head {
			n = int(min(int64(len(p)), c.head-c.size))
		} else {
			// Never more than the room left before the next compaction.
			room := c.tailStart + 2*c.tail - c.size
			if room <= 0 {
				if err := c.compact(); err != nil {
					return total - len(p), err
				}
				continue
			}
			n = int(min(int64(len(p)), room))
		}
		if _, err := c.f.WriteAt(p[:n], c.size); err != nil {
			return total - len(p), err
		}
		c.size += int64(n)
		p = p[n:]
	}
	return total, nil
}

// compact keeps the latest tail bytes, moved right behind the marker, and drops the
// rest of the output since the head.
func (c *consoleLog) compact() error {
	keepFrom := c.size - c.tail
	c.dropped += keepFrom - c.tailStart
	if c.buf == nil {
		c.buf = make([]byte, c.tail)
	}
	if _, err := c.f.ReadAt(c.buf, keepFrom); err != nil && err != io.EOF {
		return err
	}
	m := marker(c.what, c.dropped)
	if _, err := c.f.WriteAt([]byte(m), c.head); err != nil {
		return err
	}
	c.tailStart = c.head + int64(len(m))
	if _, err := c.f.WriteAt(c.buf, c.tailStart); err != nil {
		return err
	}
	c.size = c.tailStart + c.tail
	return c.f.Truncate(c.size)
}

// copyConsole copies the console pipe r into the log f until QEMU (the only other
// holder of the pipe) has closed it, then closes both and done.
func copyConsole(r, f *os.File, done chan<- struct{}) {
	copyLog(r, newConsoleLog(f, consoleHead, consoleTail), done)
}

// copyQEMULog copies QEMU's stdout and stderr pipe r into qemu.log, f, like copyConsole.
func copyQEMULog(r, f *os.File, done chan<- struct{}) {
	copyLog(r, newBoundedLog(f, qemuOutput, qemuLogHead, qemuLogTail), done)
}

func copyLog(r *os.File, l *consoleLog, done chan<- struct{}) {
	defer close(done)
	defer r.Close()
	defer l.f.Close()
	if _, err := io.Copy(l, r); err != nil {
		log.L.WithError(err).WithField("path", l.f.Name()).Warn("log of qemu's output")
		// Keep the pipe drained: neither QEMU nor the guest may stall on it.
		io.Copy(io.Discard, r)
	}
}
