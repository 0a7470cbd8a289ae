package container

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"sync"

	"github.com/containerd/console"
	"github.com/containerd/errdefs"
	"github.com/opencontainers/runc/libcontainer"
	"github.com/opencontainers/runc/libcontainer/utils"
	"golang.org/x/sys/unix"

	"github.com/caisson-containers/caisson/guest/agent/reaper"
)

// Stdio says how a process's standard streams are set up.
type Stdio struct {
	// Stdin gives the process a stdin pipe (else it reads /dev/null).
	Stdin bool
	// Terminal gives the process a pseudo-terminal as stdin, stdout and stderr; stdout
	// then carries everything and Stderr is nil.
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

	stdin          io.WriteCloser // nil without stdin
	stdout, stderr io.ReadCloser  // stderr nil with a terminal
	console        console.Console

	// child's ends of the pipes, closed once the process has started.
	childFiles []*os.File

	stdinOnce sync.Once
	exited    chan struct{}
	exit      Exit
}

func newStdio(p *Process, lp *libcontainer.Process, stdio Stdio) (retErr error) {
	defer func() {
		if retErr != nil {
			p.closeChildFiles()
			p.closeIO()
		}
	}()
	if stdio.Terminal {
		parent, child, err := utils.NewSockPair("console")
		if err != nil {
			return err
		}
		lp.ConsoleSocket = child
		p.childFiles = append(p.childFiles, child)
		// The master arrives once the process exists; receiveConsole takes it from parent.
		p.stdout = parent
		return nil
	}
	if stdio.Stdin {
		r, w, err := os.Pipe()
		if err != nil {
			return err
		}
		lp.Stdin, p.stdin = r, w
		p.childFiles = append(p.childFiles, r)
	}
	for _, out := range []*io.ReadCloser{&p.stdout, &p.stderr} {
		r, w, err := os.Pipe()
		if err != nil {
			return err
		}
		*out = r
		p.childFiles = append(p.childFiles, w)
	}
	lp.Stdout, lp.Stderr = p.childFiles[len(p.childFiles)-2], p.childFiles[len(p.childFiles)-1]
	return nil
}

// receiveConsole takes the pseudo-terminal's master from the console socket (held in
// p.stdout until then) once the process has started.
func (p *Process) receiveConsole() error {
	sock, ok := p.stdout.(*os.File)
	if !ok || p.lp.ConsoleSocket == nil {
		return nil
	}
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
	if p.stdin != nil && p.console == nil {
		p.stdin.Close()
	}
	for _, c := range []io.Closer{p.stdout, p.stderr, p.console} {
		if c != nil && c != io.Closer(nil) {
			c.Close()
		}
	}
}

// ID is the exec id ("" for a container's init).
func (p *Process) ID() string { return p.id }

// Pid is the process's pid in the agent's PID namespace.
func (p *Process) Pid() int { return p.pid }

// Stdin is the process's standard input, nil if it has none.
func (p *Process) Stdin() io.Writer { return p.stdin }

// Stdout is the process's standard output (with a terminal: everything it writes). Read
// it until EOF, which comes after the process and every process that inherited it exited:
// no byte is lost at exit.
func (p *Process) Stdout() io.Reader { return p.stdout }

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
	select {
	case <-p.exited:
		return fmt.Errorf("process %d has exited: %w", p.pid, errdefs.ErrNotFound)
	default:
	}
	return unix.Kill(p.pid, sig)
}

// Wait returns the process's exit, once it has exited.
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

func (p *Process) watch(ch <-chan Exit) {
	e := <-ch
	p.exit = e
	close(p.exited)
}
