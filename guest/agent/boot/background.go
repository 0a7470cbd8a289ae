package boot

import (
	"context"
	"runtime"

	"github.com/containerd/log"
	"golang.org/x/sys/unix"
)

// backgroundNice is the CPU priority of the background set-up: the lowest, so that the
// agent's start and its first answers go first on the guest's (usually one) vCPU.
const backgroundNice = 19

// Background is the set-up the agent does while it already serves: the calls that need
// it wait for it.
type Background struct {
	done chan struct{}
	err  error
}

// StartBackground runs jobs, one after the other, on a thread of the lowest CPU priority,
// until one fails.
func StartBackground(ctx context.Context, jobs ...func(context.Context) error) *Background {
	b := &Background{done: make(chan struct{})}
	go func() {
		defer close(b.done)
		// The thread is never unlocked: it ends with the goroutine, and its priority with it.
		runtime.LockOSThread()
		if err := unix.Setpriority(unix.PRIO_PROCESS, unix.Gettid(), backgroundNice); err != nil {
			log.G(ctx).WithError(err).Warn("background set-up at normal priority")
		}
		for _, job := range jobs {
			if b.err = job(ctx); b.err != nil {
				log.G(ctx).WithError(b.err).Error("background set-up")
				return
			}
		}
		log.G(ctx).WithField("uptime", Uptime()).Debug("background set-up done")
	}()
	return b
}

// Wait returns once the set-up is done, with the error that stopped it.
func (b *Background) Wait(ctx context.Context) error {
	select {
	case <-b.done:
		return b.err
	case <-ctx.Done():
		return ctx.Err()
	}
}
