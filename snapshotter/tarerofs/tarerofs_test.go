package tarerofs

import (
	"archive/tar"
	"bytes"
	"context"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/containerd/errdefs"
	erofs "github.com/erofs/go-erofs"
)

// These tests read the images back with go-erofs's reader, so they need no root;
// the snapshotter's tests mount them with the kernel.

var mtime = time.Date(2021, 3, 4, 5, 6, 7, 0, time.UTC)

func tarOf(t *testing.T, hdrs ...*tar.Header) []byte {
	t.Helper()
	var b bytes.Buffer
	w := tar.NewWriter(&b)
	for _, h := range hdrs {
		if h.ModTime.IsZero() {
			h.ModTime = mtime
		}
		h.Format = tar.FormatPAX
		if err := w.WriteHeader(h); err != nil {
			t.Fatal(err)
		}
		if h.Typeflag == tar.TypeReg {
			if _, err := w.Write(bytes.Repeat([]byte{'x'}, int(h.Size))); err != nil {
				t.Fatal(err)
			}
		}
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	return b.Bytes()
}

func write(t *testing.T, data []byte) (fs.FS, error) {
	t.Helper()
	dir := t.TempDir()
	f, err := os.Create(filepath.Join(dir, "layer.erofs"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	if err := Write(context.Background(), bytes.NewReader(data), f, Options{TempDir: dir}); err != nil {
		return nil, err
	}
	if files, _ := os.ReadDir(dir); len(files) != 1 {
		t.Errorf("scratch files left beside the image: %v", files)
	}
	img, err := erofs.Open(f)
	if err != nil {
		t.Fatal(err)
	}
	return img, nil
}

func stat(t *testing.T, img fs.FS, p string) *erofs.Stat {
	t.Helper()
	fi, err := fs.Stat(img, p)
	if err != nil {
		t.Fatal(err)
	}
	return fi.Sys().(*erofs.Stat)
}

func TestWrite(t *testing.T) {
	img, err := write(t, tarOf(t,
		&tar.Header{Typeflag: tar.TypeDir, Name: "d/", Mode: 0o750, Uid: 1, Gid: 2},
		&tar.Header{Typeflag: tar.TypeReg, Name: "d/big", Mode: 0o4755, Size: 10000,
			PAXRecords: map[string]string{"SCHILY.xattr.trusted.x": "t", "SCHILY.xattr.user.y": "u"}},
		&tar.Header{Typeflag: tar.TypeLink, Name: "e/link", Linkname: "d/big", Mode: 0o4755},
		&tar.Header{Typeflag: tar.TypeReg, Name: "small", Mode: 0o644, Size: 100, PAXRecords: map[string]string{"SCHILY.xattr.user.z": "z"}},
		&tar.Header{Typeflag: tar.TypeLink, Name: "small2", Linkname: "small", Mode: 0o644},
		&tar.Header{Typeflag: tar.TypeReg, Name: "empty", Mode: 0o644},
		&tar.Header{Typeflag: tar.TypeSymlink, Name: "abs", Linkname: "/etc/passwd"},
		&tar.Header{Typeflag: tar.TypeChar, Name: "null", Mode: 0o666, Devmajor: 1, Devminor: 3},
		&tar.Header{Typeflag: tar.TypeReg, Name: "d/.wh.gone", Mode: 0o644},
		&tar.Header{Typeflag: tar.TypeReg, Name: "o/.wh..wh..opq", Mode: 0o644},
	))
	if err != nil {
		t.Fatal(err)
	}
	big, link := stat(t, img, "d/big"), stat(t, img, "e/link")
	if big.Ino != link.Ino || big.Nlink != 2 {
		t.Errorf("hardlink: inodes %d and %d, %d links; want one inode with 2", big.Ino, link.Ino, big.Nlink)
	}
	if big.Mode != fs.ModeSetuid|0o755 || big.Size != 10000 || big.Mtime != uint64(mtime.Unix()) {
		t.Errorf("d/big: %+v", big)
	}
	if big.Xattrs["trusted.x"] != "t" || big.Xattrs["user.y"] != "u" {
		t.Errorf("d/big xattrs %v", big.Xattrs)
	}
	if d := stat(t, img, "d"); d.Mode != fs.ModeDir|0o750 || d.UID != 1 || d.GID != 2 {
		t.Errorf("d: %+v", d)
	}
	if e := stat(t, img, "e"); e.Mode != fs.ModeDir|0o755 {
		t.Errorf("implicit parent e: %+v", e)
	}
	if w := stat(t, img, "d/gone"); w.Mode.Type() != fs.ModeDevice|fs.ModeCharDevice || w.Rdev != 0 {
		t.Errorf("whiteout d/gone: %+v", w)
	}
	if o := stat(t, img, "o"); o.Xattrs["trusted.overlay.opaque"] != "y" {
		t.Errorf("opaque o: xattrs %v", o.Xattrs)
	}
	if n := stat(t, img, "null"); n.Rdev != 1<<8|3 {
		t.Errorf("null: rdev %#x", n.Rdev)
	}
	// Every regular file is flat-plain (DAX-mappable), its content intact.
	for p, size := range map[string]int{"small": 100, "small2": 100, "d/big": 10000, "empty": 0} {
		if st := stat(t, img, p); st.InodeLayout != layoutFlatPlain {
			t.Errorf("%s: inode layout %d, want flat-plain", p, st.InodeLayout)
		}
		if b, err := fs.ReadFile(img, p); err != nil || !bytes.Equal(b, bytes.Repeat([]byte{'x'}, size)) {
			t.Errorf("%s: read %d bytes (%v), want %d x", p, len(b), err, size)
		}
	}
	if s := stat(t, img, "small"); s.Xattrs["user.z"] != "z" || s.Nlink != 2 {
		t.Errorf("small: %+v", s)
	}
	for _, p := range []string{"d/.wh.gone", "o/.wh..wh..opq"} {
		if _, err := fs.Stat(img, p); err == nil {
			t.Errorf("%s is in the image", p)
		}
	}
}

// A hardlink to a symlink shares the symlink's own inode, whatever the symlink
// points to: a file of the layer, nothing, or itself (FuzzWrite found the first
// linked to the file and the others refused).
func TestWriteHardlinkToSymlink(t *testing.T) {
	for _, target := range []string{"/x", "x", "nowhere", "s"} {
		t.Run(target, func(t *testing.T) {
			img, err := write(t, tarOf(t,
				&tar.Header{Typeflag: tar.TypeReg, Name: "x", Mode: 0o644, Size: 5},
				&tar.Header{Typeflag: tar.TypeSymlink, Name: "s", Linkname: target},
				&tar.Header{Typeflag: tar.TypeLink, Name: "l", Linkname: "s"},
			))
			if err != nil {
				t.Fatal(err)
			}
			fsys := img.(fs.ReadLinkFS)
			var ino [2]int64
			for i, p := range []string{"s", "l"} {
				fi, err := fsys.Lstat(p)
				if err != nil {
					t.Fatal(err)
				}
				st := fi.Sys().(*erofs.Stat)
				if fi.Mode().Type() != fs.ModeSymlink || st.Nlink != 2 {
					t.Errorf("%s: mode %v, %d links; want a symlink with 2", p, fi.Mode(), st.Nlink)
				}
				if got, err := fsys.ReadLink(p); err != nil || got != target {
					t.Errorf("%s: points to %q (%v), want %q", p, got, err, target)
				}
				ino[i] = int64(st.Ino)
			}
			if ino[0] != ino[1] {
				t.Errorf("inodes %d (s) and %d (l), want one", ino[0], ino[1])
			}
		})
	}
}

func TestWriteRefuses(t *testing.T) {
	for _, tc := range []struct {
		name    string
		hdrs    []*tar.Header
		invalid bool // else NotImplemented
		entry   string
	}{
		{"dotdot", []*tar.Header{{Typeflag: tar.TypeReg, Name: "a/../../x"}}, true, "a/../../x"},
		{"through a symlink", []*tar.Header{{Typeflag: tar.TypeSymlink, Name: "s", Linkname: "/"}, {Typeflag: tar.TypeReg, Name: "s/x"}}, true, "s/x"},
		{"link out", []*tar.Header{{Typeflag: tar.TypeLink, Name: "l", Linkname: "../x"}}, true, "l"},
		{"link to nothing", []*tar.Header{{Typeflag: tar.TypeLink, Name: "l", Linkname: "x"}}, true, "l"},
		{"link to a directory", []*tar.Header{{Typeflag: tar.TypeDir, Name: "d/"}, {Typeflag: tar.TypeLink, Name: "l", Linkname: "d"}}, true, "l"},
		{"long name", []*tar.Header{{Typeflag: tar.TypeReg, Name: strings.Repeat("n", 256)}}, true, strings.Repeat("n", 256)},
		{"replaced", []*tar.Header{{Typeflag: tar.TypeReg, Name: "f"}, {Typeflag: tar.TypeReg, Name: "f"}}, false, "f"},
		{"whiteout of its own", []*tar.Header{{Typeflag: tar.TypeReg, Name: "f"}, {Typeflag: tar.TypeReg, Name: ".wh.f"}}, false, ".wh.f"},
		{"acl", []*tar.Header{{Typeflag: tar.TypeReg, Name: "f", PAXRecords: map[string]string{"SCHILY.xattr.system.posix_acl_access": "x"}}}, false, "f"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := write(t, tarOf(t, tc.hdrs...))
			ok := errdefs.IsNotImplemented(err)
			if tc.invalid {
				ok = errdefs.IsInvalidArgument(err)
			}
			if !ok || !strings.Contains(err.Error(), `"`+tc.entry+`"`) {
				t.Fatalf("got %v, want an error naming %q (invalid argument: %v)", err, tc.entry, tc.invalid)
			}
		})
	}
}
