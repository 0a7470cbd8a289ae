package pod

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/containerd/ttrpc"
)

func TestCallDeadlines(t *testing.T) {
	const slow = "/test.Slow/Call"
	callTimeouts[slow] = 20 * time.Millisecond
	t.Cleanup(func() { delete(callTimeouts, slow) })
	long, cancel := context.WithTimeout(context.Background(), time.Hour)
	defer cancel()
	short, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()

	for _, tc := range []struct {
		name   string
		method string
		ctx    context.Context
		want   time.Duration // the deadline the call gets, from now; 0: none
	}{
		{"control call", "/caisson.agent.v1.Containers/Stats", context.Background(), ControlTimeout},
		{"signal", "/caisson.agent.v1.Containers/Signal", context.Background(), SignalTimeout},
		{"a caller's later deadline is cut", "/caisson.agent.v1.Containers/Signal", long, SignalTimeout},
		{"a caller's sooner deadline stays", "/caisson.agent.v1.Containers/Signal", short, time.Second},
		{"slow call", "/caisson.agent.v1.Containers/Create", context.Background(), SlowTimeout},
		{"wait has none", "/caisson.agent.v1.Containers/Wait", context.Background(), 0},
		{"wait keeps the caller's", "/caisson.agent.v1.Containers/Wait", long, time.Hour},
	} {
		t.Run(tc.name, func(t *testing.T) {
			d := &deadlines{}
			err := d.intercept(tc.ctx, &ttrpc.Request{}, &ttrpc.Response{}, &ttrpc.UnaryClientInfo{FullMethod: tc.method},
				func(ctx context.Context, _ *ttrpc.Request, _ *ttrpc.Response) error {
					dl, ok := ctx.Deadline()
					if tc.want == 0 {
						if ok {
							t.Errorf("deadline in %s, want none", time.Until(dl))
						}
						return nil
					}
					if !ok {
						t.Fatalf("no deadline, want %s", tc.want)
					}
					if got := time.Until(dl); got > tc.want || got < tc.want-time.Second {
						t.Errorf("deadline in %s, want %s", got, tc.want)
					}
					return nil
				})
			if err != nil {
				t.Fatal(err)
			}
		})
	}

	t.Run("silence", func(t *testing.T) {
		d := &deadlines{}
		info := &ttrpc.UnaryClientInfo{FullMethod: slow}
		noAnswer := func(ctx context.Context, _ *ttrpc.Request, _ *ttrpc.Response) error {
			<-ctx.Done()
			return ctx.Err()
		}
		// The caller giving up is not the guest's silence.
		cctx, cancel := context.WithCancel(context.Background())
		cancel()
		if err := d.intercept(cctx, nil, nil, info, noAnswer); !errors.Is(err, context.Canceled) {
			t.Fatalf("got %v", err)
		}
		if d.silent() {
			t.Error("silent after the caller cancelled")
		}
		if err := d.intercept(context.Background(), nil, nil, info, noAnswer); !errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("got %v", err)
		}
		if !d.silent() {
			t.Error("not silent after a call ran out of its deadline")
		}
		// An error the agent answers with is an answer.
		answered := errors.New("not found")
		if err := d.intercept(context.Background(), nil, nil, info, func(context.Context, *ttrpc.Request, *ttrpc.Response) error { return answered }); err != answered {
			t.Fatalf("got %v", err)
		}
		if d.silent() {
			t.Error("still silent after an answer")
		}
	})
}
