// Package differ is Caisson's differ, "caisson-diff": a containerd diff.Applier
// that unpacks a layer into a Caisson block snapshotter by writing the layer's tar
// stream straight into the snapshot's EROFS layer image (snapshotter.WriteLayer,
// snapshotter/tarerofs), so every file is created once and its data written once,
// instead of untarring into the writable ext4 image and rebuilding the tree with
// mkfs.erofs at Commit.
//
// It is modelled on containerd's EROFS differ (plugins/diff/erofs): the layer is
// read from the content store, decompressed by containerd's stream processors
// (diff.NewProcessorChain, diff.GetProcessor) and its diff id computed on the way.
// It applies only to Caisson snapshots: other mounts are errdefs.ErrNotImplemented,
// which containerd's diff service takes as "try the next differ". A Caisson
// snapshot it cannot write exactly (see snapshotter.WriteLayer and package
// tarerofs: a layer replacing its own entries, for one) goes to a fallback applier (containerd's
// mount-manager applier, as the "walking" differ uses) when one is given.
// Comparing is left to a comparer (containerd's walking differ).
package differ

import (
	"context"
	"fmt"
	"io"
	"os"
	"time"

	"github.com/containerd/containerd/v2/core/content"
	"github.com/containerd/containerd/v2/core/diff"
	"github.com/containerd/containerd/v2/core/images"
	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/caisson-containers/caisson/snapshotter/tarerofs"
)

// Name is the differ's plugin id, in the built-in plugin and the proxy alike.
const Name = "caisson-diff"

// LayerWriter is what the differ needs of a snapshotter (*snapshotter.Snapshotter):
// whether mounts are its own, and WriteLayer, which calls write with the
// snapshot's new layer image, or returns errdefs.ErrNotImplemented for mounts it
// does not write that way.
type LayerWriter interface {
	Owns(mounts []mount.Mount) bool
	WriteLayer(ctx context.Context, mounts []mount.Mount, sync bool, write func(ctx context.Context, f *os.File, dir string) error) error
}

// Differ applies layers to Caisson snapshots and hands everything else on.
type Differ struct {
	store    content.Store
	layers   []LayerWriter
	fallback diff.Applier
	comparer diff.Comparer
	limits   tarerofs.Limits
}

// New returns a differ that reads layers from store and writes them into the
// snapshotters in layers. fallback (may be nil) applies what they do not take;
// comparer (may be nil) computes diffs.
func New(store content.Store, layers []LayerWriter, fallback diff.Applier, comparer diff.Comparer) *Differ {
	return &Differ{store: store, layers: layers, fallback: fallback, comparer: comparer}
}

// WithLimits sets the bounds of one layer (tarerofs.Limits; zero fields keep their
// defaults) and returns d. A layer beyond them fails to apply with
// errdefs.ErrInvalidArgument: it is not handed to the fallback, which has no such bounds.
func (d *Differ) WithLimits(l tarerofs.Limits) *Differ {
	d.limits = l
	return d
}

var (
	_ diff.Applier  = (*Differ)(nil)
	_ diff.Comparer = (*Differ)(nil)
)

// Apply applies the layer desc to mounts and returns its uncompressed descriptor
// (the diff id). Bad tar input is errdefs.ErrInvalidArgument naming the entry;
// the snapshot stays active, with nothing written.
func (d *Differ) Apply(ctx context.Context, desc ocispec.Descriptor, mounts []mount.Mount, opts ...diff.ApplyOpt) (ocispec.Descriptor, error) {
	var config diff.ApplyConfig
	for _, o := range opts {
		if err := o(ctx, desc, &config); err != nil {
			return ocispec.Descriptor{}, fmt.Errorf("failed to apply config opt: %w", err)
		}
	}
	ctx = log.WithLogger(ctx, log.G(ctx).WithField("digest", desc.Digest))
	var owner LayerWriter
	for _, lw := range d.layers {
		if lw.Owns(mounts) {
			owner = lw
			break
		}
	}
	if owner == nil {
		// Not a Caisson snapshot: the diff service's next differ's business.
		return ocispec.Descriptor{}, fmt.Errorf("%s applies only to Caisson snapshots: %w", Name, errdefs.ErrNotImplemented)
	}
	// As containerd's EROFS differ: read-only mounts are a snapshot whose
	// layer is already there (Mounts after an apply); applying again would
	// write to content this differ does not own.
	if len(mounts) > 0 && mounts[len(mounts)-1].ReadOnly() {
		return ocispec.Descriptor{}, fmt.Errorf("cannot apply to a read-only snapshot, its content is already populated: %w", errdefs.ErrFailedPrecondition)
	}
	var why error
	if _, err := images.DiffCompression(ctx, desc.MediaType); err != nil {
		why = fmt.Errorf("media type %s: %w", desc.MediaType, errdefs.ErrNotImplemented)
	} else {
		start := time.Now()
		var applied ocispec.Descriptor
		err := owner.WriteLayer(ctx, mounts, config.SyncFs, func(ctx context.Context, f *os.File, dir string) (err error) {
			applied, err = d.convert(ctx, desc, config, f, dir)
			return err
		})
		if err == nil {
			log.G(ctx).WithField("d", time.Since(start)).WithField("differ", Name).Debug("diff applied as an EROFS layer")
			return applied, nil
		}
		if !errdefs.IsNotImplemented(err) {
			return ocispec.Descriptor{}, err
		}
		why = err
	}
	if d.fallback == nil {
		return ocispec.Descriptor{}, why
	}
	log.G(ctx).WithError(why).Info("caisson-diff: applying the layer with containerd's differ")
	return d.fallback.Apply(ctx, desc, mounts, opts...)
}

// convert decompresses desc and writes it as an EROFS image into f.
func (d *Differ) convert(ctx context.Context, desc ocispec.Descriptor, config diff.ApplyConfig, f *os.File, dir string) (ocispec.Descriptor, error) {
	ra, err := d.store.ReaderAt(ctx, desc)
	if err != nil {
		return ocispec.Descriptor{}, fmt.Errorf("failed to get reader from content store: %w", err)
	}
	defer ra.Close()
	processor := diff.NewProcessorChain(desc.MediaType, content.NewReader(ra))
	for {
		if processor, err = diff.GetProcessor(ctx, processor, config.ProcessorPayloads); err != nil {
			return ocispec.Descriptor{}, fmt.Errorf("failed to get stream processor for %s: %w", desc.MediaType, err)
		}
		if processor.MediaType() == ocispec.MediaTypeImageLayer {
			break
		}
	}
	defer processor.Close()
	digester := digest.Canonical.Digester()
	rc := &countingReader{r: io.TeeReader(processor, digester.Hash())}
	if err := tarerofs.Write(ctx, rc, f, tarerofs.Options{TempDir: dir, Limits: d.limits}); err != nil {
		return ocispec.Descriptor{}, err
	}
	// Whatever follows the end-of-archive marker is part of the diff id too.
	if _, err := io.Copy(io.Discard, rc); err != nil {
		return ocispec.Descriptor{}, err
	}
	return ocispec.Descriptor{MediaType: ocispec.MediaTypeImageLayer, Size: rc.n, Digest: digester.Digest()}, nil
}

// Compare hands to the comparer.
func (d *Differ) Compare(ctx context.Context, lower, upper []mount.Mount, opts ...diff.Opt) (ocispec.Descriptor, error) {
	if d.comparer == nil {
		return ocispec.Descriptor{}, fmt.Errorf("compare: %w", errdefs.ErrNotImplemented)
	}
	return d.comparer.Compare(ctx, lower, upper, opts...)
}

type countingReader struct {
	r io.Reader
	n int64
}

func (c *countingReader) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	c.n += int64(n)
	return n, err
}
