package service

import (
	"net"
	"os"
	"path/filepath"
	"syscall"
	"testing"
	"unsafe"
)

// The socket must never be reachable at its address with a looser mode than 0600. A
// directory watch records every event of the address from the moment it appears
// (created or moved in) until listen returns: a change of its attributes (a chmod)
// after it appeared means it was there, for a while, with other permissions. The umask
// is cleared meanwhile, so that a socket bound in place would start as 0777.
func TestSocketAppearsWithItsFinalMode(t *testing.T) {
	dir := t.TempDir()
	address := filepath.Join(dir, "snapshotter.sock")
	for _, stale := range []bool{false, true} {
		if stale {
			// A killed server's socket: nobody listens on it any more.
			l, err := net.Listen("unix", address)
			if err != nil {
				t.Fatal(err)
			}
			l.(*net.UnixListener).SetUnlinkOnClose(false)
			l.Close()
		}
		fd, err := syscall.InotifyInit1(syscall.IN_CLOEXEC | syscall.IN_NONBLOCK)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := syscall.InotifyAddWatch(fd, dir, syscall.IN_CREATE|syscall.IN_MOVED_TO|syscall.IN_ATTRIB); err != nil {
			t.Fatal(err)
		}
		old := syscall.Umask(0)
		l, err := listen(address)
		syscall.Umask(old)
		if err != nil {
			syscall.Close(fd)
			t.Fatal(err)
		}
		events := readInotify(t, fd)
		syscall.Close(fd)

		appeared := false
		for _, ev := range events {
			if ev.name != "snapshotter.sock" {
				continue
			}
			switch {
			case ev.mask&(syscall.IN_CREATE|syscall.IN_MOVED_TO) != 0:
				appeared = true
			case ev.mask&syscall.IN_ATTRIB != 0 && appeared:
				t.Errorf("stale=%v: the socket's attributes changed after it appeared at its address (events %+v): it was reachable with another mode first", stale, events)
			}
		}
		if !appeared {
			t.Errorf("stale=%v: no event of the socket appearing (events %+v)", stale, events)
		}
		st, err := os.Lstat(address)
		if err != nil {
			t.Fatal(err)
		}
		if st.Mode()&os.ModeSocket == 0 || st.Mode().Perm() != 0o600 {
			t.Errorf("stale=%v: %s has mode %v, want a socket of mode 0600", stale, address, st.Mode())
		}
		c, err := net.Dial("unix", address)
		if err != nil {
			t.Fatalf("stale=%v: dial the listening socket: %v", stale, err)
		}
		c.Close()
		// Nothing but the socket is beside it (no temporary directory).
		if ents, _ := os.ReadDir(dir); len(ents) != 1 {
			t.Errorf("stale=%v: %s holds %d entries, want only the socket", stale, dir, len(ents))
		}
		l.Close()
		os.Remove(address) // as Serve does when it stops
	}
}

// A socket another live server answers on is not taken over.
func TestSocketOfALiveServerIsKept(t *testing.T) {
	address := filepath.Join(t.TempDir(), "s.sock")
	l, err := listen(address)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	if l2, err := listen(address); err == nil {
		l2.Close()
		t.Fatal("a second listen on a live socket succeeded")
	}
}

type inotifyEvent struct {
	mask uint32
	name string
}

func readInotify(t *testing.T, fd int) []inotifyEvent {
	t.Helper()
	var out []inotifyEvent
	buf := make([]byte, 64<<10)
	n, err := syscall.Read(fd, buf)
	if err != nil {
		t.Fatalf("read inotify: %v", err)
	}
	for off := 0; off+syscall.SizeofInotifyEvent <= n; {
		ev := (*syscall.InotifyEvent)(unsafe.Pointer(&buf[off]))
		nameBytes := buf[off+syscall.SizeofInotifyEvent : off+syscall.SizeofInotifyEvent+int(ev.Len)]
		name := string(nameBytes)
		for len(name) > 0 && name[len(name)-1] == 0 {
			name = name[:len(name)-1]
		}
		out = append(out, inotifyEvent{mask: ev.Mask, name: name})
		off += syscall.SizeofInotifyEvent + int(ev.Len)
	}
	return out
}
