package ext4read

import (
	"context"
	"crypto/sha256"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"testing"

	"github.com/caisson-containers/caisson/snapshotter/ext4read/ext4test"
	"github.com/containerd/errdefs"
)

// imageRecords walks dir of the image through this package.
func imageRecords(t *testing.T, f *FS, dir string) ([]ext4test.Record, error) {
	t.Helper()
	root, err := f.Lookup(dir)
	if err != nil {
		return nil, err
	}
	var out []ext4test.Record
	err = f.Walk(context.Background(), root, func(p string, in *Inode) error {
		r := ext4test.Record{Path: p, Mode: in.Mode, UID: in.UID, GID: in.GID, Mtime: in.Mtime, Major: in.Major, Minor: in.Minor, Ino: uint64(in.Ino)}
		switch in.Type() {
		case TypeReg:
			r.Size = in.Size
			rd, err := f.Open(in)
			if err != nil {
				return err
			}
			h := sha256.New()
			if _, err := io.Copy(h, rd); err != nil {
				return err
			}
			r.Data = fmt.Sprintf("%x", h.Sum(nil))
		case TypeLink:
			if r.Target, err = f.Readlink(in); err != nil {
				return err
			}
		}
		x, err := f.Xattrs(in)
		if err != nil {
			return err
		}
		r.Xattrs = ext4test.XattrString(x)
		out = append(out, r)
		return nil
	})
	return out, err
}

func openImage(t *testing.T, img string) *FS {
	t.Helper()
	fh, err := os.Open(img)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { fh.Close() })
	fi, _ := fh.Stat()
	f, err := Open(fh, fi.Size(), Limits{})
	if err != nil {
		t.Fatal(err)
	}
	return f
}

// TestReadsWhatTheKernelWrote: every kind of entry of an overlay upper
// directory, written by the kernel, reads back here as the kernel reads it.
func TestReadsWhatTheKernelWrote(t *testing.T) {
	ext4test.NeedRoot(t)
	for _, tc := range []struct {
		name string
		opts []string
	}{
		{"defaults", nil},
		{"4k blocks, 128-byte inodes", []string{"-b", "4096", "-I", "128"}},
		{"1k blocks, 128-byte inodes", []string{"-b", "1024", "-I", "128"}},
		{"no metadata_csum, no 64bit", []string{"-O", "^metadata_csum,^64bit"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			img := filepath.Join(t.TempDir(), "rw.ext4")
			ext4test.WritableImage(t, img, 1<<30, tc.opts, func(root string) { ext4test.FillUpper(t, root, ext4test.Fill{LongName: true, ACL: true}) })
			f := openImage(t, img)
			got, err := imageRecords(t, f, "upper")
			if err != nil {
				t.Fatal(err)
			}
			ext4test.WithMounted(t, img, "ext4", func(root string) {
				ext4test.CompareRecords(t, ext4test.HostRecords(t, filepath.Join(root, "upper")), got)
			})
		})
	}
}

func TestLookupMissing(t *testing.T) {
	ext4test.NeedRoot(t)
	img := filepath.Join(t.TempDir(), "rw.ext4")
	ext4test.WritableImage(t, img, 64<<20, nil, func(root string) {})
	f := openImage(t, img)
	if _, err := f.Lookup("upper"); !errdefs.IsNotFound(err) {
		t.Fatalf("Lookup of a missing upper: %v, want NotFound", err)
	}
}
