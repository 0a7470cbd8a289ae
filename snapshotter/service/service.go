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

func listen(address string) (net.Listener, error) {
	if err := os.MkdirAll(filepath.Dir(address), 0o711); err != nil {
		return nil, err
	}
	if _, err := os.Lstat(address); err == nil {
		if c, err := net.DialTimeout("unix", address, time.Second); err == nil {
			c.Close()
			return nil, fmt.Errorf("%s: another server is listening there", address)
		}
		if err := os.Remove(address); err != nil {
			return nil, fmt.Errorf("remove stale socket: %w", err)
		}
	}
	l, err := net.Listen("unix", address)
	if err != nil {
		return nil, err
	}
	if err := os.Chmod(address, 0o600); err != nil {
		l.Close()
		return nil, err
	}
	return l, nil
}

// namespaceInterceptor makes the namespace of an incoming request (gRPC metadata)
// the namespace of the calls made for it, such as reads from containerd's content
// store, as containerd's own server does (plugins/server/grpc/namespace.go).
func namespaceInterceptor(ctx context.Context, req any, _ *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
	if ns, ok := namespaces.Namespace(ctx); ok {
		ctx = namespaces.WithNamespace(ctx, ns)
	}
	return handler(ctx, req)
}
