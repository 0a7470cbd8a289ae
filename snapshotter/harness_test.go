package snapshotter

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"testing"

	"github.com/containerd/containerd/v2/core/content"
	"github.com/containerd/containerd/v2/core/diff"
	"github.com/containerd/containerd/v2/core/diff/apply"
	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/core/mount/manager"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/core/snapshots/storage"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/containerd/v2/plugins/content/local"
	"github.com/containerd/errdefs"
	"github.com/containerd/log/logtest"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	bolt "go.etcd.io/bbolt"

	"github.com/caisson-containers/caisson/snapshotter/config"
	"github.com/caisson-containers/caisson/snapshotter/differ"
)

// harness unpacks layer tars into a snapshotter the way containerd does: the
// content store holds the tar, the differ applies it to the active snapshot's
// mounts, then the snapshot is committed. The differ is Caisson's (package
// differ: the tar written straight into the layer image) once newSnapshotter has
// opened a snapshotter, with containerd's as its fallback; walking is containerd's
// differ alone (core/diff/apply), which activates the mounts through the mount
// manager (core/mount/manager) and untars into the overlay's upperdir.
type harness struct {
	t       testing.TB
	ctx     context.Context
	dir     string
	mm      mount.Manager
	cs      content.Store
	applier diff.Applier
	walking diff.Applier
	// fast lists the snapshots (active keys) Caisson's differ wrote itself,
	// without falling back.
	fast map[string]bool
}

// recorder notes which snapshots the differ wrote through WriteLayer.
type recorder struct {
	h  *harness
	sn *Snapshotter
}

func (r recorder) Owns(mounts []mount.Mount) bool { return r.sn.Owns(mounts) }

func (r recorder) WriteLayer(ctx context.Context, mounts []mount.Mount, sync bool, write LayerWriteFunc) error {
	err := r.sn.WriteLayer(ctx, mounts, sync, write)
	if err == nil {
		if id, ok := r.sn.activeID(mounts); ok {
			r.h.fast[id] = true
		}
	}
	return err
}

// applied reports whether Caisson's differ wrote the committed or active
// snapshot key's layer itself.
func (h *harness) applied(sn *Snapshotter, key string) bool {
	return h.fast[h.idOf(sn, key)]
}

func newHarness(t testing.TB, dir string) *harness {
	t.Helper()
	ctx := namespaces.WithNamespace(context.Background(), "caisson-test")
	if tt, ok := t.(*testing.T); ok {
		ctx = logtest.WithT(ctx, tt)
	}
	for _, d := range []string{"mm/t", "content"} {
		if err := os.MkdirAll(filepath.Join(dir, d), 0o700); err != nil {
			t.Fatal(err)
		}
	}
	db, err := bolt.Open(filepath.Join(dir, "mm", "mounts.db"), 0o600, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	mm, err := manager.NewManager(db, filepath.Join(dir, "mm", "t"), manager.WithAllowedRoot(dir))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { mm.(io.Closer).Close() })
	cs, err := local.NewStore(filepath.Join(dir, "content"))
	if err != nil {
		t.Fatal(err)
	}
	walking := apply.NewFileSystemApplierWithMountManager(cs, mm)
	return &harness{t: t, ctx: ctx, dir: dir, mm: mm, cs: cs, applier: walking, walking: walking, fast: map[string]bool{}}
}

// newSnapshotter opens a snapshotter rooted in h's directory (so the mount
// manager may create its writable images), adjusting the suite config with edit.
func (h *harness) newSnapshotter(edit func(*config.Config)) *Snapshotter {
	h.t.Helper()
	c := config.Default()
	c.Root = filepath.Join(h.dir, "root")
	c.DefaultWritableSize = "256MiB"
	c.OverlayOptions = []string{"redirect_dir=on"}
	if edit != nil {
		edit(&c)
	}
	r, err := c.Resolve()
	if err != nil {
		h.t.Fatal(err)
	}
	s, err := New(h.ctx, r)
	if err != nil {
		h.t.Fatal(err)
	}
	h.t.Cleanup(func() { s.Close() })
	h.applier = differ.New(h.cs, []differ.LayerWriter{recorder{h, s}}, h.walking, nil)
	return s
}

// addBlob stores an uncompressed layer tar in the content store.
func (h *harness) addBlob(tarData []byte) ocispec.Descriptor {
	h.t.Helper()
	desc := ocispec.Descriptor{MediaType: ocispec.MediaTypeImageLayer, Digest: digest.FromBytes(tarData), Size: int64(len(tarData))}
	if err := content.WriteBlob(h.ctx, h.cs, desc.Digest.String(), bytes.NewReader(tarData), desc); err != nil {
		h.t.Fatal(err)
	}
	return desc
}

// unpack applies desc onto a new active snapshot of parent and commits it as
// name, like containerd's unpacker. On an apply error the active snapshot is
// removed and the error returned.
func (h *harness) unpack(sn snapshots.Snapshotter, name, parent string, desc ocispec.Descriptor) error {
	return h.unpackDiffID(sn, name, parent, desc, desc.Digest)
}

// unpackDiffID is unpack with the layer's expected uncompressed digest (its diff
// id), which the unpacker checks against what the differ read.
func (h *harness) unpackDiffID(sn snapshots.Snapshotter, name, parent string, desc ocispec.Descriptor, diffID digest.Digest) error {
	return h.unpackWith(h.applier, sn, name, parent, desc, diffID)
}

// unpackWith is unpackDiffID through the differ a.
func (h *harness) unpackWith(a diff.Applier, sn snapshots.Snapshotter, name, parent string, desc ocispec.Descriptor, diffID digest.Digest) error {
	key := "extract-" + name
	mounts, err := sn.Prepare(h.ctx, key, parent)
	if err != nil {
		return fmt.Errorf("prepare: %w", err)
	}
	applied, err := a.Apply(h.ctx, desc, mounts)
	if err == nil && applied.Digest != diffID {
		err = fmt.Errorf("wrong diff id %s, want %s", applied.Digest, diffID)
	}
	if err != nil {
		if rerr := sn.Remove(h.ctx, key); rerr != nil {
			h.t.Errorf("remove %s: %v", key, rerr)
		}
		return fmt.Errorf("apply: %w", err)
	}
	if err := sn.Commit(h.ctx, name, key); err != nil {
		return fmt.Errorf("commit: %w", err)
	}
	return nil
}

// withMounted activates mounts (through the mount manager when they need it),
// mounts the result on a temporary directory, runs fn on it, and undoes it all.
func (h *harness) withMounted(mounts []mount.Mount, fn func(root string)) {
	h.t.Helper()
	target, err := os.MkdirTemp(h.dir, "view-")
	if err != nil {
		h.t.Fatal(err)
	}
	defer os.Remove(target)
	name := filepath.Base(target)
	system := mounts
	if ai, err := h.mm.Activate(h.ctx, name, mounts); err == nil {
		system = ai.System
		defer func() {
			if err := h.mm.Deactivate(h.ctx, name); err != nil {
				h.t.Errorf("deactivate: %v", err)
			}
		}()
	} else if !isNotImplemented(err) {
		h.t.Fatalf("activate: %v", err)
	}
	if err := mount.All(system, target); err != nil {
		h.t.Fatalf("mount: %v", err)
	}
	defer func() {
		if err := mount.UnmountAll(target, 0); err != nil {
			h.t.Errorf("unmount: %v", err)
		}
	}()
	fn(target)
}

// withView runs fn on a read-only view of the committed snapshot parent.
func (h *harness) withView(sn snapshots.Snapshotter, parent string, fn func(root string)) {
	h.t.Helper()
	key := "view-" + parent
	mounts, err := sn.View(h.ctx, key, parent)
	if err != nil {
		h.t.Fatal(err)
	}
	defer func() {
		if err := sn.Remove(h.ctx, key); err != nil {
			h.t.Errorf("remove view: %v", err)
		}
	}()
	h.withMounted(mounts, fn)
}

// withLayerImage mounts the committed snapshot name's own layer image alone (not
// merged with its parents), as the shim's agent mounts one layer.
func (h *harness) withLayerImage(sn *Snapshotter, name string, fn func(root string)) {
	h.t.Helper()
	m := mount.Mount{Type: "erofs", Source: sn.layerPath(h.idOf(sn, name)), Options: []string{"ro", "loop"}}
	h.withMounted([]mount.Mount{m}, fn)
}

func isNotImplemented(err error) bool {
	return errdefs.IsNotImplemented(err)
}

// idOf is the storage id of the snapshot key.
func (h *harness) idOf(sn *Snapshotter, key string) string {
	h.t.Helper()
	var id string
	if err := sn.ms.WithTransaction(h.ctx, false, func(ctx context.Context) (err error) {
		id, _, _, err = storage.GetInfo(ctx, key)
		return err
	}); err != nil {
		h.t.Fatal(err)
	}
	return id
}
