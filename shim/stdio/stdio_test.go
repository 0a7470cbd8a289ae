package stdio

import (
	"context"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/fifo"

	agent "github.com/caisson-containers/caisson/api/agent/v1"
	"github.com/caisson-containers/caisson/internal/transport"
)

// fakeAgent serves stdio connections as the agent does: stdout and stderr get a
// fixed text then EOF; stdin is read to EOF and handed to the test.
func fakeAgent(t *testing.T) (transport.Session, <-chan string) {
	t.Helper()
	fds, err := syscall.Socketpair(syscall.AF_UNIX, syscall.SOCK_STREAM, 0)
	if err != nil {
		t.Fatal(err)
	}
	for _, fd := range fds {
		syscall.SetNonblock(fd, true)
	}
	host, guest := os.NewFile(uintptr(fds[0]), "host"), os.NewFile(uintptr(fds[1]), "guest")
	l, err := transport.ListenSerial(guest)
	if err != nil {
		t.Fatal(err)
	}
	stdin := make(chan string, 1)
	dl := transport.Demux(context.Background(), l, func(st *agent.StdioStream, c net.Conn) {
		defer c.Close()
		switch st.GetStream() {
		case agent.StreamKind_STREAM_KIND_STDOUT:
			io.WriteString(c, "to stdout of "+st.GetContainerId()+"/"+st.GetExecId()+"\n")
		case agent.StreamKind_STREAM_KIND_STDERR:
			io.WriteString(c, "to stderr\n")
		case agent.StreamKind_STREAM_KIND_STDIN:
			b, _ := io.ReadAll(c)
			stdin <- string(b)
		}
	})
	s, err := transport.NewSerialSession(host)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close(); dl.Close(); host.Close(); guest.Close() })
	return s, stdin
}

func TestFifos(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	s, stdinGot := fakeAgent(t)
	dir := t.TempDir()
	c := Config{Stdin: filepath.Join(dir, "in"), Stdout: filepath.Join(dir, "out"), Stderr: filepath.Join(dir, "err")}
	// containerd's side: readers of stdout/stderr, writer of stdin, opened as its cio does.
	var readers []io.ReadCloser
	for _, p := range []string{c.Stdout, c.Stderr} {
		r, err := fifo.OpenFifo(ctx, p, syscall.O_RDONLY|syscall.O_CREAT|syscall.O_NONBLOCK, 0o700)
		if err != nil {
			t.Fatal(err)
		}
		readers = append(readers, r)
	}
	w, err := fifo.OpenFifo(ctx, c.Stdin, syscall.O_WRONLY|syscall.O_CREAT|syscall.O_NONBLOCK, 0o700)
	if err != nil {
		t.Fatal(err)
	}
	b, err := Attach(ctx, s, "c1", "e1", c)
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	if got := c.Agent(); !got.GetStdin() || !got.GetStdout() || !got.GetStderr() || got.GetTerminal() {
		t.Fatalf("Agent() = %v", got)
	}
	io.WriteString(w, strings.Repeat("typed input ", 10000))
	w.Close()
	// containerd's CloseIO comes right after it closed its end: nothing written before is lost.
	b.FinishStdin(ctx)
	if got := <-stdinGot; got != strings.Repeat("typed input ", 10000) {
		t.Fatalf("agent read %d bytes of stdin, want %d", len(got), 12*10000)
	}
	for i, want := range []string{"to stdout of c1/e1\n", "to stderr\n"} {
		got, err := io.ReadAll(readers[i]) // EOF: the shim closes its side once copied
		if err != nil || string(got) != want {
			t.Fatalf("stream %d: %q, %v; want %q", i, got, err, want)
		}
	}
	if err := b.Wait(ctx); err != nil {
		t.Fatal(err)
	}
}

func TestFileURI(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	s, _ := fakeAgent(t)
	log := filepath.Join(t.TempDir(), "logs", "c.log")
	b, err := Attach(ctx, s, "c2", "", Config{Stdout: "file://" + log, Stderr: "file://" + log})
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	if err := b.Wait(ctx); err != nil {
		t.Fatal(err)
	}
	got, _ := os.ReadFile(log)
	if !strings.Contains(string(got), "to stdout of c2/\n") || !strings.Contains(string(got), "to stderr\n") {
		t.Fatalf("log file holds %q", got)
	}
}

// A logging binary, as containerd's binary:// protocol runs it: stdout on fd 3,
// stderr on fd 4, readiness by closing fd 5.
const logger = `#!/bin/sh
cat <&3 > "$0.out" 5>&- &
cat <&4 > "$0.err" 5>&- &
exec 5>&-
wait
`

func TestBinaryURI(t *testing.T) {
	ctx, cancel := context.WithTimeout(namespaces.WithNamespace(context.Background(), "test"), 30*time.Second)
	defer cancel()
	s, _ := fakeAgent(t)
	bin := filepath.Join(t.TempDir(), "logger")
	if err := os.WriteFile(bin, []byte(logger), 0o755); err != nil {
		t.Fatal(err)
	}
	b, err := Attach(ctx, s, "c3", "", Config{Stdout: "binary://" + bin, Stderr: "binary://" + bin})
	if err != nil {
		t.Fatal(err)
	}
	if err := b.Wait(ctx); err != nil {
		t.Fatal(err)
	}
	b.Close()
	for suffix, want := range map[string]string{".out": "to stdout of c3/\n", ".err": "to stderr\n"} {
		deadline := time.Now().Add(10 * time.Second)
		for {
			got, _ := os.ReadFile(bin + suffix)
			if string(got) == want {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("logger wrote %q to %s, want %q", got, suffix, want)
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
}

func TestBadScheme(t *testing.T) {
	s, _ := fakeAgent(t)
	_, err := Attach(context.Background(), s, "c4", "", Config{Stdout: "tcp://example:1"})
	if err == nil || !strings.Contains(err.Error(), `unknown scheme "tcp"`) {
		t.Fatalf("err = %v", err)
	}
}
