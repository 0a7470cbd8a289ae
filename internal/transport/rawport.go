package transport

import (
	"io"
	"os"
	"sync/atomic"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

// rawPort is the guest's virtio-serial port, read and written without the Go runtime's
// syscall bookkeeping.
//
// An agent woken by a call after being idle would otherwise wake the runtime's sysmon
// thread with its first syscall (entersyscall does, while sysmon sleeps because every P
// is idle), and sysmon then polls every 20 µs, each poll a timer interrupt and two
// context switches of the guest's vCPU under TCG, until the agent is idle again:
// a good part of what each of containerd's stats calls costs an idle pod
// (docs/guest.md, "Stats calls"). The port is non-blocking and registered with the
// runtime's poller (os.File does both for a character device): a read or write that
// would block returns EAGAIN at once, and the goroutine waits for the poller as
// before; no call here can hold its thread, so sysmon has nothing to take back.
type rawPort struct {
	f      *os.File
	rc     syscall.RawConn
	closed atomic.Bool
}

// newRawPort returns f read and written raw, or f itself if it is not non-blocking: a raw
// read of a blocking file would hold the thread and its P without the runtime knowing,
// and with GOMAXPROCS=1 (a guest of one vCPU) every other goroutine with it.
func newRawPort(f *os.File) (io.ReadWriteCloser, error) {
	rc, err := f.SyscallConn()
	if err != nil {
		return nil, err
	}
	var flags int
	var ferr error
	if err := rc.Control(func(fd uintptr) { flags, ferr = unix.FcntlInt(fd, unix.F_GETFL, 0) }); err != nil {
		return nil, err
	}
	if ferr != nil {
		return nil, &os.PathError{Op: "fcntl", Path: f.Name(), Err: ferr}
	}
	if flags&unix.O_NONBLOCK == 0 {
		return f, nil
	}
	return &rawPort{f: f, rc: rc}, nil
}

// rawIO runs one read or write of p on fd, again after EINTR.
func rawIO(trap, fd uintptr, p []byte) (int, syscall.Errno) {
	var ptr unsafe.Pointer
	if len(p) > 0 {
		ptr = unsafe.Pointer(&p[0])
	}
	for {
		n, _, errno := unix.RawSyscall(trap, fd, uintptr(ptr), uintptr(len(p)))
		if errno != unix.EINTR {
			return int(n), errno
		}
	}
}

func (p *rawPort) Read(b []byte) (int, error) {
	if len(b) == 0 {
		return 0, nil
	}
	var n int
	var errno syscall.Errno
	err := p.rc.Read(func(fd uintptr) bool {
		n, errno = rawIO(unix.SYS_READ, fd, b)
		return errno != unix.EAGAIN
	})
	switch {
	case err != nil:
		return 0, p.wrap("read", err)
	case errno != 0:
		return 0, &os.PathError{Op: "read", Path: p.f.Name(), Err: errno}
	case n == 0:
		// virtio_console reads 0 bytes once the host end is closed.
		return 0, io.EOF
	}
	return n, nil
}

// Write writes all of b, as os.File's Write does, and as one write with respect to other
// Writes: the RawConn holds its write lock across the waits for the poller.
func (p *rawPort) Write(b []byte) (int, error) {
	written := 0
	var errno syscall.Errno
	short := false
	err := p.rc.Write(func(fd uintptr) bool {
		for written < len(b) {
			n, e := rawIO(unix.SYS_WRITE, fd, b[written:])
			switch {
			case e == unix.EAGAIN:
				return false
			case e != 0:
				errno = e
				return true
			case n == 0:
				short = true
				return true
			}
			written += n
		}
		return true
	})
	switch {
	case err != nil:
		return written, p.wrap("write", err)
	case errno != 0:
		return written, &os.PathError{Op: "write", Path: p.f.Name(), Err: errno}
	case short:
		return written, io.ErrUnexpectedEOF
	}
	return written, nil
}

func (p *rawPort) Close() error {
	p.closed.Store(true)
	return p.f.Close()
}

// wrap returns the error of a read or write the poller ended as os.File's would be: one
// ended by Close is os.ErrClosed (the poller's own error is not).
func (p *rawPort) wrap(op string, err error) error {
	if p.closed.Load() {
		err = os.ErrClosed
	}
	return &os.PathError{Op: op, Path: p.f.Name(), Err: err}
}
