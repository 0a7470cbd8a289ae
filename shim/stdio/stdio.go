// Package stdio bridges a process's standard streams between containerd (FIFOs,
// or the binary:// and file:// log URIs) and the agent's stdio connections.
//
// Output is drained, not sampled: Wait returns only after every byte the agent
// sent on stdout and stderr has been written to containerd's side, so the shim
// reports an exit only after the output that preceded it.
package stdio

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"syscall"

	"github.com/containerd/containerd/v2/cmd/containerd-shim-runc-v2/process"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/fifo"
	"github.com/containerd/log"

	agent "github.com/caisson-containers/caisson/api/agent/v1"
	"github.com/caisson-containers/caisson/internal/transport"
)

// Config is what containerd gave for one process.
type Config struct {
	Stdin, Stdout, Stderr string
	Terminal              bool
}

// Agent returns which streams the agent must attach for c.
func (c Config) Agent() *agent.Stdio {
	return &agent.Stdio{
		Terminal: c.Terminal,
		Stdin:    c.Stdin != "",
		Stdout:   c.Stdout != "",
		Stderr:   c.Stderr != "" && !c.Terminal,
	}
}

// IO is a process's running bridge.
type IO struct {
	stdin    net.Conn
	stdinSrc io.Closer
	// stdinCopied is closed when the copy from containerd's stdin reached its end.
	stdinCopied chan struct{}
	closeOnce   sync.Once
	output      sync.WaitGroup
	// outputDone is closed when all output was copied and containerd's side of
	// it closed, so that its readers see EOF (as with containerd's runc shim).
	outputDone chan struct{}
	// outClosers are containerd's side of the output: FIFOs, log file, logging binary.
	outClosers []io.Closer
	closers    []io.Closer
	mu         sync.Mutex
}

// Attach opens the process's stdio connections to the agent and starts copying.
// Call it after the process was created in the guest and before it starts. On
// error, everything it opened is closed.
func Attach(ctx context.Context, s transport.Session, containerID, execID string, c Config) (_ *IO, retErr error) {
	b := &IO{outputDone: make(chan struct{})}
	defer func() {
		if retErr != nil {
			b.Close()
		}
	}()
	stream := func(kind agent.StreamKind) (net.Conn, error) {
		conn, err := transport.OpenStdio(ctx, s, &agent.StdioStream{ContainerId: containerID, ExecId: execID, Stream: kind})
		if err != nil {
			return nil, err
		}
		b.closers = append(b.closers, conn)
		return conn, nil
	}

	stdout, stderr, err := b.outputs(ctx, containerID, c)
	if err != nil {
		return nil, err
	}
	for _, o := range []struct {
		dst  io.Writer
		kind agent.StreamKind
	}{{stdout, agent.StreamKind_STREAM_KIND_STDOUT}, {stderr, agent.StreamKind_STREAM_KIND_STDERR}} {
		if o.dst == nil {
			continue
		}
		conn, err := stream(o.kind)
		if err != nil {
			return nil, err
		}
		b.output.Add(1)
		go func(dst io.Writer, src net.Conn) {
			defer b.output.Done()
			if _, err := io.Copy(dst, src); err != nil && !errors.Is(err, net.ErrClosed) {
				log.G(ctx).WithError(err).WithField("stream", o.kind).Warn("copying process output")
			}
		}(o.dst, conn)
	}

	go func() {
		b.output.Wait()
		b.closeOutput()
		close(b.outputDone)
	}()

	if c.Stdin != "" {
		src, err := fifo.OpenFifo(context.WithoutCancel(ctx), c.Stdin, syscall.O_RDONLY|syscall.O_NONBLOCK, 0)
		if err != nil {
			return nil, fmt.Errorf("open stdin %s: %w", c.Stdin, err)
		}
		b.closers = append(b.closers, src)
		conn, err := stream(agent.StreamKind_STREAM_KIND_STDIN)
		if err != nil {
			return nil, err
		}
		b.stdin, b.stdinSrc, b.stdinCopied = conn, src, make(chan struct{})
		go func() {
			io.Copy(conn, src)
			close(b.stdinCopied)
			b.CloseStdin()
		}()
	}
	return b, nil
}

// outputs opens containerd's side of stdout and stderr.
func (b *IO) outputs(ctx context.Context, id string, c Config) (stdout, stderr io.Writer, err error) {
	if c.Stdout == "" && c.Stderr == "" {
		return nil, nil, nil
	}
	u, err := url.Parse(c.Stdout)
	if err != nil {
		return nil, nil, fmt.Errorf("stdout %q: %w", c.Stdout, err)
	}
	switch u.Scheme {
	case "", "fifo":
		if stdout, err = b.openFifo(ctx, c.Stdout); err != nil {
			return nil, nil, err
		}
		if c.Stderr != "" && !c.Terminal {
			if stderr, err = b.openFifo(ctx, c.Stderr); err != nil {
				return nil, nil, err
			}
		}
	case "file":
		if err := os.MkdirAll(filepath.Dir(u.Path), 0o755); err != nil {
			return nil, nil, err
		}
		f, err := os.OpenFile(u.Path, os.O_APPEND|os.O_CREATE|os.O_WRONLY, 0o644)
		if err != nil {
			return nil, nil, fmt.Errorf("open log file: %w", err)
		}
		b.outClosers = append(b.outClosers, f)
		stdout = &lockedWriter{w: f}
		if !c.Terminal {
			stderr = stdout
		}
	case "binary", "binary-v2":
		if _, err := namespaces.NamespaceRequired(ctx); err != nil {
			return nil, nil, err
		}
		bio, err := process.NewBinaryIO(ctx, id, u)
		if err != nil {
			return nil, nil, fmt.Errorf("start logging binary %s: %w", u.Path, err)
		}
		b.outClosers = append(b.outClosers, bio)
		// containerd's binary IO hands its pipes to an exec.Cmd; we are the writer.
		var cmd exec.Cmd
		bio.Set(&cmd)
		stdout = cmd.Stdout
		if !c.Terminal {
			stderr = cmd.Stderr
		}
	default:
		return nil, nil, fmt.Errorf("stdout %q: unknown scheme %q (fifo, file, binary)", c.Stdout, u.Scheme)
	}
	return stdout, stderr, nil
}

func (b *IO) openFifo(ctx context.Context, path string) (io.Writer, error) {
	w, err := fifo.OpenFifo(ctx, path, syscall.O_WRONLY, 0)
	if err != nil {
		return nil, fmt.Errorf("open fifo %s: %w", path, err)
	}
	b.outClosers = append(b.outClosers, w)
	return w, nil
}

// HasStdin reports whether the process's stdin is bridged.
func (b *IO) HasStdin() bool { return b.stdin != nil }

// FinishStdin is containerd's CloseIO: containerd has closed its end of the
// stdin FIFO, so the copy reaches EOF after every byte written before; wait for
// that (bounded by ctx), then close the process's stdin.
func (b *IO) FinishStdin(ctx context.Context) {
	if b.stdinCopied != nil {
		select {
		case <-b.stdinCopied:
		case <-ctx.Done():
		}
	}
	b.CloseStdin()
}

// CloseStdin closes the process's stdin now: the agent sees the connection's end.
func (b *IO) CloseStdin() {
	b.closeOnce.Do(func() {
		if b.stdin != nil {
			b.stdin.Close()
		}
		if b.stdinSrc != nil {
			b.stdinSrc.Close()
		}
	})
}

// Wait returns once all output has been copied to containerd's side and that
// side closed, or ctx ends.
func (b *IO) Wait(ctx context.Context) error {
	select {
	case <-b.outputDone:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

func (b *IO) closeOutput() error {
	b.mu.Lock()
	closers := b.outClosers
	b.outClosers = nil
	b.mu.Unlock()
	var errs []error
	for _, c := range closers {
		if err := c.Close(); err != nil && !errors.Is(err, os.ErrClosed) {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// Close closes everything: connections, FIFOs, files, the logging binary.
func (b *IO) Close() error {
	b.CloseStdin()
	errs := []error{b.closeOutput()}
	for i := len(b.closers) - 1; i >= 0; i-- {
		if err := b.closers[i].Close(); err != nil && !errors.Is(err, os.ErrClosed) && !errors.Is(err, net.ErrClosed) {
			errs = append(errs, err)
		}
	}
	b.closers = nil
	return errors.Join(errs...)
}

// lockedWriter lets stdout and stderr share one log file without interleaving writes.
type lockedWriter struct {
	mu sync.Mutex
	w  io.Writer
}

func (l *lockedWriter) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.w.Write(p)
}
