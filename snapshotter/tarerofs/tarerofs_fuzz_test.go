package tarerofs

import (
	"archive/tar"
	"bytes"
	"context"
	"errors"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/containerd/errdefs"
	erofs "github.com/erofs/go-erofs"
	"golang.org/x/sys/unix"
)

// fuzzLimits are small, so that an input of a few bytes can cross every one of them
// and no input makes a run write more than a few MiB.
var fuzzLimits = Limits{MaxFileSize: 64 << 10, MaxLayerSize: 256 << 10, MaxDepth: 32, MaxEntries: 200}

// FuzzWrite feeds Write arbitrary layers: raw tar streams (an input starting with 'R':
// mutations reach the PAX records, sparse maps, names and sizes that tar's header
// checksum does not cover) or entries encoded by specTar (everything else: mutations
// reach every header field tar.Writer accepts). Write must not panic, must stay within
// fuzzLimits, must refuse with an error that names the entry, and what it accepts must
// be an image fsck.erofs passes and that holds exactly what the tar said.
func FuzzWrite(f *testing.F) {
	for _, hdrs := range fuzzSeedLayers() {
		f.Add(append([]byte{'R'}, rawTar(hdrs...)...))
	}
	f.Add(specOf(specEntry{typ: tar.TypeDir, name: "d/", mode: 0o755},
		specEntry{typ: tar.TypeReg, name: "d/f", mode: 0o644, size: 5000, xattrs: [][2]string{{"user.a", "b"}}},
		specEntry{typ: tar.TypeLink, name: "d/g", link: "d/f"},
		specEntry{typ: tar.TypeSymlink, name: "s", link: "/d/f"},
		specEntry{typ: tar.TypeReg, name: "d/.wh.x"},
		specEntry{typ: tar.TypeReg, name: "e/.wh..wh..opq"},
		specEntry{typ: tar.TypeChar, name: "c", devmajor: 1, devminor: 3},
	))
	f.Add(specOf(specEntry{typ: tar.TypeReg, name: "big", size: 0xffff}))
	f.Add(specOf(specEntry{typ: tar.TypeReg, name: "../x"}))
	f.Fuzz(func(t *testing.T, data []byte) {
		var layer []byte
		if len(data) > 0 && data[0] == 'R' {
			layer = data[1:]
		} else {
			var ok bool
			if layer, ok = specTar(data); !ok {
				return // a header tar.Writer refuses: no layer
			}
		}
		checkWrite(t, layer)
	})
}

func fuzzSeedLayers() [][]*tar.Header {
	return [][]*tar.Header{
		{
			{Typeflag: tar.TypeDir, Name: "etc/", Mode: 0o755},
			{Typeflag: tar.TypeReg, Name: "etc/passwd", Mode: 0o644, Size: 30, Uid: 0, Gid: 0},
			{Typeflag: tar.TypeSymlink, Name: "bin", Linkname: "usr/bin"},
			{Typeflag: tar.TypeReg, Name: "usr/bin/sh", Mode: 0o4755, Size: 5000,
				PAXRecords: map[string]string{"SCHILY.xattr.security.capability": "\x01\x00\x00\x02", "SCHILY.xattr.user.k": "v"}},
			{Typeflag: tar.TypeLink, Name: "usr/bin/ash", Linkname: "usr/bin/sh"},
			{Typeflag: tar.TypeFifo, Name: "run/fifo", Mode: 0o600},
			{Typeflag: tar.TypeBlock, Name: "dev/sda", Devmajor: 8, Devminor: 0},
		},
		{
			{Typeflag: tar.TypeReg, Name: "a/.wh.gone"},
			{Typeflag: tar.TypeReg, Name: "b/.wh..wh..opq"},
			{Typeflag: tar.TypeDir, Name: "b/", Mode: 0o700, Uid: 1000, Gid: 1000},
		},
		{{Typeflag: tar.TypeReg, Name: "x", PAXRecords: map[string]string{"SCHILY.xattr.system.posix_acl_access": "x"}}},
		{{Typeflag: tar.TypeReg, Name: strings.Repeat("d/", 40) + "f"}},
		{{Typeflag: tar.TypeReg, Name: "f", Uid: 1 << 33}},
	}
}

// rawTar is hdrs as a PAX tar, each regular file's content its size in 'x'.
func rawTar(hdrs ...*tar.Header) []byte {
	var b bytes.Buffer
	w := tar.NewWriter(&b)
	for _, h := range hdrs {
		h.Format = tar.FormatPAX
		if err := w.WriteHeader(h); err != nil {
			panic(err)
		}
		if h.Typeflag == tar.TypeReg {
			w.Write(bytes.Repeat([]byte{'x'}, int(h.Size)))
		}
	}
	w.Close()
	return b.Bytes()
}

// specEntry is one tar entry of specTar's encoding.
type specEntry struct {
	typ                byte
	name, link         string
	mode               int64
	size               int
	uid, gid           int
	devmajor, devminor int64
	xattrs             [][2]string
}

var specTypes = []byte{tar.TypeReg, tar.TypeDir, tar.TypeSymlink, tar.TypeLink, tar.TypeChar,
	tar.TypeBlock, tar.TypeFifo, tar.TypeXGlobalHeader, tar.TypeCont, 'Z'}

// specOf encodes entries the way specTar decodes them.
func specOf(entries ...specEntry) []byte {
	var b []byte
	str := func(s string) { b = append(b, byte(len(s))); b = append(b, s...) }
	u16 := func(v int) { b = append(b, byte(v>>8), byte(v)) }
	for _, e := range entries {
		b = append(b, byte(bytes.IndexByte(specTypes, e.typ)))
		str(e.name)
		str(e.link)
		u16(int(e.mode))
		u16(e.size)
		u16(e.uid)
		u16(e.gid)
		u16(int(e.devmajor))
		u16(int(e.devminor))
		b = append(b, byte(len(e.xattrs)))
		for _, x := range e.xattrs {
			str(x[0])
			str(x[1])
		}
	}
	return b
}

// specTar decodes data into a tar stream: per entry a type index, name and link
// (length-prefixed), mode, size, uid, gid, device major and minor (16 bits each;
// uid and gid values from 0xff00 up stand for large ids, up to 2^40), then xattrs.
// A regular file's content is its size in bytes of the entry's index. It returns false
// if tar.Writer refuses a header.
func specTar(data []byte) ([]byte, bool) {
	var buf bytes.Buffer
	w := tar.NewWriter(&buf)
	next := func(n int) []byte {
		n = min(n, len(data))
		b := data[:n]
		data = data[n:]
		return b
	}
	u8 := func() int {
		if b := next(1); len(b) == 1 {
			return int(b[0])
		}
		return 0
	}
	u16 := func() int { return u8()<<8 | u8() }
	str := func() string { return string(next(u8())) }
	id := func() int {
		v := u16()
		if v >= 0xff00 {
			v = 1 << ((v - 0xff00 + 16) % 41)
		}
		return v
	}
	for i := 0; len(data) > 0; i++ {
		h := &tar.Header{Typeflag: specTypes[u8()%len(specTypes)], Name: str(), Linkname: str(),
			Mode: int64(u16()), Size: int64(u16()), Uid: id(), Gid: id(),
			Devmajor: int64(u16()), Devminor: int64(u16()),
			ModTime: time.Unix(int64(i)*1000, 0), Format: tar.FormatPAX}
		for range u8() % 8 {
			if h.PAXRecords == nil {
				h.PAXRecords = map[string]string{}
			}
			k := str()
			h.PAXRecords["SCHILY.xattr."+k] = str()
		}
		if h.Typeflag != tar.TypeReg {
			h.Size = 0
		}
		if err := w.WriteHeader(h); err != nil {
			return nil, false
		}
		if _, err := w.Write(bytes.Repeat([]byte{byte(i)}, int(h.Size))); err != nil {
			return nil, false
		}
	}
	if err := w.Close(); err != nil {
		return nil, false
	}
	return buf.Bytes(), true
}

// checkWrite writes layer with fuzzLimits and checks the outcome.
func checkWrite(t *testing.T, layer []byte) {
	dir := t.TempDir()
	imgPath := filepath.Join(dir, "layer.erofs")
	f, err := os.Create(imgPath)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	err = Write(context.Background(), bytes.NewReader(layer), f, Options{TempDir: dir, Limits: fuzzLimits})
	if files, _ := os.ReadDir(dir); len(files) != 1 {
		t.Errorf("scratch files left beside the image: %v", files)
	}
	if err != nil {
		checkRefusal(t, err)
		return
	}
	end, err := f.Seek(0, io.SeekEnd)
	if err != nil {
		t.Fatal(err)
	}
	if end%BlockSize != 0 {
		t.Errorf("image of %d bytes, not a whole number of %d-byte blocks", end, BlockSize)
	}
	if out, err := exec.Command("fsck.erofs", imgPath).CombinedOutput(); err != nil {
		if errors.Is(err, exec.ErrNotFound) {
			t.Skip("fsck.erofs not installed (erofs-utils)")
		}
		t.Fatalf("fsck.erofs refuses the image Write made: %v: %s", err, out)
	}
	img, err := erofs.Open(f)
	if err != nil {
		t.Fatalf("go-erofs cannot open the image Write made: %v", err)
	}
	checkContent(t, layer, img)
}

// checkRefusal checks that err says what was wrong with which entry (a refusal, an
// InvalidArgument or NotImplemented, always does; so does a file whose data is cut
// short), or is the tar reader's own error for a stream that is not a tar.
func checkRefusal(t *testing.T, err error) {
	t.Helper()
	msg := err.Error()
	switch {
	case strings.HasPrefix(msg, "tar entry "):
	case errdefs.IsInvalidArgument(err) || errdefs.IsNotImplemented(err):
		t.Errorf("refusal %q does not name the tar entry", msg)
	case strings.HasPrefix(msg, "read layer tar: "):
	default:
		t.Errorf("Write failed with %q: neither about a named entry nor a tar format error", msg)
	}
}

// checkContent checks that img holds what layer says: every non-whiteout entry
// with its type, content, link target, device number, owner and xattrs.
func checkContent(t *testing.T, layer []byte, img fs.FS) {
	t.Helper()
	type want struct {
		hdr  *tar.Header
		data []byte
	}
	entries := map[string]*want{}
	var order []string
	linked := map[string]bool{} // hardlinks and their targets: their metadata is shared
	tr := tar.NewReader(bytes.NewReader(layer))
	for {
		hdr, err := tr.Next()
		if err != nil {
			if !errors.Is(err, io.EOF) {
				t.Fatalf("Write accepted a layer the tar reader then fails on: %v", err)
			}
			break
		}
		data, err := io.ReadAll(tr)
		if err != nil {
			t.Fatalf("Write accepted a layer the tar reader then fails on: %v", err)
		}
		p := fuzzClean(hdr.Name)
		if hdr.Typeflag == tar.TypeXGlobalHeader || strings.HasPrefix(path.Base(p), whiteoutPrefix) {
			continue
		}
		if hdr.Typeflag == tar.TypeLink {
			target := fuzzClean(hdr.Linkname)
			linked[p], linked[target] = true, true
			for q, e := range entries { // a target that is itself a link
				if e.hdr.Typeflag == tar.TypeLink && q == target {
					linked[fuzzClean(e.hdr.Linkname)] = true
				}
			}
		}
		if _, ok := entries[p]; !ok {
			order = append(order, p)
		}
		entries[p] = &want{hdr, data}
	}
	lstat := func(p string) (*erofs.Stat, bool) {
		fi, err := img.(fs.ReadLinkFS).Lstat(p)
		if err != nil {
			t.Errorf("%s: %v", p, err)
			return nil, false
		}
		return fi.Sys().(*erofs.Stat), true
	}
	for _, p := range order {
		hdr, data := entries[p].hdr, entries[p].data
		st, ok := lstat(p)
		if !ok {
			continue
		}
		typ := hdr.Typeflag
		if typ == tar.TypeLink {
			target := fuzzClean(hdr.Linkname)
			tst, ok := lstat(target)
			if !ok {
				continue
			}
			if tst.Ino != st.Ino {
				t.Errorf("hardlink %s: inode %d, its target %s's is %d", p, st.Ino, target, tst.Ino)
			}
			continue
		}
		switch typ {
		case tar.TypeDir:
			if !st.Mode.IsDir() {
				t.Errorf("%s: mode %v, want a directory", p, st.Mode)
			}
		case tar.TypeReg:
			if !st.Mode.IsRegular() {
				t.Errorf("%s: mode %v, want a regular file", p, st.Mode)
				continue
			}
			if st.InodeLayout != layoutFlatPlain {
				t.Errorf("%s: inode layout %d, want flat-plain (DAX)", p, st.InodeLayout)
			}
			if got, err := fs.ReadFile(img, p); err != nil || !bytes.Equal(got, data) {
				t.Errorf("%s: read %d bytes (%v), want the tar's %d", p, len(got), err, len(data))
			}
		case tar.TypeSymlink:
			if got, err := img.(fs.ReadLinkFS).ReadLink(p); err != nil || got != hdr.Linkname {
				t.Errorf("%s: symlink to %q (%v), want %q", p, got, err, hdr.Linkname)
			}
		case tar.TypeChar, tar.TypeBlock, tar.TypeFifo:
			wantType := map[byte]fs.FileMode{tar.TypeChar: fs.ModeDevice | fs.ModeCharDevice, tar.TypeBlock: fs.ModeDevice, tar.TypeFifo: fs.ModeNamedPipe}[typ]
			if st.Mode.Type() != wantType {
				t.Errorf("%s: mode %v, want type %v", p, st.Mode, wantType)
			}
			if typ != tar.TypeFifo && !linked[p] {
				if ma, mi := unix.Major(uint64(st.Rdev)), unix.Minor(uint64(st.Rdev)); int64(ma) != hdr.Devmajor || int64(mi) != hdr.Devminor {
					t.Errorf("%s: device %d:%d, want %d:%d", p, ma, mi, hdr.Devmajor, hdr.Devminor)
				}
			}
		}
		if linked[p] {
			continue
		}
		if int64(st.UID) != int64(hdr.Uid) || int64(st.GID) != int64(hdr.Gid) {
			t.Errorf("%s: owner %d:%d, want %d:%d", p, st.UID, st.GID, hdr.Uid, hdr.Gid)
		}
		const modeBits = fs.ModePerm | fs.ModeSetuid | fs.ModeSetgid | fs.ModeSticky
		if got, want := st.Mode&modeBits, hdr.FileInfo().Mode()&modeBits; typ != tar.TypeSymlink && got != want {
			t.Errorf("%s: mode bits %v, want %v", p, got, want)
		}
		if int64(st.Mtime) != hdr.ModTime.Unix() {
			t.Errorf("%s: mtime %d, want %d", p, int64(st.Mtime), hdr.ModTime.Unix())
		}
		for k, v := range hdr.PAXRecords {
			if name, ok := strings.CutPrefix(k, "SCHILY.xattr."); ok && st.Xattrs[name] != v {
				t.Errorf("%s: xattr %s = %q, want %q", p, name, st.Xattrs[name], v)
			}
		}
	}
}

// fuzzClean is the image path of a tar name, as fs.FS names it ("." is the root).
func fuzzClean(name string) string {
	return path.Clean(strings.TrimLeft(name, "/"))
}
