package pod

import (
	"context"
	"errors"
	"sync"
	"time"

	"github.com/containerd/ttrpc"

	"github.com/caisson-containers/caisson/internal/transport"
)

// Every unary call the shim makes to the agent has a deadline, so that a guest that stops
// answering (hung, or its QEMU stopped) cannot hold a task API call, and with it
// containerd, forever. The caller's own deadline applies if it is sooner.
const (
	// ControlTimeout bounds a control call: a signal, a process start, stats, a resize.
	// Each is a few system calls in the guest, answered in milliseconds even under TCG
	// on a loaded machine; an agent silent this long is not answering.
	ControlTimeout = 10 * time.Second
	// SignalTimeout bounds a Signal call, shorter than other control calls: a stop must
	// end within its grace period plus a few seconds, and a SIGKILL the guest does not
	// confirm in time ends the VM (see Kill).
	SignalTimeout = 5 * time.Second
	// SlowTimeout bounds the calls that mount, copy or create: a sandbox, a storage, a
	// container (its rootfs and copied mounts), a container's deletion (its unmounts).
	SlowTimeout = 2 * time.Minute
)

// callTimeouts are the methods whose deadline is not ControlTimeout; 0: none.
var callTimeouts = map[string]time.Duration{
	"/caisson.agent.v1.Containers/Signal": SignalTimeout,
	// Wait lasts as long as the process: it ends when the process exits, or with the
	// client, which Stop and Kill close (and which fails when the VM dies).
	"/caisson.agent.v1.Containers/Wait":              0,
	"/caisson.agent.v1.Containers/Create":            SlowTimeout,
	"/caisson.agent.v1.Containers/Delete":            SlowTimeout,
	"/caisson.agent.v1.Containers/UpdateCopiedMount": SlowTimeout,
	"/caisson.agent.v1.Sandbox/Create":               SlowTimeout,
	"/caisson.agent.v1.Sandbox/SetNetwork":           SlowTimeout,
	// Resize waits for the guest to handle the hot-plug events.
	"/caisson.agent.v1.Resources/Resize": SlowTimeout,
	"/caisson.agent.v1.Storage/Mount":    SlowTimeout,
	"/caisson.agent.v1.Storage/Unmount":  SlowTimeout,
}

// callTimeout is the deadline of method (0: none).
func callTimeout(method string) time.Duration {
	if d, ok := callTimeouts[method]; ok {
		return d
	}
	return ControlTimeout
}

// deadlines is the agent client's interceptor: it puts each call's deadline on its
// context and records whether the guest answers (see silence).
type deadlines struct {
	mu sync.Mutex
	// missed is set when a call ran out of its own deadline (not the caller's), and
	// cleared by any answer: the guest has not answered since.
	missed bool
}

func (d *deadlines) intercept(ctx context.Context, req *ttrpc.Request, resp *ttrpc.Response, info *ttrpc.UnaryClientInfo, invoke ttrpc.Invoker) error {
	var own context.Context
	if t := callTimeout(info.FullMethod); t > 0 {
		if dl, ok := ctx.Deadline(); !ok || time.Until(dl) > t {
			var cancel context.CancelFunc
			ctx, cancel = context.WithTimeout(ctx, t)
			defer cancel()
			own = ctx
		}
	}
	err := invoke(ctx, req, resp)
	switch {
	case err == nil || !isTransportError(err):
		// An answer, even an error, is the guest talking.
		d.set(false)
	case own != nil && errors.Is(own.Err(), context.DeadlineExceeded):
		d.set(true)
	}
	return err
}

func (d *deadlines) set(missed bool) {
	d.mu.Lock()
	d.missed = missed
	d.mu.Unlock()
}

// silent reports whether the last call that ended ran out of its deadline.
func (d *deadlines) silent() bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.missed
}

// isTransportError reports whether err is the client's own (no answer came: a deadline,
// a cancellation, a closed connection) rather than an error the agent answered with.
func isTransportError(err error) bool {
	return errors.Is(err, context.DeadlineExceeded) || errors.Is(err, context.Canceled) || errors.Is(err, ttrpc.ErrClosed) ||
		transport.Closed(err)
}
