package transport

import (
	"bytes"
	"errors"
	"io"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// rawPipe returns the two ends of a pipe, each as newRawPort makes it: a pipe is
// non-blocking and registered with the runtime's poller, as the guest's port is.
func rawPipe(t *testing.T) (r, w io.ReadWriteCloser) {
	t.Helper()
	pr, pw, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	if r, err = newRawPort(pr); err != nil {
		t.Fatal(err)
	}
	if w, err = newRawPort(pw); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { r.Close(); w.Close() })
	return r, w
}

func TestRawPortCarriesBytes(t *testing.T) {
	r, w := rawPipe(t)
	if _, ok := r.(*rawPort); !ok {
		t.Fatalf("a pipe's end is %T, want *rawPort", r)
	}
	// More than a pipe holds (64 KiB): the writer waits for the reader through the
	// poller, the reader for the writer.
	want := bytes.Repeat([]byte("0123456789abcdef"), 1<<16)
	done := make(chan error, 1)
	go func() {
		n, err := w.Write(want)
		if err == nil && n != len(want) {
			err = io.ErrShortWrite
		}
		w.Close()
		done <- err
	}()
	got, err := io.ReadAll(r)
	if err != nil {
		t.Fatalf("read: %v", err)
	}
	if err := <-done; err != nil {
		t.Fatalf("write: %v", err)
	}
	if !bytes.Equal(got, want) {
		t.Fatalf("read %d bytes, want the %d written", len(got), len(want))
	}
}

func TestRawPortCloseEndsWaitingRead(t *testing.T) {
	r, _ := rawPipe(t)
	done := make(chan error, 1)
	go func() {
		_, err := r.Read(make([]byte, 16))
		done <- err
	}()
	time.Sleep(50 * time.Millisecond) // the read waits in the poller
	r.Close()
	select {
	case err := <-done:
		if !errors.Is(err, os.ErrClosed) {
			t.Fatalf("read after close: %v, want os.ErrClosed", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("a read waiting for data did not end when the port closed")
	}
}

func TestRawPortWriteToClosedReader(t *testing.T) {
	r, w := rawPipe(t)
	r.Close()
	if _, err := w.Write([]byte("x")); err == nil {
		t.Fatal("write to a pipe without a reader succeeded")
	}
}

// A blocking file is not read raw: the read would hold its thread and P.
func TestRawPortKeepsBlockingFile(t *testing.T) {
	p := filepath.Join(t.TempDir(), "port")
	if err := os.WriteFile(p, []byte("x"), 0o600); err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(p)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	port, err := newRawPort(f)
	if err != nil {
		t.Fatal(err)
	}
	if port != io.ReadWriteCloser(f) {
		t.Fatalf("a regular file became %T, want the *os.File itself", port)
	}
}

// Two Writes larger than the pipe, at once, both wait in the poller and each lands whole:
// a Write holds the port's write lock across its waits, as os.File's Write does. (A Write
// that let the lock go between its partial writes would rarely show here, since the
// runtime's fd lock lets its holder take it again first.)
func TestRawPortWritesDoNotInterleave(t *testing.T) {
	r, w := rawPipe(t)
	const size = 256 << 10
	errs := make(chan error, 2)
	for _, c := range []byte("ab") {
		go func() {
			_, err := w.Write(bytes.Repeat([]byte{c}, size))
			errs <- err
		}()
	}
	got := make([]byte, 0, 2*size)
	buf := make([]byte, 32<<10)
	for len(got) < 2*size {
		n, err := r.Read(buf)
		if err != nil {
			t.Fatalf("read after %d bytes: %v", len(got), err)
		}
		got = append(got, buf[:n]...)
	}
	for range 2 {
		if err := <-errs; err != nil {
			t.Fatalf("write: %v", err)
		}
	}
	first, second := got[:size], got[size:]
	if bytes.Count(first, first[:1]) != size || bytes.Count(second, second[:1]) != size || first[0] == second[0] {
		t.Fatal("the two writes' bytes are interleaved")
	}
}
