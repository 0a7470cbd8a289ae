// Package service serves a snapshotter as containerd's snapshots gRPC API
// (containerd's contrib/snapshotservice) and, optionally, a differ as its diff gRPC
// API (contrib/diffservice) on one unix socket, for [proxy_plugins].
package service

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"time"

	diffapi "github.com/containerd/containerd/api/services/diff/v1"
	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/v2/contrib/diffservice"
	"github.com/containerd/containerd/v2/contrib/snapshotservice"
	"github.com/containerd/containerd/v2/core/diff"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"google.golang.org/grpc"
)

// Differ is a diff.Applier and diff.Comparer, as the diff API serves them.
type Differ interface {
	diff.Applier
	diff.Comparer
}

// StopTimeout bounds a graceful stop: RPCs still running after it are cut off.
const StopTimeout = 30 * time.Second

// Serve serves sn (and d, unless nil) on the unix socket address until ctx is done, then stops
// gracefully: it stops accepting, lets running RPCs (a Commit, say) finish for up
// to StopTimeout, and removes the socket. A stale socket from a killed process
// is replaced; a socket another live server answers on is an error.
func Serve(ctx context.Context, sn snapshots.Snapshotter, d Differ, address string) error {
	l, err := listen(address)
	if err != nil {
		return err
	}
	srv := grpc.NewServer(grpc.UnaryInterceptor(namespaceInterceptor))
	snapshotsapi.RegisterSnapshotsServer(srv, snapshotservice.FromSnapshotter(sn))
	if d != nil {
		diffapi.RegisterDiffServer(srv, diffservice.FromApplierAndComparer(d, d))
	}

	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(l) }()
	log.G(ctx).WithField("address", address).Info("serving caisson snapshotter")

	select {
	case err := <-errc:
		os.Remove(address)
		return fmt.Errorf("serve %s: %w", address, err)
	case <-ctx.Done():
	}
	log.G(ctx).Info("stopping: waiting for running requests")
	done := make(chan struct{})
	go func() {
		srv.GracefulStop()
		close(done)
	}()
	select {
	case <-done:
	case <-time.After(StopTimeout):
		log.G(ctx).Warn("requests still running after the stop timeout; stopping them")
		srv.Stop()
		<-done
	}
	if err := os.Remove(address); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	return nil
}

// listen binds the socket with mode 0600 before it appears at address. Binding at address
// and then chmod-ing it would leave a window in which the socket exists with the mode the
// umask gives (anyone could connect and drive the snapshotter, and through it write
// files as root). Setting the umask instead is process-wide: it would also apply to
// whatever the snapshotter's other goroutines create meanwhile. So the socket is bound
// in a fresh directory of mode 0700 beside address, which nobody but root can enter,
// given its mode there, and renamed into place: it appears at address, atomically,
// already 0600 (and a stale socket there is replaced in the same step).
func listen(address string) (net.Listener, error) {
	dir := filepath.Dir(address)
	if err := os.MkdirAll(dir, 0o711); err != nil {
		return nil, err
	}
	if _, err := os.Lstat(address); err == nil {
		if c, err := net.DialTimeout("unix", address, time.Second); err == nil {
			c.Close()
			return nil, fmt.Errorf("%s: another server is listening there: %w", address, errdefs.ErrAlreadyExists)
		}
	}
	private, err := os.MkdirTemp(dir, ".s") // mode 0700
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(private)
	tmp := filepath.Join(private, "s")
	if len(tmp) > maxSocketPath {
		return nil, fmt.Errorf("%s: the socket's temporary path %s is longer than a unix socket path may be (%d): %w",
			address, tmp, maxSocketPath, errdefs.ErrInvalidArgument)
	}
	l, err := net.Listen("unix", tmp)
	if err != nil {
		return nil, err
	}
	// Close must not unlink tmp: the socket lives at address by then (Serve removes it).
	l.(*net.UnixListener).SetUnlinkOnClose(false)
	if err := os.Chmod(tmp, 0o600); err != nil {
		l.Close()
		return nil, err
	}
	if err := os.Rename(tmp, address); err != nil {
		l.Close()
		return nil, fmt.Errorf("move the socket into place: %w", err)
	}
	return l, nil
}

// maxSocketPath is the longest unix socket path Linux accepts.
const maxSocketPath = 107

// namespaceInterceptor makes the namespace of an incoming request (gRPC metadata)
// the namespace of the calls made for it, such as reads from containerd's content
// store, as containerd's own server does (plugins/server/grpc/namespace.go).
func namespaceInterceptor(ctx context.Context, req any, _ *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
	if ns, ok := namespaces.Namespace(ctx); ok {
		ctx = namespaces.WithNamespace(ctx, ns)
	}
	return handler(ctx, req)
}
