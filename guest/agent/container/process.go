package container

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"sync"
	"time"

	"github.com/containerd/console"
	"github.com/containerd/errdefs"
	"github.com/opencontainers/runc/libcontainer"
	"github.com/opencontainers/runc/libcontainer/utils"
	"golang.org/x/sys/unix"

	"github.com/caisson-containers/caisson/guest/agent/reaper"
)

// Stdio says which standard streams of a process are attached; the others are
// /dev/null.
type Stdio struct {
	Stdin, Stdout, Stderr bool
	// Terminal gives the process a pseudo-terminal: Stdin and Stdout carry it, there is
	// no separate stderr.
	Terminal bool
}

// Exit is how a process ended.
type Exit = reaper.Exit

// Process is a container's init or one of its execs.
type Process struct {
	id   string
	lp   *libcontainer.Process
	pid  int
	init bool
	// start starts the process (libcontainer's Start or Run); nil once started.
	start func() error

	stdin          io.WriteCloser // nil if not attached
	stdout, stderr io.ReadCloser  // nil if not attached
	console        console.Console
	consoleSocket  *os.File

	// child's ends of the pipes, closed once the process has started.
	childFiles []*os.File

	mu        sync.Mutex
	stdinOnce sync.Once
	ready     chan struct{} // closed when the streams can be used
	closed    chan struct{} // closed when the streams are released
	closeOnce sync.Once
	exited    chan struct{}
	exit      Exit
}

func newProcess(id string, lp *libcontainer.Process, stdio Stdio, start func() error) (_ *Process, retErr error) {
	p := &Process{id: id, lp: lp, init: lp.Init, start: start,
		ready: make(chan struct{}), closed: make(chan struct{}), exited: make(chan struct{})}
	defer func() {
		if retErr != nil {
			p.closeChildFiles()
			p.closeIO()
		}
	}()
	if stdio.Terminal {
		parent, child, err := utils.NewSockPair("console")
		if err != nil {
			return nil, err
		}
		lp.ConsoleSocket = child
		p.childFiles = append(p.childFiles, child)
		p.consoleSocket = parent
		return p, nil
	}
	devNull := func() (*os.File, error) {
		f, err := os.OpenFile(os.DevNull, os.O_RDWR, 0)
		if err == nil {
			p.childFiles = append(p.childFiles, f)
		}
		return f, err
	}
	if stdio.Stdin {
		r, w, err := os.Pipe()
		if err != nil {
			return nil, err
		}
		lp.Stdin, p.stdin = r, w
		p.childFiles = append(p.childFiles, r)
	} else {
		f, err := devNull()
		if err != nil {
			return nil, err
		}
		lp.Stdin = f
	}
	for _, s := range []struct {
		attached bool
		parent   *io.ReadCloser
		child    *io.Writer
	}{{stdio.Stdout, &p.stdout, &lp.Stdout}, {stdio.Stderr, &p.stderr, &lp.Stderr}} {
		if !s.attached {
			f, err := devNull()
			if err != nil {
				return nil, err
			}
			*s.child = f
			continue
		}
		r, w, err := os.Pipe()
		if err != nil {
			return nil, err
		}
		*s.parent, *s.child = r, w
		p.childFiles = append(p.childFiles, w)
	}
	close(p.ready)
	return p, nil
}

// run starts the process while the reaper waits, registering its pid before any exit
// can be collected.
func (p *Process) run(r *reaper.Reaper) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.start == nil {
		return fmt.Errorf("process already started: %w", errdefs.ErrFailedPrecondition)
	}
	pid, ch, err := r.Start(func() (int, error) {
		if err := p.start(); err != nil {
			return 0, err
		}
		return p.lp.Pid()
	})
	p.start = nil
	p.closeChildFiles()
	if err != nil {
		p.closeIO()
		// A process that failed to start counts as exited with 255, as in containerd.
		p.exit = Exit{Status: 255, At: time.Now()}
		close(p.exited)
		return err
	}
	p.pid = pid
	go p.watch(ch)
	if err := p.receiveConsole(); err != nil {
		_ = unix.Kill(pid, unix.SIGKILL)
		<-p.exited
		p.closeIO()
		return err
	}
	return nil
}

// receiveConsole takes the pseudo-terminal's master from the console socket (held in
// p.stdout until then) once the process has started.
func (p *Process) receiveConsole() error {
	sock := p.consoleSocket
	if sock == nil {
		return nil
	}
	p.consoleSocket = nil
	defer sock.Close()
	f, err := utils.RecvFile(sock)
	if err != nil {
		return fmt.Errorf("receive the terminal: %w", err)
	}
	c, err := console.ConsoleFromFile(f)
	if err != nil {
		f.Close()
		return err
	}
	p.console = c
	p.stdin = c
	p.stdout = &ttyReader{c}
	close(p.ready)
	return nil
}

// ttyReader ends at EOF, not EIO, once the terminal's last slave end is closed.
type ttyReader struct{ c console.Console }

func (t *ttyReader) Read(b []byte) (int, error) {
	n, err := t.c.Read(b)
	if errors.Is(err, unix.EIO) {
		return n, io.EOF
	}
	return n, err
}

func (t *ttyReader) Close() error { return nil } // the console is closed with the process

func (p *Process) closeChildFiles() {
	for _, f := range p.childFiles {
		f.Close()
	}
	p.childFiles = nil
}

func (p *Process) closeIO() {
	p.closeOnce.Do(func() {
		for _, c := range []io.Closer{p.stdin, p.stdout, p.stderr, p.console} {
			if c != nil {
				c.Close()
			}
		}
		if p.consoleSocket != nil {
			p.consoleSocket.Close()
		}
		close(p.closed)
	})
}

// Streams waits until the process's streams can be used (a terminal exists only once
// the process has started) and returns them; ok is false if they were released first.
func (p *Process) Streams(ctx context.Context) (stdin io.Writer, stdout, stderr io.Reader, ok bool) {
	select {
	case <-p.ready:
	case <-p.closed:
		return nil, nil, nil, false
	case <-ctx.Done():
		return nil, nil, nil, false
	}
	return p.Stdin(), p.Stdout(), p.Stderr(), true
}

// ID is the exec id ("" for a container's init).
func (p *Process) ID() string { return p.id }

// Pid is the process's pid in the agent's PID namespace, 0 before it started.
func (p *Process) Pid() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.pid
}

// Started reports whether the process was started.
func (p *Process) Started() bool {
	return p.Pid() != 0
}

// Stdin is the process's standard input, nil if it has none.
func (p *Process) Stdin() io.Writer {
	if p.stdin == nil {
		return nil
	}
	return p.stdin
}

// Stdout is the process's standard output (with a terminal: everything it writes), nil
// if not attached. Read it until EOF, which comes after the process and every process
// that inherited it exited: no byte is lost at exit.
func (p *Process) Stdout() io.Reader {
	if p.stdout == nil {
		return nil
	}
	return p.stdout
}

// Stderr is the process's standard error, nil with a terminal.
func (p *Process) Stderr() io.Reader {
	if p.stderr == nil {
		return nil
	}
	return p.stderr
}

// CloseStdin closes the process's standard input: it reads EOF. With a terminal it is
// sent the terminal's end-of-file character instead.
func (p *Process) CloseStdin() error {
	if p.stdin == nil {
		return fmt.Errorf("process has no stdin: %w", errdefs.ErrFailedPrecondition)
	}
	var err error
	p.stdinOnce.Do(func() {
		if p.console != nil {
			_, err = p.console.Write([]byte{4}) // VEOF, ^D
			return
		}
		err = p.stdin.Close()
	})
	return err
}

// Resize sets the terminal's window size.
func (p *Process) Resize(width, height uint16) error {
	if p.console == nil {
		return fmt.Errorf("process has no terminal: %w", errdefs.ErrFailedPrecondition)
	}
	return p.console.Resize(console.WinSize{Width: width, Height: height})
}

// Signal sends sig to the process.
func (p *Process) Signal(sig unix.Signal) error {
	if p.Pid() == 0 {
		return fmt.Errorf("process not started: %w", errdefs.ErrFailedPrecondition)
	}
	select {
	case <-p.exited:
		return fmt.Errorf("process %d has exited: %w", p.pid, errdefs.ErrNotFound)
	default:
	}
	return unix.Kill(p.pid, sig)
}

// Wait returns the process's exit, once it has exited (255 if it failed to start).
func (p *Process) Wait(ctx context.Context) (Exit, error) {
	select {
	case <-p.exited:
		return p.exit, nil
	case <-ctx.Done():
		return Exit{}, ctx.Err()
	}
}

// Exited is closed when the process has exited.
func (p *Process) Exited() <-chan struct{} { return p.exited }

// release frees the process's streams; a process that was never started then counts as
// exited (255), so that nothing waits for it forever.
func (p *Process) release() {
	p.mu.Lock()
	if p.start != nil {
		p.start = nil
		p.closeChildFiles()
		p.exit = Exit{Status: 255, At: time.Now()}
		close(p.exited)
	}
	p.mu.Unlock()
	p.closeIO()
}

func (p *Process) watch(ch <-chan Exit) {
	e := <-ch
	p.exit = e
	close(p.exited)
}
