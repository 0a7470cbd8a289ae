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
// Comparing an active Caisson snapshot reads its writable image in userspace
// (DiffWriter, package ext4read), never mounting it; other mounts are left to a
// comparer (containerd's walking differ).
package differ

import (
	"context"
	"crypto/rand"
	"encoding/base64"
	"fmt"
	"io"
	"os"
	"time"

	"github.com/containerd/containerd/v2/core/content"
	"github.com/containerd/containerd/v2/core/diff"
	"github.com/containerd/containerd/v2/core/images"
	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/pkg/archive/compression"
	"github.com/containerd/containerd/v2/pkg/epoch"
	"github.com/containerd/containerd/v2/pkg/labels"
	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/caisson-containers/caisson/snapshotter/ext4read"
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

// DiffWriter is what the differ needs of a snapshotter to compare without
// mounting (*snapshotter.Snapshotter): WriteDiff writes the uncompressed OCI diff
// of the active snapshot whose mounts are mounts, or returns
// errdefs.ErrNotImplemented, before writing anything, for mounts it does not read
// that way.
type DiffWriter interface {
	WriteDiff(ctx context.Context, mounts []mount.Mount, w io.Writer, opts ext4read.TarOptions) error
}

// Compare computes the diff of upper over lower. An active Caisson snapshot
// (upper) is read by its snapshotter's DiffWriter: its writable image is a
// guest's file system, which is never mounted on the host; the upper directory
// of an overlay already is the diff, so lower is not read. Everything else goes
// to the comparer.
func (d *Differ) Compare(ctx context.Context, lower, upper []mount.Mount, opts ...diff.Opt) (ocispec.Descriptor, error) {
	for _, lw := range d.layers {
		dw, ok := lw.(DiffWriter)
		if !ok || !lw.Owns(upper) {
			continue
		}
		desc, err := d.compare(ctx, dw, upper, opts...)
		if !errdefs.IsNotImplemented(err) {
			return desc, err
		}
		log.G(ctx).WithError(err).Debug("caisson-diff: comparing with containerd's differ")
	}
	if d.comparer == nil {
		return ocispec.Descriptor{}, fmt.Errorf("compare: %w", errdefs.ErrNotImplemented)
	}
	return d.comparer.Compare(ctx, lower, upper, opts...)
}

// compare writes dw's diff of upper into the content store, compressed as the
// options ask, as containerd's differs do (plugins/diff/erofs, walking).
func (d *Differ) compare(ctx context.Context, dw DiffWriter, upper []mount.Mount, opts ...diff.Opt) (_ ocispec.Descriptor, retErr error) {
	var config diff.Config
	for _, o := range opts {
		if err := o(&config); err != nil {
			return ocispec.Descriptor{}, err
		}
	}
	if tm := epoch.FromContext(ctx); tm != nil && config.SourceDateEpoch == nil {
		config.SourceDateEpoch = tm
	}
	compressionType := compression.Uncompressed
	if config.Compressor != nil {
		if config.MediaType == "" {
			return ocispec.Descriptor{}, fmt.Errorf("media type must be explicitly specified when using custom compressor: %w", errdefs.ErrInvalidArgument)
		}
	} else {
		if config.MediaType == "" {
			config.MediaType = ocispec.MediaTypeImageLayerGzip
		}
		switch config.MediaType {
		case ocispec.MediaTypeImageLayer:
		case ocispec.MediaTypeImageLayerGzip:
			compressionType = compression.Gzip
		case ocispec.MediaTypeImageLayerZstd:
			compressionType = compression.Zstd
		default:
			return ocispec.Descriptor{}, fmt.Errorf("unsupported diff media type: %v: %w", config.MediaType, errdefs.ErrNotImplemented)
		}
	}
	topts := ext4read.TarOptions{Format: ext4read.FormatOCI, MaxModTime: config.SourceDateEpoch}

	// Nothing is written to the content store for mounts dw does not take.
	probe := &lazyWriter{}
	newRef := config.Reference == ""
	if newRef {
		config.Reference = uniqueRef()
	}
	var cw content.Writer
	defer func() {
		if cw != nil && retErr != nil {
			cw.Close()
			if newRef {
				if err := d.store.Abort(ctx, config.Reference); err != nil {
					log.G(ctx).WithError(err).WithField("ref", config.Reference).Warn("failed to delete diff upload")
				}
			}
		}
	}()
	var (
		dgstr      = digest.SHA256.Digester()
		compressed io.WriteCloser
	)
	probe.open = func() (io.Writer, error) {
		var err error
		cw, err = d.store.Writer(ctx, content.WithRef(config.Reference), content.WithDescriptor(ocispec.Descriptor{MediaType: config.MediaType}))
		if err != nil {
			return nil, fmt.Errorf("failed to open writer: %w", err)
		}
		if !newRef {
			if err := cw.Truncate(0); err != nil {
				return nil, err
			}
		}
		switch {
		case config.Compressor != nil:
			compressed, err = config.Compressor(cw, config.MediaType)
		case compressionType != compression.Uncompressed:
			compressed, err = compression.CompressStream(cw, compressionType)
		default:
			return io.MultiWriter(cw, dgstr.Hash()), nil
		}
		if err != nil {
			return nil, fmt.Errorf("failed to get compressed stream: %w", err)
		}
		return io.MultiWriter(compressed, dgstr.Hash()), nil
	}
	if err := dw.WriteDiff(ctx, upper, probe, topts); err != nil {
		if compressed != nil {
			compressed.Close()
		}
		return ocispec.Descriptor{}, err
	}
	if cw == nil {
		// WriteDiff always writes a tar (at least its end marker).
		return ocispec.Descriptor{}, fmt.Errorf("diff wrote nothing")
	}
	if compressed != nil {
		if err := compressed.Close(); err != nil {
			return ocispec.Descriptor{}, fmt.Errorf("failed to write compressed diff: %w", err)
		}
	}
	if config.Labels == nil {
		config.Labels = map[string]string{}
	}
	config.Labels[labels.LabelUncompressed] = dgstr.Digest().String()
	dgst := cw.Digest()
	if err := cw.Commit(ctx, 0, dgst, content.WithLabels(config.Labels)); err != nil && !errdefs.IsAlreadyExists(err) {
		return ocispec.Descriptor{}, fmt.Errorf("failed to commit: %w", err)
	}
	cw.Close()
	cw = nil
	info, err := d.store.Info(ctx, dgst)
	if err != nil {
		return ocispec.Descriptor{}, fmt.Errorf("failed to get info from content store: %w", err)
	}
	if _, ok := info.Labels[labels.LabelUncompressed]; !ok {
		if info.Labels == nil {
			info.Labels = map[string]string{}
		}
		info.Labels[labels.LabelUncompressed] = config.Labels[labels.LabelUncompressed]
		if _, err := d.store.Update(ctx, info, "labels."+labels.LabelUncompressed); err != nil {
			return ocispec.Descriptor{}, fmt.Errorf("error setting uncompressed label: %w", err)
		}
	}
	return ocispec.Descriptor{MediaType: config.MediaType, Size: info.Size, Digest: info.Digest}, nil
}

// lazyWriter opens its destination at the first write.
type lazyWriter struct {
	open func() (io.Writer, error)
	w    io.Writer
}

func (l *lazyWriter) Write(p []byte) (int, error) {
	if l.w == nil {
		w, err := l.open()
		if err != nil {
			return 0, err
		}
		l.w = w
	}
	return l.w.Write(p)
}

func uniqueRef() string {
	var b [3]byte
	rand.Read(b[:]) // a failure only makes the name less unique
	return fmt.Sprintf("%d-%s", time.Now().UnixNano(), base64.URLEncoding.EncodeToString(b[:]))
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
