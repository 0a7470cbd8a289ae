package snapshotter

import (
	"archive/tar"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/core/content"
	"github.com/containerd/containerd/v2/core/diff"
	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/pkg/archive"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/containerd/v2/plugins/content/local"
	"github.com/containerd/containerd/v2/plugins/diff/walking"
	"github.com/containerd/continuity/fs"
	"github.com/containerd/errdefs"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"golang.org/x/sys/unix"

	"github.com/caisson-containers/caisson/snapshotter/config"
	"github.com/caisson-containers/caisson/snapshotter/differ"
	"github.com/caisson-containers/caisson/snapshotter/ext4read"
	"github.com/caisson-containers/caisson/snapshotter/ext4read/ext4test"
	"github.com/caisson-containers/caisson/snapshotter/layer"
)

// childEnv carries a guestChild job to the test binary re-run in a mount
// namespace without loop devices.
const childEnv = "CAISSON_TEST_GUEST_IMAGE_CHILD"

// guestChild is what the child does: diff the active snapshot Key over Parent
// into the content store at Content, then commit it as Name.
type guestChild struct {
	Config  config.Resolved
	Content string
	Parent  string
	Key     string
	Name    string
	Result  string // file the child writes the diff's digest to
}

// TestGuestImageChild is the child half of TestCommitAndDiffOfGuestImage: it
// runs only when that test starts it.
func TestGuestImageChild(t *testing.T) {
	raw := os.Getenv(childEnv)
	if raw == "" {
		t.Skip("run by TestCommitAndDiffOfGuestImage")
	}
	var job guestChild
	if err := json.Unmarshal([]byte(raw), &job); err != nil {
		t.Fatal(err)
	}
	// No loop device can be set up here: any attempt to mount an image fails.
	if err := mount.All([]mount.Mount{{Type: "tmpfs", Source: "tmpfs", Options: []string{"mode=0755"}}}, "/dev"); err != nil {
		t.Fatal(err)
	}
	// /dev/null, which exec needs (mkfs); no loop device.
	if err := unix.Mknod("/dev/null", unix.S_IFCHR|0o666, int(unix.Mkdev(1, 3))); err != nil {
		t.Fatal(err)
	}
	before, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	ctx := namespaces.WithNamespace(context.Background(), "caisson-test")
	sn, err := New(ctx, job.Config)
	if err != nil {
		t.Fatal(err)
	}
	defer sn.Close()
	cs, err := local.NewLabeledStore(job.Content, memLabels{})
	if err != nil {
		t.Fatal(err)
	}
	d := differ.New(cs, []differ.LayerWriter{sn}, nil, walking.NewWalkingDiff(cs))
	lower, err := sn.View(ctx, "lower-view", job.Parent)
	if err != nil {
		t.Fatal(err)
	}
	upper, err := sn.Mounts(ctx, job.Key)
	if err != nil {
		t.Fatal(err)
	}
	desc, err := d.Compare(ctx, lower, upper, diff.WithMediaType(ocispec.MediaTypeImageLayer))
	if err != nil {
		t.Fatalf("compare: %v", err)
	}
	if err := sn.Remove(ctx, "lower-view"); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(job.Result, []byte(desc.Digest), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := sn.Commit(ctx, job.Name, job.Key); err != nil {
		t.Fatalf("commit: %v", err)
	}
	after, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	// Mounts of other processes may come and go (a deleted mount point
	// leaves every namespace), but none may appear here.
	had := map[string]bool{}
	for _, l := range strings.Split(string(before), "\n") {
		had[l] = true
	}
	for _, l := range strings.Split(string(after), "\n") {
		if !had[l] {
			t.Errorf("a mount appeared during diff and commit: %s", l)
		}
	}
}

// TestCommitAndDiffOfGuestImage: a writable image a guest wrote (every kind of
// entry an overlay upper directory holds, written by a kernel) is committed and
// diffed without any mount — in a mount namespace where no loop device can be set
// up, which fails on code that mounts it — and the results hold what today's
// mount-based paths made of it: the layer what mkfs.erofs built from the mounted
// upper directory, the diff what containerd's overlay diff (as its EROFS differ
// runs it) wrote of the mounted directory.
func TestCommitAndDiffOfGuestImage(t *testing.T) {
	requireHost(t)
	ext4test.NeedRoot(t)
	if _, err := exec.LookPath("unshare"); err != nil {
		t.Skip("needs unshare(1)")
	}
	for _, tc := range []struct {
		name   string
		fsType string
		fill   ext4test.Fill
		// staged: the layer is built from a tree containerd's archive code
		// unpacked (commit.go, buildStaged), which dates nothing before 1970.
		staged bool
	}{
		{"erofs", config.LayerEROFS, ext4test.Fill{}, false},
		{"erofs with an ACL", config.LayerEROFS, ext4test.Fill{ACL: true}, true},
		{"ext4", config.LayerExt4, ext4test.Fill{ACL: true}, true},
	} {
		fsType := tc.fsType
		t.Run(tc.name, func(t *testing.T) {
			h := newHarness(t, t.TempDir())
			sn := h.newSnapshotter(func(c *config.Config) { c.LayerFilesystem = fsType })
			// The parent holds what the guest's whiteouts and opaque directory hide,
			// so that containerd's diff writes them as deletions.
			base := []layerEntry{dirE("dir", 0o755, 0, 0), fileE("whiteout", "x", 0o644, 0, 0), fileE("dir/whiteout2", "y", 0o644, 0, 0),
				dirE("opaque", 0o755, 0, 0), fileE("opaque/hidden", "z", 0o644, 0, 0)}
			if err := h.unpack(sn, "base", "", h.addBlob(buildTar(t, base))); err != nil {
				t.Fatal(err)
			}
			mounts, err := sn.Prepare(h.ctx, "ctr", "base")
			if err != nil {
				t.Fatal(err)
			}
			rw := mounts[0].Source
			ext4test.WritableImage(t, rw, 1<<30, nil, func(root string) { ext4test.FillUpper(t, root, tc.fill) })

			// Today's results, through the kernel.
			refDir := t.TempDir()
			refLayer := filepath.Join(refDir, "layer")
			var refTar bytes.Buffer
			pre1970 := map[string]bool{}
			ext4test.WithMounted(t, rw, "ext4", func(root string) {
				for _, r := range ext4test.HostRecords(t, filepath.Join(root, "upper")) {
					pre1970[r.Path] = r.Mtime.Before(time.Unix(0, 0))
				}
				if err := (layer.Builder{FS: fsType}).Build(h.ctx, filepath.Join(root, "upper"), refLayer); err != nil {
					t.Fatal(err)
				}
				h.withView(sn, "base", func(lower string) {
					cw := archive.NewChangeWriter(&refTar, filepath.Join(root, "upper"))
					if err := fs.DiffDirChanges(h.ctx, lower, filepath.Join(root, "upper"), fs.DiffSourceOverlayFS, cw.HandleChange); err != nil {
						t.Fatal(err)
					}
					if err := cw.Close(); err != nil {
						t.Fatal(err)
					}
				})
			})

			cfg := sn.cfg
			if err := sn.Close(); err != nil {
				t.Fatal(err)
			}
			job := guestChild{Config: cfg, Content: filepath.Join(h.dir, "content"), Parent: "base", Key: "ctr", Name: "committed",
				Result: filepath.Join(refDir, "digest")}
			raw, _ := json.Marshal(job)
			cmd := exec.Command("unshare", "--mount", "--propagation", "private", os.Args[0], "-test.run", "^TestGuestImageChild$", "-test.v", "-test.count=1")
			cmd.Env = append(os.Environ(), childEnv+"="+string(raw))
			out, err := cmd.CombinedOutput()
			if err != nil || !strings.Contains(string(out), "--- PASS: TestGuestImageChild") {
				t.Fatalf("diff and commit without mounts: %v\n%s", err, out)
			}

			sn, err = New(h.ctx, cfg)
			if err != nil {
				t.Fatal(err)
			}
			defer sn.Close()
			if _, err := os.Stat(rw); !os.IsNotExist(err) {
				t.Errorf("the writable image is still there after the commit: %v", err)
			}
			ext4test.WithMounted(t, refLayer, sn.builder.MountType(), func(ref string) {
				ext4test.WithMounted(t, sn.layerPath(h.idOf(sn, "committed")), sn.builder.MountType(), func(got string) {
					want := distinctWhiteouts(ext4test.HostRecords(t, ref))
					if tc.staged {
						for i := range want {
							if pre1970[want[i].Path] {
								want[i].Mtime = time.Unix(0, 0).UTC()
							}
						}
					}
					ext4test.CompareRecords(t, want, distinctWhiteouts(ext4test.HostRecords(t, got)))
				})
			})

			dgst, err := os.ReadFile(job.Result)
			if err != nil {
				t.Fatal(err)
			}
			blob, err := content.ReadBlob(h.ctx, h.cs, ocispec.Descriptor{Digest: digest.Digest(dgst)})
			if err != nil {
				t.Fatal(err)
			}
			compareTars(t, refTar.Bytes(), blob)
		})
	}
}

// memLabels is a label store in memory, so that the child's content store keeps
// labels as containerd's metadata store does.
type memLabels map[digest.Digest]map[string]string

func (m memLabels) Get(d digest.Digest) (map[string]string, error) { return m[d], nil }

func (m memLabels) Set(d digest.Digest, l map[string]string) error {
	m[d] = l
	return nil
}

func (m memLabels) Update(d digest.Digest, u map[string]string) (map[string]string, error) {
	l := m[d]
	if l == nil {
		l = map[string]string{}
	}
	for k, v := range u {
		if v == "" {
			delete(l, k)
		} else {
			l[k] = v
		}
	}
	m[d] = l
	return l, nil
}

// distinctWhiteouts gives every whiteout an inode of its own: overlayfs links
// whiteouts to one shared inode, a layer writes each alone (a layer tar may not
// hardlink whiteouts), and both mean the same to overlayfs.
func distinctWhiteouts(rs []ext4test.Record) []ext4test.Record {
	for i, r := range rs {
		if r.Mode&unix.S_IFMT == unix.S_IFCHR && r.Major == 0 && r.Minor == 0 {
			rs[i].Ino = 1<<40 + uint64(i)
		}
	}
	return rs
}

// tarEntry is what compareTars compares of one tar entry.
type tarEntry struct {
	Type         byte
	Mode         int64
	UID, GID     int
	ModTime      int64
	Link         string
	Major, Minor int64
	Size         int64
	Data         string
	Xattrs       string
}

// tarEntries reads a tar into its entries by name; a name written twice (a
// parent directory containerd writes again) keeps its last header.
func tarEntries(t *testing.T, b []byte) map[string]tarEntry {
	t.Helper()
	out := map[string]tarEntry{}
	tr := tar.NewReader(bytes.NewReader(b))
	for {
		hdr, err := tr.Next()
		if err == io.EOF {
			return out
		}
		if err != nil {
			t.Fatal(err)
		}
		data, err := io.ReadAll(tr)
		if err != nil {
			t.Fatal(err)
		}
		var xs []string
		for k, v := range hdr.PAXRecords {
			if strings.HasPrefix(k, "SCHILY.xattr.") {
				xs = append(xs, fmt.Sprintf("%s=%x", k, v))
			}
		}
		sort.Strings(xs)
		out[hdr.Name] = tarEntry{Type: hdr.Typeflag, Mode: hdr.Mode, UID: hdr.Uid, GID: hdr.Gid, ModTime: hdr.ModTime.Unix(),
			Link: hdr.Linkname, Major: hdr.Devmajor, Minor: hdr.Devminor, Size: hdr.Size,
			Data: fmt.Sprintf("%x", sha256.Sum256(data)), Xattrs: strings.Join(xs, ",")}
	}
}

func compareTars(t *testing.T, want, got []byte) {
	t.Helper()
	w, g := tarEntries(t, want), tarEntries(t, got)
	for name, we := range w {
		if ge, ok := g[name]; !ok {
			t.Errorf("diff: %s missing", name)
		} else if ge != we {
			t.Errorf("diff: %s:\n got  %+v\n want %+v", name, ge, we)
		}
	}
	for name := range g {
		if _, ok := w[name]; !ok {
			t.Errorf("diff: %s is extra", name)
		}
	}
}

// TestDiffOfOtherMounts: mounts that are not an active Caisson snapshot go to
// the comparer, untouched by the snapshotter's DiffWriter.
func TestDiffOfOtherMounts(t *testing.T) {
	requireHost(t)
	h := newHarness(t, t.TempDir())
	sn := h.newSnapshotter(nil)
	for _, tc := range []struct {
		name   string
		mounts []mount.Mount
	}{
		{"not caisson's", []mount.Mount{{Type: "bind", Source: t.TempDir(), Options: []string{"ro", "rbind"}}}},
		{"a view", func() []mount.Mount {
			if err := h.unpack(sn, "v", "", h.addBlob(buildTar(t, []layerEntry{fileE("f", "x", 0o644, 0, 0)}))); err != nil {
				t.Fatal(err)
			}
			m, err := sn.View(h.ctx, "view", "v")
			if err != nil {
				t.Fatal(err)
			}
			return m
		}()},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if err := sn.WriteDiff(h.ctx, tc.mounts, io.Discard, ext4read.TarOptions{}); !errdefs.IsNotImplemented(err) {
				t.Fatalf("WriteDiff: %v, want NotImplemented", err)
			}
		})
	}
}

// TestCommitAndDiffOfHostileImage: a writable image a hostile guest crafted (a
// directory loop, a file claiming 1 TiB, a truncated image) fails to commit and
// to diff with an error naming the entry; the snapshot stays active with only its
// writable image, no layer or staging file, no ingest left in the content store,
// and no mount; it can be removed.
func TestCommitAndDiffOfHostileImage(t *testing.T) {
	requireHost(t)
	ext4test.NeedRoot(t)
	for _, tc := range []struct {
		name string
		hurt func(t *testing.T, img string)
		want string
		// malformed: InvalidArgument (else a feature the reader does not read)
		malformed bool
	}{
		{"directory loop", func(t *testing.T, img string) { debugfsW(t, img, "link /upper /upper/dir/loop") },
			"dir/loop: ext4 image: directory inode", true},
		{"a file claiming 1 TiB", func(t *testing.T, img string) { debugfsW(t, img, "sif /upper/sparse size 0x10000000000") },
			"sparse: a file of 1099511627776 bytes", true},
		{"truncated", func(t *testing.T, img string) {
			if err := os.Truncate(img, 64<<20); err != nil {
				t.Fatal(err)
			}
		}, "ext4 image:", true},
		// A feature the reader does not read, which a guest can set: the diff
		// must fail, not go on to a comparer that mounts the image.
		{"an unread feature", func(t *testing.T, img string) { debugfsW(t, img, "feature inline_data") },
			"incompat features", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := newHarness(t, t.TempDir())
			sn := h.newSnapshotter(nil)
			mounts, err := sn.Prepare(h.ctx, "ctr", "")
			if err != nil {
				t.Fatal(err)
			}
			rw := mounts[0].Source
			ext4test.WritableImage(t, rw, 1<<30, nil, func(root string) {
				ext4test.FillUpper(t, root, ext4test.Fill{})
				// Data far into the image, so that a truncation cuts it.
				f, err := os.Create(filepath.Join(root, "upper", "far"))
				if err != nil {
					t.Fatal(err)
				}
				defer f.Close()
				if err := unix.Fallocate(int(f.Fd()), 0, 0, 200<<20); err != nil {
					t.Fatal(err)
				}
				if _, err := f.WriteAt([]byte("end"), 200<<20-3); err != nil {
					t.Fatal(err)
				}
			})
			tc.hurt(t, rw)
			before, err := os.ReadFile("/proc/self/mountinfo")
			if err != nil {
				t.Fatal(err)
			}

			mounting := &refusingComparer{}
			d := differ.New(h.cs, []differ.LayerWriter{sn}, nil, mounting)
			_, err = d.Compare(h.ctx, nil, mounts, diff.WithMediaType(ocispec.MediaTypeImageLayer))
			if err == nil || errdefs.IsNotImplemented(err) || !strings.Contains(err.Error(), tc.want) || (tc.malformed && !errdefs.IsInvalidArgument(err)) {
				t.Errorf("diff: %v, want an error (InvalidArgument if malformed, never NotImplemented) holding %q", err, tc.want)
			}
			if mounting.called {
				t.Error("the diff went on to a comparer that mounts the image")
			}
			if st, err := h.cs.ListStatuses(h.ctx); err != nil || len(st) != 0 {
				t.Errorf("ingests left in the content store: %v %v", st, err)
			}

			err = sn.Commit(h.ctx, "committed", "ctr")
			if err == nil || !strings.Contains(err.Error(), tc.want) || (tc.malformed && !errdefs.IsInvalidArgument(err)) {
				t.Errorf("commit: %v, want an error (InvalidArgument if malformed) holding %q", err, tc.want)
			}
			if info, err := sn.Stat(h.ctx, "ctr"); err != nil || info.Kind != snapshots.KindActive {
				t.Errorf("after the failed commit: %v %v, want the snapshot active", info.Kind, err)
			}
			entries, err := os.ReadDir(filepath.Dir(rw))
			if err != nil {
				t.Fatal(err)
			}
			for _, e := range entries {
				if e.Name() != filepath.Base(rw) {
					t.Errorf("left in the snapshot's directory: %s", e.Name())
				}
			}
			after, err := os.ReadFile("/proc/self/mountinfo")
			if err != nil {
				t.Fatal(err)
			}
			for _, l := range strings.Split(string(after), "\n") {
				if strings.Contains(l, h.dir) && !strings.Contains(string(before), l) {
					t.Errorf("a mount left: %s", l)
				}
			}
			if err := sn.Remove(h.ctx, "ctr"); err != nil {
				t.Fatal(err)
			}
		})
	}
}

// refusingComparer stands for a comparer that would mount the image: it records
// a call and refuses.
type refusingComparer struct{ called bool }

func (c *refusingComparer) Compare(context.Context, []mount.Mount, []mount.Mount, ...diff.Opt) (ocispec.Descriptor, error) {
	c.called = true
	return ocispec.Descriptor{}, errdefs.ErrUnavailable
}

func debugfsW(t *testing.T, img, req string) {
	t.Helper()
	if out, err := exec.Command("debugfs", "-w", "-R", req, img).CombinedOutput(); err != nil {
		t.Fatalf("debugfs %q: %v: %s", req, err, out)
	}
}
