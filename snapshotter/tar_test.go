package snapshotter

import (
	"archive/tar"
	"bytes"
	"fmt"
	"io/fs"
	"strings"
	"testing"
	"time"

	"github.com/caisson-containers/caisson/snapshotter/snapshottest"
)

// epoch is the mtime of every generated entry.
var epoch = time.Date(2021, 3, 4, 5, 6, 7, 0, time.UTC)

// layerEntry is one tar entry and, unless hidden, what it looks like afterwards.
type layerEntry struct {
	hdr  tar.Header
	data []byte
	// sparse, if set, writes data as a PAX 1.0 sparse file: this many zero bytes
	// then data.
	sparse int64
}

func dirE(name string, mode int64, uid, gid int) layerEntry {
	return layerEntry{hdr: tar.Header{Typeflag: tar.TypeDir, Name: name + "/", Mode: mode, Uid: uid, Gid: gid}}
}

func fileE(name, data string, mode int64, uid, gid int) layerEntry {
	return layerEntry{hdr: tar.Header{Typeflag: tar.TypeReg, Name: name, Mode: mode, Uid: uid, Gid: gid, Size: int64(len(data))}, data: []byte(data)}
}

// linkE is a hardlink entry. Like GNU tar and Go's FileInfoHeader, it carries the
// target's mode and owner: containerd's archive applies them to the link.
func linkE(name, target string, mode int64, uid, gid int) layerEntry {
	return layerEntry{hdr: tar.Header{Typeflag: tar.TypeLink, Name: name, Linkname: target, Mode: mode, Uid: uid, Gid: gid}}
}

func symlinkE(name, target string) layerEntry {
	return layerEntry{hdr: tar.Header{Typeflag: tar.TypeSymlink, Name: name, Linkname: target, Mode: 0o777}}
}

func devE(name string, typ byte, major, minor int64) layerEntry {
	return layerEntry{hdr: tar.Header{Typeflag: typ, Name: name, Mode: 0o660, Devmajor: major, Devminor: minor}}
}

func withXattrs(e layerEntry, kv ...string) layerEntry {
	e.hdr.PAXRecords = map[string]string{}
	for i := 0; i+1 < len(kv); i += 2 {
		e.hdr.PAXRecords["SCHILY.xattr."+kv[i]] = kv[i+1]
	}
	return e
}

// buildTar writes entries as an uncompressed PAX tar.
func buildTar(t testing.TB, entries []layerEntry) []byte {
	t.Helper()
	var b bytes.Buffer
	w := tar.NewWriter(&b)
	for _, e := range entries {
		h := e.hdr
		if h.ModTime.IsZero() {
			h.ModTime = epoch
		}
		h.Format = tar.FormatPAX
		data := e.data
		if e.sparse > 0 {
			// PAX format 1.0 sparse file: a text map (one data segment) in
			// the first block of the data, then the data segments.
			realName := h.Name
			sparseMap := fmt.Sprintf("1\n%d\n%d\n", e.sparse, len(e.data))
			block := make([]byte, 512)
			copy(block, sparseMap)
			data = append(block, e.data...)
			h.Name = "GNUSparseFile.0/" + realName[strings.LastIndex(realName, "/")+1:]
			h.Size = int64(len(data))
			if h.PAXRecords == nil {
				h.PAXRecords = map[string]string{}
			}
			h.PAXRecords["GNU.sparse.major"] = "1"
			h.PAXRecords["GNU.sparse.minor"] = "0"
			h.PAXRecords["GNU.sparse.name"] = realName
			h.PAXRecords["GNU.sparse.realsize"] = fmt.Sprint(e.sparse + int64(len(e.data)))
		}
		if err := w.WriteHeader(&h); err != nil {
			t.Fatalf("tar header %s: %v", h.Name, err)
		}
		if _, err := w.Write(data); err != nil {
			t.Fatalf("tar data %s: %v", h.Name, err)
		}
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	return b.Bytes()
}

// expect is the snapshottest entry a non-whiteout tar entry becomes.
func expect(e layerEntry, links map[string]layerEntry) snapshottest.Entry {
	h := e.hdr
	name := strings.TrimSuffix(h.Name, "/")
	out := snapshottest.Entry{Path: name, UID: h.Uid, GID: h.Gid, ModTime: epoch, Mode: tarMode(h)}
	switch h.Typeflag {
	case tar.TypeReg:
		if e.sparse > 0 {
			out.Data = append(make([]byte, e.sparse), e.data...)
		} else {
			out.Data = e.data
		}
	case tar.TypeSymlink:
		out.Target = h.Linkname
	case tar.TypeChar, tar.TypeBlock:
		out.Major, out.Minor = uint32(h.Devmajor), uint32(h.Devminor)
	case tar.TypeLink:
		target := links[h.Linkname]
		out = expect(target, links)
		out.Path = name
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
	if h.Mode&04000 != 0 {
		m |= fs.ModeSetuid
	}
	if h.Mode&02000 != 0 {
		m |= fs.ModeSetgid
	}
	if h.Mode&01000 != 0 {
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

// expectAll maps the entries of one layer (whiteouts excluded) to expectations.
func expectAll(entries []layerEntry) []snapshottest.Entry {
	byName := map[string]layerEntry{}
	var out []snapshottest.Entry
	for _, e := range entries {
		base := e.hdr.Name[strings.LastIndex(strings.TrimSuffix(e.hdr.Name, "/"), "/")+1:]
		if strings.HasPrefix(base, ".wh.") {
			continue
		}
		byName[e.hdr.Name] = e
		out = append(out, expect(e, byName))
	}
	return out
}

func fileHeader(name string, size int) tar.Header {
	return tar.Header{Typeflag: tar.TypeReg, Name: name, Mode: 0o644, Size: int64(size)}
}
