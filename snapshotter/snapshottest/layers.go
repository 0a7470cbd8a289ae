package snapshottest

import (
	"archive/tar"
	"bytes"
	"io/fs"
	"strings"
	"time"
)

// Epoch is the mtime every entry built here gets (unless its header sets one).
var Epoch = time.Date(2021, 3, 4, 5, 6, 7, 0, time.UTC)

// TarEntry is one entry of a layer tar.
type TarEntry struct {
	Header tar.Header
	Data   []byte
}

// Dir is a directory entry.
func Dir(name string, mode int64, uid, gid int) TarEntry {
	return TarEntry{Header: tar.Header{Typeflag: tar.TypeDir, Name: name + "/", Mode: mode, Uid: uid, Gid: gid}}
}

// File is a regular file entry.
func File(name, data string, mode int64, uid, gid int) TarEntry {
	return TarEntry{Header: tar.Header{Typeflag: tar.TypeReg, Name: name, Mode: mode, Uid: uid, Gid: gid, Size: int64(len(data))}, Data: []byte(data)}
}

// Hardlink is a hardlink entry. Like GNU tar and Go's FileInfoHeader, it carries
// the target's mode and owner: containerd's archive applies them to the link.
func Hardlink(name, target string, mode int64, uid, gid int) TarEntry {
	return TarEntry{Header: tar.Header{Typeflag: tar.TypeLink, Name: name, Linkname: target, Mode: mode, Uid: uid, Gid: gid}}
}

// Symlink is a symbolic link entry.
func Symlink(name, target string) TarEntry {
	return TarEntry{Header: tar.Header{Typeflag: tar.TypeSymlink, Name: name, Linkname: target, Mode: 0o777}}
}

// Device is a character, block or FIFO entry (typ tar.TypeChar, TypeBlock, TypeFifo).
func Device(name string, typ byte, major, minor int64) TarEntry {
	return TarEntry{Header: tar.Header{Typeflag: typ, Name: name, Mode: 0o660, Devmajor: major, Devminor: minor}}
}

// OCIWhiteout is an OCI whiteout entry: "dir/.wh.name" deletes dir/name from
// the layers below; "dir/.wh..wh..opq" makes dir opaque.
func OCIWhiteout(name string) TarEntry {
	return TarEntry{Header: tar.Header{Typeflag: tar.TypeReg, Name: name, Mode: 0o644}}
}

// WithXattrs adds xattrs (name, value pairs) to e as PAX records.
func WithXattrs(e TarEntry, kv ...string) TarEntry {
	e.Header.PAXRecords = map[string]string{}
	for i := 0; i+1 < len(kv); i += 2 {
		e.Header.PAXRecords["SCHILY.xattr."+kv[i]] = kv[i+1]
	}
	return e
}

// Tar writes entries as an uncompressed PAX tar.
func Tar(entries []TarEntry) ([]byte, error) {
	var b bytes.Buffer
	w := tar.NewWriter(&b)
	for _, e := range entries {
		h := e.Header
		if h.ModTime.IsZero() {
			h.ModTime = Epoch
		}
		h.Format = tar.FormatPAX
		if err := w.WriteHeader(&h); err != nil {
			return nil, err
		}
		if _, err := w.Write(e.Data); err != nil {
			return nil, err
		}
	}
	if err := w.Close(); err != nil {
		return nil, err
	}
	return b.Bytes(), nil
}

// Expect maps a layer's entries to what its image shows, OCI whiteouts left out
// (see UpperImage for how they appear). Later entries replace earlier ones.
func Expect(entries []TarEntry) []Entry {
	byName := map[string]TarEntry{}
	var out []Entry
	for _, e := range entries {
		name := strings.TrimSuffix(e.Header.Name, "/")
		if strings.HasPrefix(name[strings.LastIndex(name, "/")+1:], ".wh.") {
			continue
		}
		byName[e.Header.Name] = e
		out = append(out, expect(e, byName))
	}
	return out
}

func expect(e TarEntry, links map[string]TarEntry) Entry {
	h := e.Header
	out := Entry{Path: strings.TrimSuffix(h.Name, "/"), UID: h.Uid, GID: h.Gid, ModTime: Epoch, Mode: tarMode(h)}
	if !h.ModTime.IsZero() {
		out.ModTime = h.ModTime
	}
	switch h.Typeflag {
	case tar.TypeReg:
		out.Data = e.Data
		if out.Data == nil {
			out.Data = []byte{}
		}
	case tar.TypeSymlink:
		out.Target = h.Linkname
	case tar.TypeChar, tar.TypeBlock:
		out.Major, out.Minor = uint32(h.Devmajor), uint32(h.Devminor)
	case tar.TypeLink:
		path := out.Path
		out = expect(links[h.Linkname], links)
		out.Path = path
		out.Link = h.Linkname
	}
	for k, v := range h.PAXRecords {
		if x, ok := strings.CutPrefix(k, "SCHILY.xattr."); ok {
			if out.Xattrs == nil {
				out.Xattrs = map[string]string{}
			}
			out.Xattrs[x] = v
		}
	}
	return out
}

func tarMode(h tar.Header) fs.FileMode {
	m := fs.FileMode(h.Mode & 0o777)
	if h.Mode&0o4000 != 0 {
		m |= fs.ModeSetuid
	}
	if h.Mode&0o2000 != 0 {
		m |= fs.ModeSetgid
	}
	if h.Mode&0o1000 != 0 {
		m |= fs.ModeSticky
	}
	switch h.Typeflag {
	case tar.TypeDir:
		m |= fs.ModeDir
	case tar.TypeSymlink:
		m |= fs.ModeSymlink
	case tar.TypeChar:
		m |= fs.ModeDevice | fs.ModeCharDevice
	case tar.TypeBlock:
		m |= fs.ModeDevice
	case tar.TypeFifo:
		m |= fs.ModeNamedPipe
	}
	return m
}

// BaseLayer exercises everything a layer can hold: ownership, setuid, setgid and
// sticky modes, user xattrs (containerd's archive refuses trusted.* from a tar; see differLayer in package snapshotter for those),
// hardlinks across directories, symlinks, device nodes, a FIFO, the longest file
// name mkfs.erofs 1.5 stores (254 bytes) and a path longer than tar's limits.
func BaseLayer() []TarEntry {
	entries := []TarEntry{
		Dir("etc", 0o755, 0, 0),
		File("etc/passwd", "root:x:0:0:root:/root:/bin/sh\n", 0o644, 0, 0),
		Symlink("etc/abs", "/etc/passwd"),
		Dir("usr", 0o755, 0, 0),
		Dir("usr/bin", 0o755, 0, 0),
		File("usr/bin/su", "#!setuid\n", 0o4755, 0, 0),
		File("usr/bin/wall", "#!setgid\n", 0o2755, 0, 5),
		File("usr/bin/tool", "tool v1\n", 0o755, 0, 0),
		Dir("sbin", 0o755, 0, 0),
		Hardlink("sbin/tool", "usr/bin/tool", 0o755, 0, 0),
		Symlink("lib", "usr/lib"),
		Dir("shared", 0o2775, 0, 50),
		Dir("tmp", 0o1777, 0, 0),
		Dir("home", 0o755, 0, 0),
		Dir("home/user", 0o700, 1000, 1000),
		File("home/user/notes", "hi\n", 0o640, 1000, 1000),
		WithXattrs(File("home/user/x", "x", 0o644, 1000, 1000), "user.note", "hello", "user.other", "2"),
		WithXattrs(Dir("home/user/xdir", 0o755, 1000, 1000), "user.dir", "d"),
		Dir("dev", 0o755, 0, 0),
		Device("dev/null", tar.TypeChar, 1, 3),
		Device("dev/sda", tar.TypeBlock, 8, 0),
		Device("dev/fifo", tar.TypeFifo, 0, 0),
		Dir("a", 0o755, 0, 0),
		Dir("a/b", 0o755, 0, 0),
		Dir("a/b/c", 0o755, 0, 0),
		File("a/b/c/f", "f", 0o644, 0, 0),
		Dir("opq", 0o755, 0, 0),
		File("opq/x", "x", 0o644, 0, 0),
		File("opq/y", "y", 0o644, 0, 0),
		Dir("long", 0o755, 0, 0),
		File("long/"+strings.Repeat("n", 254), "254-byte name\n", 0o644, 0, 0),
		Dir("data", 0o755, 0, 0),
		File("data/file", "data\n", 0o644, 0, 0),
		Hardlink("data/file-link", "data/file", 0o644, 0, 0),
	}
	p := "long"
	for i := range 6 {
		p += "/" + strings.Repeat(string(rune('a'+i)), 60)
		entries = append(entries, Dir(p, 0o755, 0, 0))
	}
	return append(entries, File(p+"/leaf", "deep\n", 0o600, 0, 0))
}

// UpperLayer, over BaseLayer, deletes a directory and a file, makes a
// directory opaque and replaces a file that BaseLayer hardlinked.
func UpperLayer() []TarEntry {
	return []TarEntry{
		Dir("a", 0o755, 0, 0),
		Dir("a/b", 0o755, 0, 0),
		OCIWhiteout("a/b/.wh.c"),
		Dir("etc", 0o755, 0, 0),
		OCIWhiteout("etc/.wh.passwd"),
		Dir("opq", 0o750, 0, 0),
		OCIWhiteout("opq/.wh..wh..opq"),
		File("opq/z", "z", 0o644, 0, 0),
		Dir("usr", 0o755, 0, 0),
		Dir("usr/bin", 0o755, 0, 0),
		File("usr/bin/tool", "tool v2\n", 0o755, 0, 0),
	}
}

// UpperImage is what UpperLayer's own image shows mounted alone: its entries,
// overlay whiteouts (0/0 character devices) for what it deletes, and
// trusted.overlay.opaque=y on the opaque directory.
func UpperImage() []Entry {
	want := Expect(UpperLayer())
	for i := range want {
		if want[i].Path == "opq" {
			want[i].Xattrs = map[string]string{"trusted.overlay.opaque": "y"}
		}
	}
	return append(want, Whiteout("a/b/c"), Whiteout("etc/passwd"))
}

// Merged is what an overlay of UpperLayer over BaseLayer shows.
func Merged() []Entry {
	merged := map[string]Entry{}
	var order []string
	for _, e := range append(Expect(BaseLayer()), Expect(UpperLayer())...) {
		if _, ok := merged[e.Path]; !ok {
			order = append(order, e.Path)
		}
		merged[e.Path] = e
	}
	for _, gone := range []string{"a/b/c", "a/b/c/f", "etc/passwd", "opq/x", "opq/y"} {
		delete(merged, gone)
	}
	// sbin/tool was a hardlink of the old usr/bin/tool; it keeps the old content.
	st := merged["sbin/tool"]
	st.Link = ""
	merged["sbin/tool"] = st
	var out []Entry
	for _, p := range order {
		if e, ok := merged[p]; ok {
			out = append(out, e)
		}
	}
	return out
}
