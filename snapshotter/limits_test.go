package snapshotter

import (
	"archive/tar"
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/errdefs"
	"golang.org/x/sys/unix"

	"github.com/caisson-containers/caisson/snapshotter/differ"
	"github.com/caisson-containers/caisson/snapshotter/tarerofs"
)

// TestLayerLimits: layers that ask the host for more than tarerofs.Limits allows, or
// for xattrs EROFS would record truncated. Caisson's differ refuses each with an
// InvalidArgument error naming the entry before writing it, and does not hand it to
// containerd's differ; the snapshot stays active, holds nothing, and is removable.
// The snapshotter's root is a small tmpfs, so that a writer without the limits fails
// on a full tmpfs (a different error) instead of filling the host's disk.
func TestLayerLimits(t *testing.T) {
	deep := strings.Repeat("d/", tarerofs.DefaultMaxDepth) + "f"
	xattr := func(name string, n int) map[string]string {
		return map[string]string{"SCHILY.xattr." + name: strings.Repeat("v", n)}
	}
	for _, tc := range []struct {
		name   string
		tar    func(t *testing.T) []byte
		limits tarerofs.Limits
		bad    string // the entry the error names (its start, for a long one)
	}{
		{
			// 1 TiB declared by a 1-byte sparse map: a few KiB of tar.
			name: "sparse file of 1 TiB",
			tar:  func(t *testing.T) []byte { return sparseTar(t, "big", 1<<40) },
			bad:  "big",
		},
		{
			name: "files over the layer's total",
			tar: func(t *testing.T) []byte {
				return buildTar(t, []layerEntry{fileE("a", "aaaa", 0o644, 0, 0), fileE("b", "bbbb", 0o644, 0, 0)})
			},
			limits: tarerofs.Limits{MaxLayerSize: 6},
			bad:    "b",
		},
		{
			name: "path deeper than the limit",
			tar:  func(t *testing.T) []byte { return buildTar(t, []layerEntry{fileE(deep, "x", 0o644, 0, 0)}) },
			bad:  deep[:200],
		},
		{
			// The limit is lowered so the layer stays small; implied parent
			// directories count.
			name: "more entries than the limit",
			tar: func(t *testing.T) []byte {
				var es []layerEntry
				for i := range 40 {
					es = append(es, fileE(fmt.Sprintf("dir%d/f", i), "x", 0o644, 0, 0))
				}
				return buildTar(t, es)
			},
			limits: tarerofs.Limits{MaxEntries: 64},
			bad:    "dir31/f", // root + 32 directories + 32 files = 65
		},
		{
			name: "xattr name over 255 bytes",
			tar: func(t *testing.T) []byte {
				e := fileE("f", "x", 0o644, 0, 0)
				e.Header.PAXRecords = xattr("user."+strings.Repeat("n", 251), 1)
				return buildTar(t, []layerEntry{e})
			},
			bad: "f",
		},
		{
			name: "xattr value over 64 KiB",
			tar: func(t *testing.T) []byte {
				e := fileE("f", "x", 0o644, 0, 0)
				e.Header.PAXRecords = xattr("user.big", 1<<16)
				return buildTar(t, []layerEntry{e})
			},
			bad: "f",
		},
		{
			// Five values of 60,000 bytes: each fits, together they overflow the
			// inode's 16-bit xattr count. The second hardlink header adds them to
			// the shared inode.
			name: "xattrs of one inode over what EROFS describes",
			tar: func(t *testing.T) []byte {
				f := fileE("f", "x", 0o644, 0, 0)
				f.Header.PAXRecords = map[string]string{}
				l := linkE("l", "f", 0o644, 0, 0)
				l.Header.PAXRecords = map[string]string{}
				for i := range 5 {
					h := f.Header.PAXRecords
					if i >= 3 {
						h = l.Header.PAXRecords
					}
					h["SCHILY.xattr.user.x"+strconv.Itoa(i)] = strings.Repeat("v", 60000)
				}
				return buildTar(t, []layerEntry{f, l})
			},
			bad: "l",
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h, sn, _ := smallRootSnapshotter(t, "32m")
			h.applier = h.applier.(*differ.Differ).WithLimits(tc.limits)
			desc := h.addBlob(tc.tar(t))
			mounts, err := sn.Prepare(h.ctx, "active", "")
			if err != nil {
				t.Fatal(err)
			}
			_, err = h.applier.Apply(h.ctx, desc, mounts)
			if !errdefs.IsInvalidArgument(err) || !strings.Contains(err.Error(), fmt.Sprintf("%q", tc.bad)[:len(tc.bad)+1]) {
				t.Fatalf("apply: got %v, want an InvalidArgument error naming %.80q", err, tc.bad)
			}
			t.Log(truncate(err.Error()))
			if info, err := sn.Stat(h.ctx, "active"); err != nil || info.Kind != snapshots.KindActive {
				t.Fatalf("after the failed apply: %v %v, want the snapshot still active", info.Kind, err)
			}
			if files, _ := os.ReadDir(sn.snapshotDir(h.idOf(sn, "active"))); len(files) != 0 {
				t.Errorf("the failed apply left %v in the snapshot directory", files)
			}
			if err := sn.Remove(h.ctx, "active"); err != nil {
				t.Fatal(err)
			}
			checkConsistent(t, h, sn)
		})
	}
}

// Layers right at the limits still apply.
func TestLayerAtTheLimits(t *testing.T) {
	h, sn, _ := smallRootSnapshotter(t, "32m")
	h.applier = h.applier.(*differ.Differ).WithLimits(tarerofs.Limits{MaxEntries: 4, MaxLayerSize: 8})
	f := fileE("d/f", "aaaa", 0o644, 0, 0)
	f.Header.PAXRecords = map[string]string{
		"SCHILY.xattr.user." + strings.Repeat("n", 250): "1",
		"SCHILY.xattr.user.big":                         strings.Repeat("v", 1<<16-1),
	}
	entries := []layerEntry{f, fileE("d/g", "bbbb", 0o644, 0, 0)} // root, d, d/f, d/g
	if err := h.unpack(sn, "l", "", h.addBlob(buildTar(t, entries))); err != nil {
		t.Fatal(err)
	}
	// The kernel reads the xattrs back whole.
	h.withLayerImage(sn, "l", func(root string) {
		for name, want := range f.Header.PAXRecords {
			name = strings.TrimPrefix(name, "SCHILY.xattr.")
			buf := make([]byte, 1<<16)
			n, err := unix.Lgetxattr(filepath.Join(root, "d/f"), name, buf)
			if err != nil || string(buf[:n]) != want {
				t.Errorf("xattr %.20s...: %d bytes, %v; want %d bytes", name, n, err, len(want))
			}
		}
	})
	checkConsistent(t, h, sn, "l")
}

// sparseTar is a PAX tar of one sparse file (format 1.0, as GNU tar writes it) that
// declares size bytes: one data byte at its end, the rest a hole. Go's tar.Writer
// drops GNU.sparse records, so the extended header is written by hand: a regular
// header block retyped 'x'.
func sparseTar(t *testing.T, name string, size int64) []byte {
	t.Helper()
	rec := func(k, v string) string {
		r := " " + k + "=" + v + "\n"
		n := len(r)
		for len(strconv.Itoa(n))+len(r) != n {
			n = len(strconv.Itoa(n)) + len(r)
		}
		return strconv.Itoa(n) + r
	}
	pax := rec("GNU.sparse.major", "1") + rec("GNU.sparse.minor", "0") +
		rec("GNU.sparse.name", name) + rec("GNU.sparse.realsize", strconv.FormatInt(size, 10))
	// The data: the sparse map (one region: the last byte), padded to a block, then
	// the region's byte.
	data := make([]byte, 512)
	copy(data, fmt.Sprintf("1\n%d\n1\n", size-1))
	data = append(data, 'x')

	var b bytes.Buffer
	w := tar.NewWriter(&b)
	if err := w.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: "PaxHeaders/" + name, Mode: 0o644, Size: int64(len(pax)), Format: tar.FormatUSTAR, ModTime: epoch}); err != nil {
		t.Fatal(err)
	}
	w.Write([]byte(pax))
	if err := w.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: "GNUSparseFile.0/" + name, Mode: 0o644, Size: int64(len(data)), Format: tar.FormatUSTAR, ModTime: epoch}); err != nil {
		t.Fatal(err)
	}
	w.Write(data)
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	out := b.Bytes()
	// Retype the first header as a PAX extended header and fix its checksum.
	out[156] = tar.TypeXHeader
	copy(out[148:156], "        ")
	sum := 0
	for _, c := range out[:512] {
		sum += int(c)
	}
	copy(out[148:156], fmt.Sprintf("%06o\x00 ", sum))

	// What a reader sees: one regular file of the declared size.
	hdr, err := tar.NewReader(bytes.NewReader(out)).Next()
	if err != nil || hdr.Name != name || hdr.Size != size || hdr.Typeflag != tar.TypeReg {
		t.Fatalf("sparse tar reads as %+v, %v", hdr, err)
	}
	return out
}

func truncate(s string) string {
	if len(s) > 300 {
		return s[:300] + "..."
	}
	return s
}
