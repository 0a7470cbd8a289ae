package service

import (
	"context"
	"fmt"
	"io"
	"net"

	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"google.golang.org/protobuf/types/known/emptypb"

	agent "github.com/caisson-containers/caisson/api/agent/v1"
)

type ioService struct{ a *Agent }

var _ agent.IOService = ioService{}

func (s ioService) ResizePty(ctx context.Context, req *agent.ResizePtyRequest) (*emptypb.Empty, error) {
	_, p, err := s.a.process(req.GetContainerId(), req.GetExecId())
	if err != nil {
		return nil, err
	}
	if req.GetWidth() > 0xffff || req.GetHeight() > 0xffff {
		return nil, fmt.Errorf("terminal size %dx%d: %w", req.GetWidth(), req.GetHeight(), errdefs.ErrInvalidArgument)
	}
	if err := p.Resize(uint16(req.GetWidth()), uint16(req.GetHeight())); err != nil {
		return nil, err
	}
	return &emptypb.Empty{}, nil
}

func (s ioService) CloseStdin(ctx context.Context, req *agent.CloseStdinRequest) (*emptypb.Empty, error) {
	_, p, err := s.a.process(req.GetContainerId(), req.GetExecId())
	if err != nil {
		return nil, err
	}
	if err := p.CloseStdin(); err != nil {
		return nil, err
	}
	return &emptypb.Empty{}, nil
}

type stdioKey struct {
	container, exec string
	stream          agent.StreamKind
}

// forgetStdio forgets the streams attached to a deleted process (every process of the
// container when all is set), so that its ids can be used again.
func (a *Agent) forgetStdio(container, exec string, all bool) {
	a.mu.Lock()
	defer a.mu.Unlock()
	for k := range a.stdio {
		if k.container == container && (all || k.exec == exec) {
			delete(a.stdio, k)
		}
	}
}

// HandleStdio serves one standard-stream connection (transport.StdioHandler): stdin
// bytes go to the process until the shim closes its side, which closes the process's
// stdin; stdout and stderr bytes go to the shim until EOF, after the last byte the
// process (and whatever inherited the stream) wrote, and then the connection is closed.
func (a *Agent) HandleStdio(stream *agent.StdioStream, conn net.Conn) {
	ctx := log.WithLogger(context.Background(), log.L.WithFields(log.Fields{
		"id": stream.GetContainerId(), "exec": stream.GetExecId(), "stream": stream.GetStream().String()}))
	defer conn.Close()
	_, p, err := a.process(stream.GetContainerId(), stream.GetExecId())
	if err != nil {
		log.G(ctx).WithError(err).Warn("stdio connection for an unknown process")
		return
	}
	key := stdioKey{stream.GetContainerId(), stream.GetExecId(), stream.GetStream()}
	a.mu.Lock()
	if a.stdio[key] {
		a.mu.Unlock()
		log.G(ctx).Warn("stream already attached; dropping the second connection")
		return
	}
	a.stdio[key] = true
	a.mu.Unlock()
	stdin, stdout, stderr, ok := p.Streams(ctx)
	if !ok {
		return
	}
	switch stream.GetStream() {
	case agent.StreamKind_STREAM_KIND_STDIN:
		if stdin == nil {
			log.G(ctx).Warn("process has no stdin")
			return
		}
		if _, err := io.Copy(stdin, conn); err != nil {
			log.G(ctx).WithError(err).Debug("stdin copy ended")
		}
		if err := p.CloseStdin(); err != nil {
			log.G(ctx).WithError(err).Debug("close stdin")
		}
	case agent.StreamKind_STREAM_KIND_STDOUT, agent.StreamKind_STREAM_KIND_STDERR:
		src := stdout
		if stream.GetStream() == agent.StreamKind_STREAM_KIND_STDERR {
			src = stderr
		}
		if src == nil {
			log.G(ctx).Warn("stream not attached to the process")
			return
		}
		if _, err := io.Copy(conn, src); err != nil {
			log.G(ctx).WithError(err).Debug("output copy ended")
		}
	}
}
