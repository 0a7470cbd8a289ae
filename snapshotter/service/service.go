// Package service serves a snapshotter as containerd's snapshots gRPC API on a
// unix socket (containerd's contrib/snapshotservice), for [proxy_plugins].
package service

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"time"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/v2/contrib/snapshotservice"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/log"
	"google.golang.org/grpc"
)

// StopTimeout bounds a graceful stop: RPCs still running after it are cut off.
const StopTimeout = 30 * time.Second

// Serve serves sn on the unix socket address until ctx is done, then stops
// gracefully: it stops accepting, lets running RPCs (a Commit, say) finish for up
// to StopTimeout, and removes the socket. A stale socket from a killed process
// is replaced; a socket another live server answers on is an error.
func Serve(ctx context.Context, sn snapshots.Snapshotter, address string) error {
	l, err := listen(address)
	if err != nil {
		return err
	}
	srv := grpc.NewServer()
	snapshotsapi.RegisterSnapshotsServer(srv, snapshotservice.FromSnapshotter(sn))

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
