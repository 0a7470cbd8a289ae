package differ

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"time"

	contentapi "github.com/containerd/containerd/api/services/content/v1"
	leasesapi "github.com/containerd/containerd/api/services/leases/v1"
	"github.com/containerd/containerd/v2/core/content/proxy"
	"github.com/containerd/containerd/v2/core/diff"
	"github.com/containerd/containerd/v2/core/diff/apply"
	"github.com/containerd/containerd/v2/core/leases"
	leasesproxy "github.com/containerd/containerd/v2/core/leases/proxy"
	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/core/mount/manager"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/containerd/v2/plugins/diff/walking"
	"github.com/containerd/log"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	bolt "go.etcd.io/bbolt"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
)

// Remote is the differ as caisson-snapshotter serves it beside the snapshotter
// (a [proxy_plugins] entry of type "diff"): it reads layers from containerd's
// content store through containerd's gRPC content API, and its fallback is
// containerd's mount-manager applier with a mount manager of its own, so that it
// applies every mount list it is given, as the built-in plugin does.
type Remote struct {
	*Differ
	conn   *grpc.ClientConn
	leases leases.Manager
	db     *bolt.DB
	mm     io.Closer
}

// diffLeaseTTL is how long a diff Remote writes stays in the content store for its
// caller to reference it (an image's manifest, a commit), as containerd's unpack
// leases do.
const diffLeaseTTL = time.Hour

// Compare writes the diff under a lease of its own that expires after diffLeaseTTL.
// containerd gives a proxy differ the caller's namespace but not its lease, so the
// content would be referenced by nothing until the caller uses it, and containerd's
// garbage collector, which runs after every deletion, could remove it in between.
func (r *Remote) Compare(ctx context.Context, lower, upper []mount.Mount, opts ...diff.Opt) (ocispec.Descriptor, error) {
	l, err := r.leases.Create(ctx, leases.WithRandomID(), leases.WithExpiration(diffLeaseTTL))
	if err != nil {
		return ocispec.Descriptor{}, fmt.Errorf("lease for the diff: %w", err)
	}
	return r.Differ.Compare(leases.WithLease(ctx, l.ID), lower, upper, opts...)
}

// NewRemote returns a Remote that dials containerd at containerdAddress (a unix
// socket path; the dial happens at the first read) and keeps its mount manager's
// state in stateDir. The mount manager may create files (the mkfs transform) only
// under allowedRoot, the snapshotter's root.
//
// Activations a killed process left behind (a fallback apply in progress) are
// deactivated first: their mounts are unmounted and their loop devices freed.
func NewRemote(ctx context.Context, containerdAddress, stateDir, allowedRoot string, layers []LayerWriter) (_ *Remote, retErr error) {
	r := &Remote{}
	defer func() {
		if retErr != nil {
			r.Close()
		}
	}()
	conn, err := grpc.NewClient("unix://"+containerdAddress, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return nil, fmt.Errorf("containerd at %s: %w", containerdAddress, err)
	}
	r.conn = conn
	cs := proxy.NewContentStore(contentapi.NewContentClient(conn))
	r.leases = leasesproxy.NewLeaseManager(leasesapi.NewLeasesClient(conn))

	targets := filepath.Join(stateDir, "t")
	if err := os.MkdirAll(targets, 0o700); err != nil {
		return nil, err
	}
	db, err := bolt.Open(filepath.Join(stateDir, "mounts.db"), 0o600, nil)
	if err != nil {
		return nil, fmt.Errorf("open mount manager state: %w", err)
	}
	r.db = db
	mm, err := manager.NewManager(db, targets, manager.WithAllowedRoot(allowedRoot))
	if err != nil {
		return nil, err
	}
	if c, ok := mm.(io.Closer); ok {
		r.mm = c // it closes the db too
		r.db = nil
	}
	if err := deactivateAll(ctx, db, mm); err != nil {
		return nil, fmt.Errorf("clean up the mount manager's leftovers: %w", err)
	}
	r.Differ = New(cs, layers, apply.NewFileSystemApplierWithMountManager(cs, mm), walking.NewWalkingDiff(cs))
	return r, nil
}

// Close closes the connection to containerd and the mount manager.
func (r *Remote) Close() error {
	var errs []error
	if r.mm != nil {
		errs = append(errs, r.mm.Close())
	}
	if r.db != nil {
		errs = append(errs, r.db.Close())
	}
	if r.conn != nil {
		errs = append(errs, r.conn.Close())
	}
	return errors.Join(errs...)
}

// deactivateAll deactivates every activation mm has recorded, in every namespace
// (the namespaces are the top-level buckets of its schema, under "v1").
func deactivateAll(ctx context.Context, db *bolt.DB, mm mount.Manager) error {
	var nss []string
	if err := db.View(func(tx *bolt.Tx) error {
		v1 := tx.Bucket([]byte("v1"))
		if v1 == nil {
			return nil
		}
		return v1.ForEachBucket(func(k []byte) error {
			nss = append(nss, string(k))
			return nil
		})
	}); err != nil {
		return err
	}
	var errs []error
	for _, ns := range nss {
		nctx := namespaces.WithNamespace(ctx, ns)
		infos, err := mm.List(nctx)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		for _, info := range infos {
			log.G(ctx).WithField("name", info.Name).Info("deactivating a mount left by a killed process")
			if err := mm.Deactivate(nctx, info.Name); err != nil {
				errs = append(errs, err)
			}
		}
	}
	return errors.Join(errs...)
}
