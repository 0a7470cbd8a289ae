package harness

import (
	"testing"

	"golang.org/x/sys/unix"
)

// Sniffer receives the frames of one ethertype that any interface in the host's network
// namespace (the CNI bridge, the pods' host veths) carries, from its start until Frames
// reads them. A frame that crosses several interfaces is received once on each.
type Sniffer struct{ fd int }

// Sniff starts a Sniffer of frames of ethertype; it stops when the test ends.
func Sniff(t testing.TB, ethertype uint16) *Sniffer {
	t.Helper()
	proto := int(ethertype>>8 | ethertype<<8&0xff00) // network byte order
	fd, err := unix.Socket(unix.AF_PACKET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, proto)
	if err != nil {
		t.Fatalf("packet socket: %v", err)
	}
	t.Cleanup(func() { unix.Close(fd) })
	return &Sniffer{fd: fd}
}

// Frames returns the frames received so far.
func (s *Sniffer) Frames(t testing.TB) [][]byte {
	t.Helper()
	var frames [][]byte
	buf := make([]byte, 65536)
	for {
		n, _, err := unix.Recvfrom(s.fd, buf, unix.MSG_DONTWAIT)
		if err == unix.EINTR {
			continue // a signal, not the end of what is queued
		}
		if err == unix.EAGAIN {
			return frames
		}
		if err != nil {
			t.Fatalf("read the packet socket: %v", err)
		}
		frames = append(frames, append([]byte(nil), buf[:n]...))
	}
}
