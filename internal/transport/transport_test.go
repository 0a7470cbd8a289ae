package transport

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/containerd/errdefs"
	"github.com/containerd/errdefs/pkg/errgrpc"
	"github.com/containerd/ttrpc"
	"github.com/hashicorp/yamux"
	"google.golang.org/protobuf/types/known/emptypb"

	agent "github.com/caisson-containers/caisson/api/agent/v1"
)

func TestParseEndpoint(t *testing.T) {
	for _, tc := range []struct {
		in      string
		want    Endpoint
		wantErr bool
	}{
		{in: "serial", want: Endpoint{Kind: Serial}},
		{in: "vsock", want: Endpoint{Kind: Vsock, Port: DefaultVsockPort}},
		{in: "vsock:2048", want: Endpoint{Kind: Vsock, Port: 2048}},
		{in: "vsock:0", wantErr: true},
		{in: "vsock:x", wantErr: true},
		{in: "serial:3", wantErr: true},
		{in: "tcp", wantErr: true},
		{in: "", wantErr: true},
	} {
		t.Run(tc.in, func(t *testing.T) {
			got, err := ParseEndpoint(tc.in)
			if tc.wantErr {
				if !errdefs.IsInvalidArgument(err) {
					t.Fatalf("ParseEndpoint(%q) error = %v, want InvalidArgument", tc.in, err)
				}
				return
			}
			if err != nil || got != tc.want {
				t.Fatalf("ParseEndpoint(%q) = %v, %v; want %v", tc.in, got, err, tc.want)
			}
			if back, err := ParseEndpoint(got.String()); err != nil || back != got {
				t.Fatalf("round trip of %v = %v, %v", got, back, err)
			}
		})
	}
}

func TestEndpointFromCmdline(t *testing.T) {
	e, err := EndpointFromCmdline("console=ttyS0 quiet caisson.transport=vsock:99 panic=-1")
	if err != nil || e != (Endpoint{Kind: Vsock, Port: 99}) {
		t.Fatalf("got %v, %v", e, err)
	}
	e, err = EndpointFromCmdline("console=ttyS0")
	if err != nil || e.Kind != Serial {
		t.Fatalf("default: got %v, %v", e, err)
	}
	if _, err := EndpointFromCmdline("caisson.transport=carrier-pigeon"); !errdefs.IsInvalidArgument(err) {
		t.Fatalf("bad transport: got %v", err)
	}
}

func TestOpenSerialPortFindsPortByName(t *testing.T) {
	sys, dev := t.TempDir(), t.TempDir()
	for port, name := range map[string]string{"vport1p1": "org.qemu.guest_agent.0", "vport1p2": SerialPortName} {
		os.MkdirAll(filepath.Join(sys, port), 0o755)
		os.WriteFile(filepath.Join(sys, port, "name"), []byte(name+"\n"), 0o644)
		os.WriteFile(filepath.Join(dev, port), []byte(port), 0o644)
	}
	f, err := openSerialPort(sys, dev, SerialPortName)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	// Each stand-in port's content is its name.
	if b, err := io.ReadAll(f); err != nil || string(b) != "vport1p2" {
		t.Fatalf("opened %q (%v), want vport1p2", b, err)
	}
	if _, err := openSerialPort(sys, dev, "org.example.missing"); !errdefs.IsNotFound(err) {
		t.Fatalf("missing port: got %v, want NotFound", err)
	}
}

// socketPair stands in for a virtio-serial port: one byte pipe, buffered by the kernel
// as QEMU buffers host bytes until the guest opens its port.
func socketPair(t *testing.T) (host, guest *os.File) {
	t.Helper()
	fds, err := syscall.Socketpair(syscall.AF_UNIX, syscall.SOCK_STREAM, 0)
	if err != nil {
		t.Fatal(err)
	}
	// Non-blocking, so that *os.File uses the poller and Close interrupts a blocked Read,
	// as it does for the real port device (a pollable char device) and QEMU's unix socket.
	for _, fd := range fds {
		if err := syscall.SetNonblock(fd, true); err != nil {
			t.Fatal(err)
		}
	}
	host, guest = os.NewFile(uintptr(fds[0]), "host"), os.NewFile(uintptr(fds[1]), "guest")
	t.Cleanup(func() { host.Close(); guest.Close() })
	return host, guest
}

type testSandbox struct{ agent.SandboxService }

func (testSandbox) Check(context.Context, *agent.CheckRequest) (*agent.CheckResponse, error) {
	return &agent.CheckResponse{UptimeNs: 42}, nil
}

type testStorage struct{}

func (testStorage) Mount(_ context.Context, r *agent.MountStorageRequest) (*agent.MountStorageResponse, error) {
	return nil, errgrpc.ToGRPC(fmt.Errorf("device %s: %w", r.GetDevice().GetPciPath(), errdefs.ErrNotFound))
}

func (testStorage) Unmount(context.Context, *agent.UnmountStorageRequest) (*emptypb.Empty, error) {
	return nil, errgrpc.ToGRPC(fmt.Errorf("storage: %w", errdefs.ErrFailedPrecondition))
}

// startGuest serves the test services and echoes stdio connections' hash back, the way
// the agent will serve: yamux over the port, demuxed by preamble.
func startGuest(t *testing.T, ctx context.Context, port io.ReadWriteCloser, stdio StdioHandler) {
	t.Helper()
	l, err := ListenSerial(port)
	if err != nil {
		t.Fatal(err)
	}
	srv, err := ttrpc.NewServer()
	if err != nil {
		t.Fatal(err)
	}
	agent.RegisterSandboxService(srv, testSandbox{})
	agent.RegisterStorageService(srv, testStorage{})
	dl := Demux(ctx, l, stdio)
	go srv.Serve(ctx, dl)
	t.Cleanup(func() { srv.Close(); dl.Close() })
}

// hostTTRPC opens the host's session on port and a ttrpc client over it, the way the
// shim does, both closed when the test ends.
func hostTTRPC(t *testing.T, ctx context.Context, port io.ReadWriteCloser) (Session, *ttrpc.Client) {
	t.Helper()
	s, err := NewSerialSession(port)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	c, err := OpenTTRPC(ctx, s)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return s, c
}

func TestSerialTTRPCWaitsForLateGuest(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	hostEnd, guestEnd := socketPair(t)

	s, err := NewSerialSession(hostEnd)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()

	// The host calls before the guest serves, as a shim does while the VM boots.
	answered := make(chan error, 1)
	go func() {
		c, err := OpenTTRPC(ctx, s)
		if err != nil {
			answered <- err
			return
		}
		defer c.Close()
		resp, err := agent.NewSandboxClient(c).Check(ctx, &agent.CheckRequest{})
		if err == nil && resp.GetUptimeNs() != 42 {
			err = fmt.Errorf("uptime %d, want 42", resp.GetUptimeNs())
		}
		answered <- err
	}()
	select {
	case err := <-answered:
		t.Fatalf("Check answered before the guest served: %v", err)
	case <-time.After(200 * time.Millisecond):
	}
	startGuest(t, ctx, guestEnd, func(_ *agent.StdioStream, c net.Conn) { c.Close() })
	if err := <-answered; err != nil {
		t.Fatal(err)
	}
}

func TestErrorsCrossTheBoundary(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	hostEnd, guestEnd := socketPair(t)
	startGuest(t, ctx, guestEnd, func(_ *agent.StdioStream, c net.Conn) { c.Close() })
	_, c := hostTTRPC(t, ctx, hostEnd)
	st := agent.NewStorageClient(c)
	_, err := st.Mount(ctx, &agent.MountStorageRequest{Device: &agent.Device{PciPath: "05.0/00.0"}})
	if err = errgrpc.ToNative(err); !errdefs.IsNotFound(err) {
		t.Fatalf("Mount error = %v, want NotFound", err)
	}
	_, err = st.Unmount(ctx, &agent.UnmountStorageRequest{StorageId: "x"})
	if err = errgrpc.ToNative(err); !errdefs.IsFailedPrecondition(err) {
		t.Fatalf("Unmount error = %v, want FailedPrecondition", err)
	}
}

// TestStdioLosesNothingToASlowReader sends 8 MiB through a stdio connection whose reader
// stalls; flow control must hold the writer back instead of dropping bytes.
func TestStdioLosesNothingToASlowReader(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	hostEnd, guestEnd := socketPair(t)

	payload := make([]byte, 8<<20)
	rand.Read(payload)
	got := make(chan *agent.StdioStream, 1)
	startGuest(t, ctx, guestEnd, func(st *agent.StdioStream, c net.Conn) {
		got <- st
		// Guest → host, as stdout: write everything, then close after the last byte.
		go func() {
			defer c.Close()
			c.Write(payload)
		}()
	})

	s, err := NewSerialSession(hostEnd)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	want := &agent.StdioStream{ContainerId: "c1", ExecId: "e1", Stream: agent.StreamKind_STREAM_KIND_STDOUT}
	c, err := OpenStdio(ctx, s, want)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	st := <-got
	if st.GetContainerId() != "c1" || st.GetExecId() != "e1" || st.GetStream() != agent.StreamKind_STREAM_KIND_STDOUT {
		t.Fatalf("guest saw stream %v, want %v", st, want)
	}
	time.Sleep(2 * time.Second) // stall past ttrpc's 1 s stream-full limit
	var buf bytes.Buffer
	if _, err := io.Copy(&buf, c); err != nil {
		t.Fatal(err)
	}
	if sha256.Sum256(buf.Bytes()) != sha256.Sum256(payload) {
		t.Fatalf("received %d bytes that differ from the %d sent", buf.Len(), len(payload))
	}
}

func TestBadPreamblesAreRefused(t *testing.T) {
	for _, tc := range []struct {
		name string
		raw  []byte
	}{
		{"too long", []byte{0, 1, 0, 0}},
		{"truncated", []byte{0, 0, 0, 9, 1}},
		{"not protobuf", append([]byte{0, 0, 0, 3}, 0xff, 0xff, 0xff)},
		{"unknown kind", mustPreamble(t, &agent.Preamble{Kind: 7})},
		{"stdio without ids", mustPreamble(t, &agent.Preamble{Kind: agent.Preamble_KIND_STDIO})},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if _, err := ReadPreamble(bytes.NewReader(tc.raw)); err == nil {
				t.Fatal("accepted")
			} else if tc.name != "truncated" && !errdefs.IsInvalidArgument(err) {
				t.Fatalf("error %v, want InvalidArgument", err)
			} else if tc.name == "truncated" && !errors.Is(err, io.ErrUnexpectedEOF) {
				t.Fatalf("error %v, want unexpected EOF", err)
			}
		})
	}
}

func mustPreamble(t *testing.T, p *agent.Preamble) []byte {
	var b bytes.Buffer
	if err := WritePreamble(&b, p); err != nil {
		t.Fatal(err)
	}
	return b.Bytes()
}

// Closed tells the session's own ends, however ttrpc or a caller wrapped them, from
// errors that are answers.
func TestClosed(t *testing.T) {
	for _, tc := range []struct {
		err  error
		want bool
	}{
		{yamux.ErrSessionShutdown, true},
		{fmt.Errorf("signal: %w", yamux.ErrSessionShutdown), true},
		{yamux.ErrStreamClosed, true},
		{yamux.ErrConnectionReset, true},
		{yamux.ErrStreamsExhausted, true},
		{errors.New("session shutdown"), false}, // the same words from elsewhere
		{errdefs.ErrNotFound, false},
		{nil, false},
	} {
		if got := Closed(tc.err); got != tc.want {
			t.Errorf("Closed(%v) = %v, want %v", tc.err, got, tc.want)
		}
	}
}
