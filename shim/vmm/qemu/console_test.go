package qemu

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/caisson-containers/caisson/internal/logtail"
	"github.com/caisson-containers/caisson/internal/testutil"
	"github.com/caisson-containers/caisson/shim/vmm"
)

// A flood far past the bound, in writes of every size, leaves at most ConsoleLogMax
// bytes on disk after every write: the first consoleHead bytes, a marker counting what
// was dropped, and the latest output, in order.
func TestConsoleLogBound(t *testing.T) {
	for _, chunk := range []int{7, 100, 4096, consoleTail - 1, 3*consoleTail + 7, 1 << 20} {
		t.Run(fmt.Sprint(chunk), func(t *testing.T) {
			f, err := os.OpenFile(filepath.Join(t.TempDir(), "console.log"), os.O_CREATE|os.O_RDWR, 0o600)
			if err != nil {
				t.Fatal(err)
			}
			defer f.Close()
			l := newConsoleLog(f, consoleHead, consoleTail)
			// Numbered lines, so that any reordering or loss inside what is kept
			// shows: 4 MiB, or 50,000 writes (small writes are slow to test).
			var in bytes.Buffer
			for i := 0; in.Len() < min(4<<20, 50000*chunk); i++ {
				fmt.Fprintf(&in, "line %08d\n", i)
			}
			data := in.Bytes()
			for off := 0; off < len(data); off += chunk {
				p := data[off:min(off+chunk, len(data))]
				if n, err := l.Write(p); err != nil || n != len(p) {
					t.Fatalf("write: %d, %v", n, err)
				}
				if st, _ := f.Stat(); st.Size() > ConsoleLogMax {
					t.Fatalf("after %d bytes the log holds %d, more than %d", off+len(p), st.Size(), ConsoleLogMax)
				}
			}
			got, err := os.ReadFile(f.Name())
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got[:consoleHead], data[:consoleHead]) {
				t.Fatal("the log does not start with the output's first bytes")
			}
			m := got[consoleHead : consoleHead+markerLen]
			var dropped int64
			if _, err := fmt.Sscanf(strings.TrimSpace(string(m)), "[caisson: %d bytes of console output dropped]", &dropped); err != nil {
				t.Fatalf("no marker after the head: %q (%v)", m, err)
			}
			kept := got[consoleHead+markerLen:]
			if len(kept) < consoleTail {
				t.Fatalf("%d bytes of the latest output kept, want at least %d", len(kept), consoleTail)
			}
			if !bytes.HasSuffix(data, kept) {
				t.Fatal("what follows the marker is not the output's end")
			}
			if want := int64(len(data) - consoleHead - len(kept)); dropped != want {
				t.Fatalf("the marker counts %d dropped bytes, want %d", dropped, want)
			}
		})
	}
}

// Output within the bound is kept whole, without a marker.
func TestConsoleLogShort(t *testing.T) {
	f, err := os.OpenFile(filepath.Join(t.TempDir(), "console.log"), os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	l := newConsoleLog(f, consoleHead, consoleTail)
	data := bytes.Repeat([]byte("boot message\n"), (consoleHead+2*consoleTail)/13)
	l.Write(data)
	if got, _ := os.ReadFile(f.Name()); !bytes.Equal(got, data) {
		t.Fatalf("a log of %d bytes was not kept whole (%d bytes on disk)", len(data), len(got))
	}
}

// A guest that floods its serial console does not grow the console log in the state
// directory past ConsoleLogMax; the boot messages and the latest output are kept.
func TestConsoleFlood(t *testing.T) {
	g := newTestGuest(t)
	stateDir := testutil.ShortTempDir(t)
	vm := startVM(t, g, vmm.Config{StateDir: stateDir})
	sh := dialGuest(t, vm.Endpoint(), bootTimeout)
	const flood = 2 << 20
	const end = "CAISSON-FLOOD-END"
	if out, err := sh.run(fmt.Sprintf("yes 0123456789abcdef | head -c %d > /dev/ttyS0 && echo %s > /dev/ttyS0", flood, end), bootTimeout); err != nil {
		t.Fatalf("flood: %v: %s", err, out)
	}
	logPath := filepath.Join(stateDir, "console.log")
	var b []byte
	for deadline := time.Now().Add(30 * time.Second); ; {
		var err error
		if b, err = os.ReadFile(logPath); err != nil {
			t.Fatal(err)
		}
		if bytes.Contains(b, []byte(end)) || time.Now().After(deadline) {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	if len(b) > ConsoleLogMax {
		t.Fatalf("after a %d-byte flood the console log holds %d bytes, more than %d", flood, len(b), ConsoleLogMax)
	}
	if !bytes.Contains(b, []byte(initReady)) {
		t.Errorf("the console log lost the boot messages (%q)", initReady)
	}
	if !bytes.Contains(b, []byte(end)) {
		t.Errorf("the console log lacks the flood's end")
	}
	if !bytes.Contains(b, []byte("bytes of console output dropped")) {
		t.Errorf("the console log does not say what it dropped")
	}
	// Stop keeps the console log (it is the caller's).
	if err := vm.Stop(context.Background()); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(logPath); err != nil {
		t.Fatal(err)
	}
}

// QEMU's own output (qemu.log) is bounded like the console: a flood through the pipe
// QEMU writes to leaves at most QEMULogMax bytes, its start and its end, and the pipe is
// drained to its end.
func TestQEMULogFlood(t *testing.T) {
	if got := len(marker(qemuOutput, 0)); got != qemuMarkerLen {
		t.Fatalf("qemu.log marker is %d bytes, qemuMarkerLen %d", got, qemuMarkerLen)
	}
	if got := len(marker(consoleOutput, 0)); got != markerLen {
		t.Fatalf("console marker is %d bytes, markerLen %d", got, markerLen)
	}
	path := filepath.Join(t.TempDir(), "qemu.log")
	f, err := os.OpenFile(path, os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go copyQEMULog(r, f, done)
	const first, last = "qemu-system-x86_64: first words\n", "qemu-system-x86_64: last words\n"
	w.WriteString(first)
	line := []byte("qemu-system-x86_64: virtio: zero sized buffers are not allowed\n")
	for written := 0; written < 8<<20; written += len(line) {
		if _, err := w.Write(line); err != nil {
			t.Fatal(err)
		}
	}
	w.WriteString(last)
	w.Close()
	<-done
	got, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if len(got) > QEMULogMax {
		t.Fatalf("after 8 MiB qemu.log holds %d bytes, more than %d", len(got), QEMULogMax)
	}
	if !bytes.HasPrefix(got, []byte(first)) || !bytes.HasSuffix(got, []byte(last)) {
		t.Fatal("qemu.log lost QEMU's first or last words")
	}
	if !bytes.Contains(got, []byte("bytes of qemu output dropped]")) {
		t.Fatal("qemu.log does not say what it dropped")
	}
	if tl := logtail.Read(path, stderrTail); !strings.HasSuffix(tl, strings.TrimSpace(last)) {
		t.Fatalf("tail quotes %q, want QEMU's last words", tl)
	}
}
