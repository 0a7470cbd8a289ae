// Package transport carries the shim↔agent API between the host and the VM.
//
// Two transports sit behind one pair of interfaces:
//   - serial: one virtio-serial port (QEMU exposes its host end as a unix socket)
//     multiplexed with yamux, for hosts without /dev/vhost-vsock;
//   - vsock: a vsock connection per stream. No pod uses it yet (the shim's
//     configuration refuses guest.transport = "vsock"), and no test drives it:
//     these machines have no /dev/vhost-vsock.
//
// On either, the host side is a Session that opens connections and the guest
// side a net.Listener that accepts them. Each connection starts with an
// agent.Preamble (see preamble.go) saying whether it carries ttrpc or one
// standard stream of one process. On serial, a handshake (handshake.go) ties each
// host connection to a fresh guest yamux session first, so that a shim that
// reconnects (a restart) is served at its first attempt.
package transport

import (
	"context"
	"errors"
	"fmt"
	"net"
	"strconv"
	"strings"

	"github.com/containerd/errdefs"
	"github.com/hashicorp/yamux"
)

// Session is the host's handle on the agent: it opens connections to it.
type Session interface {
	// Open opens a new connection to the agent.
	Open(ctx context.Context) (net.Conn, error)
	// Close ends the session and every connection it opened.
	Close() error
}

// Kind names a transport.
type Kind string

const (
	Serial Kind = "serial"
	Vsock  Kind = "vsock"
)

// SerialPortName is the name of the virtio-serial port that carries the API
// (QEMU's virtserialport name=; the guest finds it in /sys/class/virtio-ports).
const SerialPortName = "org.caisson.agent.0"

// DefaultVsockPort is the vsock port the agent listens on.
const DefaultVsockPort = 1024

// Endpoint is what the shim tells the agent, on the kernel command line as
// `caisson.transport=<Endpoint>`, about where to listen: "serial" or "vsock:PORT".
type Endpoint struct {
	Kind Kind
	// Port is the vsock port (Kind == Vsock).
	Port uint32
}

// CmdlineKey is the kernel command line parameter that carries the Endpoint.
const CmdlineKey = "caisson.transport"

func (e Endpoint) String() string {
	if e.Kind == Vsock {
		return fmt.Sprintf("vsock:%d", e.Port)
	}
	return string(e.Kind)
}

// ParseEndpoint parses the form Endpoint.String returns.
func ParseEndpoint(s string) (Endpoint, error) {
	kind, port, hasPort := strings.Cut(s, ":")
	switch Kind(kind) {
	case Serial:
		if hasPort {
			return Endpoint{}, fmt.Errorf("transport %q: serial takes no port: %w", s, errdefs.ErrInvalidArgument)
		}
		return Endpoint{Kind: Serial}, nil
	case Vsock:
		if !hasPort {
			return Endpoint{Kind: Vsock, Port: DefaultVsockPort}, nil
		}
		p, err := strconv.ParseUint(port, 10, 32)
		if err != nil || p == 0 {
			return Endpoint{}, fmt.Errorf("transport %q: bad vsock port: %w", s, errdefs.ErrInvalidArgument)
		}
		return Endpoint{Kind: Vsock, Port: uint32(p)}, nil
	}
	return Endpoint{}, fmt.Errorf("transport %q: want %q or %q: %w", s, Serial, Vsock+":PORT", errdefs.ErrInvalidArgument)
}

// EndpointFromCmdline finds the Endpoint in a kernel command line (/proc/cmdline);
// without one, the agent uses the serial transport.
func EndpointFromCmdline(cmdline string) (Endpoint, error) {
	for _, f := range strings.Fields(cmdline) {
		if v, ok := strings.CutPrefix(f, CmdlineKey+"="); ok {
			return ParseEndpoint(v)
		}
	}
	return Endpoint{Kind: Serial}, nil
}

// Closed reports whether err is a session's own end rather than an answer from the other
// side: the session is shut down (the peer closed it, or broke it with bytes that are not
// the protocol) or the connection was closed or reset under the call. ttrpc passes these
// through as they are (it turns only EOF and closed pipes into ttrpc.ErrClosed).
func Closed(err error) bool {
	return errors.Is(err, yamux.ErrSessionShutdown) || errors.Is(err, yamux.ErrStreamClosed) ||
		errors.Is(err, yamux.ErrConnectionReset) || errors.Is(err, yamux.ErrStreamsExhausted)
}
