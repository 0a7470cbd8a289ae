package transport

import (
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"net"

	"github.com/containerd/errdefs"
	"github.com/containerd/ttrpc"
	"google.golang.org/protobuf/proto"

	agent "github.com/caisson-containers/caisson/api/agent/v1"
)

// maxPreamble bounds a preamble's size: ids and a kind, never more.
const maxPreamble = 4096

// WritePreamble writes p as the first bytes of a connection: a 4-byte
// big-endian length, then the message.
func WritePreamble(w io.Writer, p *agent.Preamble) error {
	b, err := proto.Marshal(p)
	if err != nil {
		return fmt.Errorf("encode preamble: %w", err)
	}
	if len(b) > maxPreamble {
		return fmt.Errorf("preamble of %d bytes exceeds %d: %w", len(b), maxPreamble, errdefs.ErrInvalidArgument)
	}
	buf := make([]byte, 4+len(b))
	binary.BigEndian.PutUint32(buf, uint32(len(b)))
	copy(buf[4:], b)
	if _, err := w.Write(buf); err != nil {
		return fmt.Errorf("write preamble: %w", err)
	}
	return nil
}

// ReadPreamble reads the preamble WritePreamble wrote.
func ReadPreamble(r io.Reader) (*agent.Preamble, error) {
	var hdr [4]byte
	if _, err := io.ReadFull(r, hdr[:]); err != nil {
		return nil, fmt.Errorf("read preamble length: %w", err)
	}
	n := binary.BigEndian.Uint32(hdr[:])
	if n > maxPreamble {
		return nil, fmt.Errorf("preamble of %d bytes exceeds %d: %w", n, maxPreamble, errdefs.ErrInvalidArgument)
	}
	b := make([]byte, n)
	if _, err := io.ReadFull(r, b); err != nil {
		return nil, fmt.Errorf("read preamble: %w", err)
	}
	var p agent.Preamble
	if err := proto.Unmarshal(b, &p); err != nil {
		return nil, fmt.Errorf("decode preamble: %w: %w", err, errdefs.ErrInvalidArgument)
	}
	switch p.GetKind() {
	case agent.Preamble_KIND_TTRPC:
	case agent.Preamble_KIND_STDIO:
		if p.GetStdio().GetContainerId() == "" || p.GetStdio().GetStream() == agent.StreamKind_STREAM_KIND_UNSPECIFIED {
			return nil, fmt.Errorf("stdio preamble needs a container id and a stream: %w", errdefs.ErrInvalidArgument)
		}
		// proto3 enums are open: an unknown number decodes without error.
		if _, ok := agent.StreamKind_name[int32(p.GetStdio().GetStream())]; !ok {
			return nil, fmt.Errorf("stdio preamble: stream kind %d: %w", p.GetStdio().GetStream(), errdefs.ErrInvalidArgument)
		}
	default:
		return nil, fmt.Errorf("preamble kind %v: %w", p.GetKind(), errdefs.ErrInvalidArgument)
	}
	return &p, nil
}

// OpenTTRPC opens a connection for ttrpc and returns a client over it.
func OpenTTRPC(ctx context.Context, s Session, opts ...ttrpc.ClientOpts) (*ttrpc.Client, error) {
	c, err := open(ctx, s, &agent.Preamble{Kind: agent.Preamble_KIND_TTRPC})
	if err != nil {
		return nil, err
	}
	return ttrpc.NewClient(c, opts...), nil
}

// OpenStdio opens the connection that carries one standard stream of a process.
func OpenStdio(ctx context.Context, s Session, stream *agent.StdioStream) (net.Conn, error) {
	return open(ctx, s, &agent.Preamble{Kind: agent.Preamble_KIND_STDIO, Stdio: stream})
}

func open(ctx context.Context, s Session, p *agent.Preamble) (net.Conn, error) {
	c, err := s.Open(ctx)
	if err != nil {
		return nil, err
	}
	if err := WritePreamble(c, p); err != nil {
		c.Close()
		return nil, err
	}
	return c, nil
}
