package transport

import (
	"context"
	"errors"
	"fmt"
	"net"
	"time"

	"github.com/mdlayher/vsock"
)

// The vsock transport needs /dev/vhost-vsock on the host. The machines this
// project is built and tested on have none, so no pod uses it (the shim's
// configuration refuses guest.transport = "vsock") and no test boots a VM with
// it; its framing is the same as serial's.

// DialVsock returns a Session that opens a vsock connection to the agent per
// Open. The first Open retries while the guest is still booting (the
// connection is reset until the agent listens), until ctx ends.
func DialVsock(cid, port uint32) Session {
	return &vsockSession{cid: cid, port: port}
}

type vsockSession struct {
	cid, port uint32
}

func (s *vsockSession) Open(ctx context.Context) (net.Conn, error) {
	backoff := 10 * time.Millisecond
	for {
		c, err := vsock.Dial(s.cid, s.port, nil)
		if err == nil {
			return c, nil
		}
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("dial agent vsock %d:%d: %w", s.cid, s.port, errors.Join(ctx.Err(), err))
		case <-time.After(backoff):
		}
		backoff = min(2*backoff, 200*time.Millisecond)
	}
}

func (s *vsockSession) Close() error { return nil }

// ListenVsock listens for the shim on the guest's vsock port.
func ListenVsock(port uint32) (net.Listener, error) {
	l, err := vsock.Listen(port, nil)
	if err != nil {
		return nil, fmt.Errorf("listen vsock port %d: %w", port, err)
	}
	return l, nil
}
