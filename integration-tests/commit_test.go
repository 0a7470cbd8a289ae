package integration

import (
	"archive/tar"
	"bytes"
	"context"
	"errors"
	"io"
	"strings"
	"testing"
	"time"

	containerd "github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/core/content"
	"github.com/containerd/containerd/v2/core/diff"
	"github.com/containerd/containerd/v2/pkg/archive/compression"
	"github.com/containerd/containerd/v2/pkg/oci"
	"github.com/containerd/containerd/v2/pkg/rootfs"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/caisson-containers/caisson/integration-tests/harness"
)

// commitWrites is what the container writes: every kind of entry an overlay
// upper directory holds, a deleted file (a whiteout) and a replaced directory (an
// opaque one).
const commitWrites = `set -e
echo hello > /new
chmod 4755 /new
mkdir -p /d/e
echo deep > /d/e/f
ln -s /new /d/link
ln /new /hard
mkfifo /fifo
mknod /cdev c 1 3
rm /bin/ls
rm -r /etc
mkdir /etc
echo only > /etc/only
dd if=/dev/zero of=/big bs=1024 count=300 2>/dev/null
echo tail >> /big
`

// commitCheck lists what a container over the committed layer sees of it.
const commitCheck = `cd /
for p in new hard d d/e d/e/f d/link fifo cdev etc etc/only etc/passwd bin/ls big; do
  if [ -d $p ]; then
    # A directory's size is its file system's business (EROFS or overlayfs on ext4).
    stat -c '%n %F %a %u %g %h' $p
  else
    stat -c '%n %F %a %u %g %s %h %t %T %N' $p 2>&1 || true
  fi
done
cat new d/e/f etc/only
md5sum big
`

// A container's writes are committed to a layer and diffed, as nerdctl commit and
// ctr snapshots diff do, with runc on overlayfs as the control: the diff holds
// them, and a container over the committed layer sees what runc's sees. For
// Caisson the writes are in an ext4 image the guest wrote, which the snapshotter
// reads without mounting it (docs/mounts.md, "Commit", "Diff").
func TestCommitContainerWrites(t *testing.T) {
	e := harness.Start(t, harness.Options{})
	image := e.ImportBusybox(t)
	// A lease, as nerdctl commit takes one: the diff, the committed snapshot
	// and the one prepared over it are referenced by nothing else until the
	// checking container is, and containerd's garbage collector runs after
	// every deletion.
	ctx, done, err := e.Client.WithLease(e.Context(t))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { done(context.WithoutCancel(ctx)) })
	if err := image.Unpack(ctx, runcControl.snapshotter); err != nil {
		t.Fatalf("unpack into %s for runc: %v", runcControl.snapshotter, err)
	}
	seen := map[string]string{}
	for _, rt := range []testRuntime{runcControl, caissonRuntime} {
		t.Run(rt.name, func(t *testing.T) {
			id := "commit-" + rt.name
			c := newContainerOn(t, e, image, rt, id, oci.WithProcessArgs("sh", "-c", commitWrites))
			var o outputs
			task, exit := startTask(t, ctx, c, &o)
			select {
			case st := <-exit:
				if st.ExitCode() != 0 {
					t.Fatalf("the writes failed (exit %d): %s%s", st.ExitCode(), o.stdout.String(), o.stderr.String())
				}
			case <-time.After(5 * time.Minute):
				t.Fatal("the writing container did not exit")
			}
			if _, err := task.Delete(ctx); err != nil {
				t.Fatal(err)
			}

			sn := e.Client.SnapshotService(rt.snapshotter)
			key := id + "-rootfs"
			desc, err := rootfs.CreateDiff(ctx, key, sn, e.Client.DiffService(), diff.WithMediaType(ocispec.MediaTypeImageLayerGzip))
			if err != nil {
				t.Fatalf("diff of the container's snapshot: %v", err)
			}
			entries := layerEntries(t, ctx, e.Client.ContentStore(), desc)
			want := []string{"new", "hard", "d/", "d/e/", "d/e/f", "d/link", "fifo", "cdev", "bin/.wh.ls", "etc/", "etc/only", "big"}
			if rt == caissonRuntime {
				// The overlay upper directory's opaque marker, as containerd's
				// overlay diff writes it (runc's walking diff lists the deletions).
				want = append(want, "etc/.wh..wh..opq")
			}
			for _, w := range want {
				if _, ok := entries[w]; !ok {
					t.Errorf("the diff lacks %s; it holds %v", w, keys(entries))
				}
			}
			if h := entries["hard"]; h.Typeflag != tar.TypeLink && entries["new"].Typeflag != tar.TypeLink {
				t.Errorf("new and hard are not one file in the diff")
			}
			if h := entries["d/link"]; h.Typeflag != tar.TypeSymlink || h.Linkname != "/new" {
				t.Errorf("d/link in the diff: %+v", h)
			}
			if h := entries["cdev"]; h.Typeflag != tar.TypeChar || h.Devmajor != 1 || h.Devminor != 3 {
				t.Errorf("cdev in the diff: %+v", h)
			}

			committed := id + "-committed"
			if err := sn.Commit(ctx, committed, key); err != nil {
				t.Fatalf("commit: %v", err)
			}
			t.Cleanup(func() { sn.Remove(context.WithoutCancel(ctx), committed) })
			check := id + "-check"
			if _, err := sn.Prepare(ctx, check+"-rootfs", committed); err != nil {
				t.Fatal(err)
			}
			cc, err := e.Client.NewContainer(ctx, check,
				containerd.WithSnapshotter(rt.snapshotter),
				containerd.WithSnapshot(check+"-rootfs"),
				containerd.WithRuntime(rt.runtime, nil),
				containerd.WithNewSpec(oci.WithImageConfig(image), oci.WithProcessArgs("sh", "-c", commitCheck)))
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { cc.Delete(context.WithoutCancel(ctx), containerd.WithSnapshotCleanup) })
			var co outputs
			ctask, cexit := startTask(t, ctx, cc, &co)
			select {
			case st := <-cexit:
				if st.ExitCode() != 0 {
					t.Fatalf("the check failed (exit %d): %s%s", st.ExitCode(), co.stdout.String(), co.stderr.String())
				}
			case <-time.After(5 * time.Minute):
				t.Fatal("the checking container did not exit")
			}
			ctask.Delete(ctx)
			got := co.stdout.String()
			t.Logf("over the committed layer:\n%s", got)
			for _, w := range []string{"hello\ndeep\nonly\n", "'d/link' -> '/new'", "new regular file 4755 0 0 6 2"} {
				if !strings.Contains(got, w) {
					t.Errorf("over the committed layer, want %q", w)
				}
			}
			seen[rt.name] = got
		})
	}
	if seen["runc"] != "" && seen["caisson"] != seen["runc"] {
		t.Errorf("over the committed layer, caisson's container sees\n%s\nrunc's sees\n%s", seen["caisson"], seen["runc"])
	}
}

// layerEntries reads the layer desc from the content store into its tar headers by name.
func layerEntries(t *testing.T, ctx context.Context, cs content.Store, desc ocispec.Descriptor) map[string]*tar.Header {
	t.Helper()
	blob, err := content.ReadBlob(ctx, cs, desc)
	if err != nil {
		t.Fatal(err)
	}
	r, err := compression.DecompressStream(bytes.NewReader(blob))
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	out := map[string]*tar.Header{}
	tr := tar.NewReader(r)
	for {
		h, err := tr.Next()
		if errors.Is(err, io.EOF) {
			return out
		}
		if err != nil {
			t.Fatal(err)
		}
		out[h.Name] = h
	}
}

func keys(m map[string]*tar.Header) []string {
	var ks []string
	for k := range m {
		ks = append(ks, k)
	}
	return ks
}
