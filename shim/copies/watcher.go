package copies

import (
	"context"
	"errors"
	"sync"
	"time"

	"github.com/containerd/errdefs"
	"github.com/containerd/errdefs/pkg/errgrpc"
	"github.com/containerd/log"
	"google.golang.org/protobuf/types/known/emptypb"

	agent "github.com/caisson-containers/caisson/api/agent/v1"
)

// Updater is the agent call the watcher makes (agent.ContainersClient has it).
type Updater interface {
	UpdateCopiedMount(context.Context, *agent.UpdateCopiedMountRequest) (*emptypb.Empty, error)
}

// Source is a host bind mount source a container had copied into the guest.
type Source struct {
	Key      string // the host path: CopiedMount.key
	ReadOnly bool   // the container mounts it read-only
	Sig      Signature
}

// Watcher carries host-side changes of the pod's copied mounts into the
// guest, as Kata's watchable bind mounts do: one goroutine per pod checks, every
// interval, the signature of each watched source (metadata only; see
// treeSignature) and, when it changed, copies the source again and sends it to
// the agent, which applies the difference (UpdateCopiedMount).
//
// A source is watched while every container of the pod that mounts it mounts it
// read-only (ConfigMaps, Secrets, projected and downward API volumes always
// are). Once a container mounts it writable (an emptyDir), the guest copy is
// the live one, which the pod writes: it is never refreshed again, so the
// host's content never overwrites the pod's writes. A source stops being
// watched when the last container using it is deleted; the goroutine runs only
// while some source is watched, and ends with the pod (Close, or its VM's end).
// A nil watcher watches nothing.
type Watcher struct {
	agent    Updater
	interval time.Duration // 0: never
	limit    int64
	podDone  <-chan struct{}
	log      *log.Entry

	// refreshing is held by the poller while it refreshes a source: a container
	// that makes a source writable waits out a refresh of it in flight.
	refreshing sync.Mutex

	mu      sync.Mutex
	sources map[string]*watchedSource // by key
	users   map[string][]string       // keys by container id
	stop    context.CancelFunc        // of the running poller, if any
	done    chan struct{}             // closed when it returns
	closed  bool
}

// watchedSource is one host source of the pod.
type watchedSource struct {
	key      string
	refs     int
	writable bool      // some container mounted it writable: never refreshed
	sig      Signature // of the content the guest holds

	// What went wrong last, so that a lasting problem is logged once.
	failures int
	warned   string
}

// NewWatcher returns the watcher of a pod whose agent is a and which ends with podDone.
func NewWatcher(ctx context.Context, a Updater, podDone <-chan struct{}, interval time.Duration, limit int64) *Watcher {
	return &Watcher{
		agent: a, interval: interval, limit: limit, podDone: podDone,
		log:     log.G(ctx),
		sources: map[string]*watchedSource{},
		users:   map[string][]string{},
	}
}

// Add records the sources container id has copied, before the guest creates
// it (Remove undoes it if that fails). When it returns, no refresh of a source
// the container mounts writable is under way, nor will be.
func (w *Watcher) Add(id string, srcs []Source) {
	if w == nil || w.interval == 0 || len(srcs) == 0 {
		return
	}
	w.mu.Lock()
	if w.closed {
		w.mu.Unlock()
		return
	}
	madeWritable := false
	for _, s := range srcs {
		ws, ok := w.sources[s.Key]
		if !ok {
			// The guest will hold what this container's request carries: a
			// container that shares an existing copy does not change it.
			ws = &watchedSource{key: s.Key, sig: s.Sig}
			w.sources[s.Key] = ws
		}
		ws.refs++
		if !s.ReadOnly {
			// Even for a new entry: a refresh of an earlier one of the same key
			// may still be in flight.
			ws.writable, madeWritable = true, true
		}
		w.users[id] = append(w.users[id], s.Key)
	}
	if w.stop == nil && w.watching() {
		ctx, cancel := context.WithCancel(context.Background())
		w.stop, w.done = cancel, make(chan struct{})
		go w.run(ctx, w.done)
	}
	w.mu.Unlock()
	if madeWritable {
		w.refreshing.Lock()
		w.refreshing.Unlock() //nolint:staticcheck // waits out a refresh in flight
	}
}

// Remove forgets the sources of container id, deleted; with the last watched
// source, the poller ends (Remove returns once it has).
func (w *Watcher) Remove(id string) {
	if w == nil {
		return
	}
	w.mu.Lock()
	for _, key := range w.users[id] {
		ws := w.sources[key]
		if ws.refs--; ws.refs == 0 {
			delete(w.sources, key)
		}
	}
	delete(w.users, id)
	var done chan struct{}
	if w.stop != nil && !w.watching() {
		w.stop()
		done, w.stop, w.done = w.done, nil, nil
	}
	w.mu.Unlock()
	if done != nil {
		<-done
	}
}

// Close stops the poller for good (the pod stops) and waits for it.
func (w *Watcher) Close() {
	w.mu.Lock()
	w.closed = true
	done := w.done
	if w.stop != nil {
		w.stop()
	}
	w.stop, w.done = nil, nil
	w.mu.Unlock()
	if done != nil {
		<-done
	}
}

// watching reports whether some source is watched. w.mu is held.
func (w *Watcher) watching() bool {
	for _, ws := range w.sources {
		if !ws.writable {
			return true
		}
	}
	return false
}

func (w *Watcher) run(ctx context.Context, done chan struct{}) {
	defer close(done)
	t := time.NewTicker(w.interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-w.podDone:
			return
		case <-t.C:
		}
		w.poll(ctx)
	}
}

// poll refreshes every watched source whose signature changed.
func (w *Watcher) poll(ctx context.Context) {
	for _, ws := range w.due() {
		if ctx.Err() != nil {
			return
		}
		w.refreshing.Lock()
		w.mu.Lock()
		writable := ws.writable
		w.mu.Unlock()
		if !writable {
			w.refresh(ctx, ws)
		}
		w.refreshing.Unlock()
	}
}

// due returns the watched sources.
func (w *Watcher) due() []*watchedSource {
	w.mu.Lock()
	defer w.mu.Unlock()
	var out []*watchedSource
	for _, ws := range w.sources {
		if !ws.writable {
			out = append(out, ws)
		}
	}
	return out
}

// updateTimeout bounds one UpdateCopiedMount call (a tree of a few MiB under TCG).
const updateTimeout = 30 * time.Second

// refresh copies ws into the guest again if its signature changed. Only the
// poller's goroutine calls it, so ws.sig and the failure fields are its own.
func (w *Watcher) refresh(ctx context.Context, ws *watchedSource) {
	logger := w.log.WithField("source", ws.key)
	sig, err := treeSignature(ws.key)
	if err == nil && sig == ws.sig {
		ws.failures, ws.warned = 0, ""
		return
	}
	start := time.Now()
	var files []*agent.CopiedFile
	if err == nil {
		files, sig, err = Tree(ws.key, w.limit)
	}
	if err == nil {
		rctx, cancel := context.WithTimeout(ctx, updateTimeout)
		_, err = w.agent.UpdateCopiedMount(rctx, &agent.UpdateCopiedMountRequest{Key: ws.key, Files: files})
		cancel()
		if err != nil {
			err = errgrpc.ToNative(err)
			if errdefs.IsNotFound(err) || ctx.Err() != nil {
				return // its last container is being deleted, or the pod stops: no warning, and tried again if still watched
			}
		}
	}
	if err == nil {
		ws.sig, ws.failures, ws.warned = sig, 0, ""
		logger.WithField("files", len(files)).WithField("took", time.Since(start)).Debug("copied mount refreshed from the host")
		return
	}
	// Keep the guest's copy as it is and try again at the next tick. A source over
	// the limit is reported at once; other failures (a tree that changed while it
	// was read) when they happen twice in a row.
	ws.failures++
	var over *overLimitError
	isOver := errors.As(err, &over)
	if msg := err.Error(); msg != ws.warned && (isOver || ws.failures > 1) {
		ws.warned = msg
		if isOver {
			logger = logger.WithField("path", over.path).WithField("size", over.size).WithField("limit", over.limit)
		}
		logger.WithError(err).Warn("a host-side change of a copied mount cannot be copied into the VM; the containers keep the previous content")
	}
}
