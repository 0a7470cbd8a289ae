// Package tarerofs writes an OCI image layer, read as a tar stream, straight into an
// EROFS image with github.com/erofs/go-erofs: every file is created once and its data
// written once (to go-erofs's spool, then copied into the image when it is closed).
//
// The image holds the layer as an overlayfs lower layer, the way containerd's
// overlay differ writes an upper directory: OCI whiteouts (".wh.NAME") become
// overlay whiteouts (a 0/0 character device NAME) and an opaque marker
// (".wh..wh..opq") becomes trusted.overlay.opaque=y on its directory. Ownership,
// modes (setuid, setgid, sticky), mtimes, symlinks, device nodes, FIFOs and the
// xattrs of the user., trusted. and security. namespaces are kept.
//
// Bad input is an errdefs.ErrInvalidArgument naming the entry: a name that leaves
// the root once cleaned ("../x"), an entry below a symlink or a non-directory of
// this layer, a hardlink to something outside the root or not earlier in the layer.
// Symlinks themselves may point anywhere (absolute targets are normal in images).
//
// The image is laid out for DAX as mkfs.erofs -Enoinline_data lays it out: 4 KiB
// blocks, uncompressed, every regular file's data in blocks of its own
// (flat-plain). go-erofs stores small files inline; Write moves them (flatten.go).
//
// Hardlinks are kept: go-erofs v0.3.1's Writer has no way to give two names one
// inode, so Write patches the finished image's directory entries (hardlink.go).
//
// A layer comes from whoever built the image, so what it may ask of the host is bounded
// (Limits): a regular file's declared size (a sparse entry declares its logical size,
// and go-erofs writes every byte of it, holes included, twice: spool then image), the
// sum of those sizes, a path's depth, the number of entries the image gets (implied
// parent directories included), and xattrs: a name longer than the kernel's
// XATTR_NAME_MAX (255), a value longer than EROFS can record (65535 bytes: its
// e_value_size is 16 bits, one below the kernel's XATTR_SIZE_MAX), or more xattr bytes on
// one inode than its 16-bit i_xattr_icount can describe. go-erofs truncates those
// lengths silently, which would make a corrupt image. Each is an
// errdefs.ErrInvalidArgument naming the entry.
//
// What go-erofs v0.3.1 cannot write is an errdefs.ErrNotImplemented naming the
// entry, so that a caller can fall back to another unpack path: an entry that
// replaces another non-directory of the same layer, or a whiteout of one (it
// cannot remove an entry), and xattrs outside user., trusted. and security. (it
// mis-encodes system.posix_acl_*). Nothing is ever dropped silently.
package tarerofs

import (
	"archive/tar"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"math"
	"path"
	"strings"

	"github.com/containerd/errdefs"
	erofs "github.com/erofs/go-erofs"
	"golang.org/x/sys/unix"
)

// BlockSize is the image's block size: the page size, so the guest can map file
// data with DAX.
const BlockSize = 4096

// maxNameLen is Linux's (and EROFS's) limit on one path element.
const maxNameLen = 255

const (
	whiteoutPrefix = ".wh."
	opaqueMarker   = ".wh..wh..opq"
	opaqueXattr    = "trusted.overlay.opaque"
)

// Options configure Write.
type Options struct {
	// TempDir holds go-erofs's spool file (unlinked as soon as it is created)
	// while the image is written. Empty means os.TempDir().
	TempDir string
	// Limits bound what the layer may ask for; zero fields take their defaults.
	Limits Limits
}

// Limits bound one layer. A zero field means its default.
type Limits struct {
	// MaxFileSize bounds a regular file's declared size. Default DefaultMaxFileSize.
	MaxFileSize int64
	// MaxLayerSize bounds the sum of the regular files' declared sizes. Default
	// DefaultMaxLayerSize.
	MaxLayerSize int64
	// MaxDepth bounds the number of elements of an entry's path. Default DefaultMaxDepth.
	MaxDepth int
	// MaxEntries bounds the image's entries: the tar's, whiteouts and the parent
	// directories a tar leaves implied. Default DefaultMaxEntries.
	MaxEntries int
}

const (
	// DefaultMaxFileSize is 64 GiB: more than any file of an image seen in practice
	// (large model weights included), far less than a sparse entry can declare.
	DefaultMaxFileSize = 64 << 30
	// DefaultMaxLayerSize is 256 GiB of file data in one layer.
	DefaultMaxLayerSize = 256 << 30
	// DefaultMaxDepth is 1024 path elements: a path any deeper is longer than the
	// kernel's PATH_MAX (4096 bytes) already, so no tool could open it by name.
	DefaultMaxDepth = 1024
	// DefaultMaxEntries is a million entries: a large layer holds a few hundred
	// thousand files; each entry costs the writer memory until the image is written.
	DefaultMaxEntries = 1_000_000
)

func (l Limits) withDefaults() Limits {
	if l.MaxFileSize <= 0 {
		l.MaxFileSize = DefaultMaxFileSize
	}
	if l.MaxLayerSize <= 0 {
		l.MaxLayerSize = DefaultMaxLayerSize
	}
	if l.MaxDepth <= 0 {
		l.MaxDepth = DefaultMaxDepth
	}
	if l.MaxEntries <= 0 {
		l.MaxEntries = DefaultMaxEntries
	}
	return l
}

const (
	// maxXattrName is the kernel's XATTR_NAME_MAX.
	maxXattrName = 255
	// maxXattrValue is what an EROFS xattr entry's 16-bit e_value_size records
	// (the kernel's XATTR_SIZE_MAX, 65536, does not fit).
	maxXattrValue = 1<<16 - 1
	// maxXattrArea is the largest inline xattr area an inode's 16-bit
	// i_xattr_icount describes: a 12-byte header and 65534 4-byte units.
	maxXattrArea = 12 + 4*(1<<16-2)
)

// File is where Write writes the image: an *os.File opened for reading and writing.
type File interface {
	io.WriteSeeker
	io.ReaderAt
	io.WriterAt
}

// Write reads the layer tar from r and writes its EROFS image to out, starting at
// offset 0. It reads r up to the tar's end-of-archive marker, not beyond. On error
// out holds garbage, which the caller removes.
func Write(ctx context.Context, r io.Reader, out File, opts Options) (retErr error) {
	dst := &abortable{WriteSeeker: out}
	w := erofs.Create(dst, erofs.WithBlockSize(BlockSize), erofs.WithTempDir(opts.TempDir))
	defer func() {
		if retErr != nil {
			// go-erofs has no Abort: Close is what releases its spool file. Make
			// it fail at its first write instead of writing the image.
			dst.aborted = true
			w.Close()
		}
	}()
	c := &converter{w: w, limits: opts.Limits.withDefaults(), kinds: map[string]kind{"/": kindDir}, types: map[string]byte{},
		canon: map[string]string{}, nlink: map[string]uint32{}, xattrs: map[string]map[string]int{}}
	tr := tar.NewReader(r)
	for {
		if err := ctx.Err(); err != nil {
			return err
		}
		hdr, err := tr.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return fmt.Errorf("read layer tar: %w", err)
		}
		if err := c.add(hdr, tr); err != nil {
			return err
		}
		if n := len(c.kinds); n > c.limits.MaxEntries {
			return fmt.Errorf("tar entry %q: the layer has more than %d entries: %w", hdr.Name, c.limits.MaxEntries, errdefs.ErrInvalidArgument)
		}
	}
	for p, n := range c.nlink {
		if err := w.SetNlink(p, n); err != nil {
			return err
		}
	}
	if err := w.Close(); err != nil {
		return fmt.Errorf("write EROFS image: %w", err)
	}
	if err := relink(out, c.links); err != nil {
		return fmt.Errorf("write EROFS image: hardlinks: %w", err)
	}
	if err := flatten(out); err != nil {
		return fmt.Errorf("write EROFS image: inline files: %w", err)
	}
	return nil
}

type kind uint8

const (
	kindDir kind = iota + 1
	kindSymlink
	kindOther
)

type converter struct {
	w      *erofs.Writer
	limits Limits
	// size is the sum of the regular files' declared sizes so far.
	size int64
	// xattrs holds, per inode (its first path), the encoded size of each xattr set
	// on it: hardlink entries add to their target's.
	xattrs map[string]map[string]int
	// kinds records every path of the image so far ("/a/b"), implicit parent
	// directories included.
	kinds map[string]kind
	// types holds the tar type of every entry that can be a hardlink's target.
	types map[string]byte
	// canon maps a hardlink to the entry whose inode it shares; nlink counts
	// the names of such inodes; links are the directory entries to patch.
	canon map[string]string
	nlink map[string]uint32
	links []link
}

func (c *converter) add(hdr *tar.Header, data io.Reader) error {
	p, err := clean(hdr.Name, c.limits.MaxDepth)
	if err != nil {
		return err
	}
	if err := c.parents(hdr.Name, p); err != nil {
		return err
	}
	base := path.Base(p)
	if p != "/" && strings.HasPrefix(base, whiteoutPrefix) {
		return c.whiteout(hdr.Name, p, base)
	}
	if err := checkXattrs(hdr); err != nil {
		return err
	}
	if prev, ok := c.kinds[p]; ok && !(prev == kindDir && hdr.Typeflag == tar.TypeDir) {
		return fmt.Errorf("tar entry %q replaces an earlier entry of the same layer, which go-erofs v0.3.1 cannot remove: %w", hdr.Name, errdefs.ErrNotImplemented)
	}
	if p == "/" && hdr.Typeflag != tar.TypeDir {
		return fmt.Errorf("tar entry %q: the layer's root must be a directory: %w", hdr.Name, errdefs.ErrInvalidArgument)
	}

	mode := hdr.FileInfo().Mode()
	k := kindOther
	switch hdr.Typeflag {
	case tar.TypeDir:
		k = kindDir
		if _, ok := c.kinds[p]; !ok {
			err = c.w.Mkdir(p, mode.Perm())
		}
	case tar.TypeReg:
		if err := c.checkSize(hdr); err != nil {
			return err
		}
		err = c.file(p, data)
	case tar.TypeSymlink:
		k = kindSymlink
		err = c.w.Symlink(hdr.Linkname, p)
	case tar.TypeLink:
		return c.hardlink(hdr, p)
	case tar.TypeChar, tar.TypeBlock, tar.TypeFifo:
		// EROFS keeps a device number in 32 bits, as the kernel's new_encode_dev: a 12-bit
		// major, a 20-bit minor. A larger one would be truncated (4096:0 to 0:0, a whiteout).
		if hdr.Typeflag != tar.TypeFifo && (uint64(hdr.Devmajor) > 0xfff || uint64(hdr.Devminor) > 0xfffff) {
			return fmt.Errorf("tar entry %q: device %d:%d does not fit EROFS's 12-bit major and 20-bit minor: %w",
				hdr.Name, hdr.Devmajor, hdr.Devminor, errdefs.ErrInvalidArgument)
		}
		typ := map[byte]uint32{tar.TypeChar: unix.S_IFCHR, tar.TypeBlock: unix.S_IFBLK, tar.TypeFifo: unix.S_IFIFO}[hdr.Typeflag]
		err = c.w.Mknod(p, uint16(typ), uint32(unix.Mkdev(uint32(hdr.Devmajor), uint32(hdr.Devminor))))
	case tar.TypeXGlobalHeader:
		return nil
	default:
		return fmt.Errorf("tar entry %q has type %q, which a layer cannot hold: %w", hdr.Name, hdr.Typeflag, errdefs.ErrInvalidArgument)
	}
	if err != nil {
		return fmt.Errorf("tar entry %q: %w", hdr.Name, err)
	}
	c.kinds[p] = k
	c.types[p] = hdr.Typeflag
	return c.meta(hdr, p, mode)
}

func (c *converter) file(p string, data io.Reader) error {
	f, err := c.w.Create(p)
	if err != nil {
		return err
	}
	if _, err := io.Copy(f, data); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

// meta sets what the header says about p beyond its type.
func (c *converter) meta(hdr *tar.Header, p string, mode fs.FileMode) error {
	if hdr.Typeflag != tar.TypeSymlink {
		if err := c.w.Chmod(p, mode); err != nil {
			return err
		}
	}
	// EROFS records 32-bit ids; go-erofs would truncate a larger one (1<<32 to root's 0).
	if uint64(hdr.Uid) > math.MaxUint32 || uint64(hdr.Gid) > math.MaxUint32 {
		return fmt.Errorf("tar entry %q: owner %d:%d does not fit EROFS's 32-bit ids: %w", hdr.Name, hdr.Uid, hdr.Gid, errdefs.ErrInvalidArgument)
	}
	if err := c.w.Chown(p, hdr.Uid, hdr.Gid); err != nil {
		return err
	}
	atime := hdr.AccessTime
	if atime.IsZero() {
		atime = hdr.ModTime
	}
	if err := c.w.Chtimes(p, atime, hdr.ModTime); err != nil {
		return err
	}
	for k, v := range hdr.PAXRecords {
		if name, ok := strings.CutPrefix(k, "SCHILY.xattr."); ok {
			if err := c.setxattr(hdr.Name, p, name, v); err != nil {
				return err
			}
		}
	}
	return nil
}

// checkSize refuses a regular file whose declared size, or the layer's sum of them,
// is beyond the limits, before any of its data is written.
func (c *converter) checkSize(hdr *tar.Header) error {
	if hdr.Size > c.limits.MaxFileSize {
		return fmt.Errorf("tar entry %q declares %d bytes, more than the %d a file of a layer may have: %w",
			hdr.Name, hdr.Size, c.limits.MaxFileSize, errdefs.ErrInvalidArgument)
	}
	c.size += hdr.Size
	if c.size > c.limits.MaxLayerSize {
		return fmt.Errorf("tar entry %q: the layer's files declare more than %d bytes in all: %w",
			hdr.Name, c.limits.MaxLayerSize, errdefs.ErrInvalidArgument)
	}
	return nil
}

// setxattr sets xattr name on p for the tar entry called entry, after checking that
// the inode's xattrs still fit the area EROFS can describe (checkXattrs has checked
// each name and value already).
func (c *converter) setxattr(entry, p, name, value string) error {
	sizes := c.xattrs[p]
	if sizes == nil {
		sizes = map[string]int{}
		c.xattrs[p] = sizes
	}
	// go-erofs's encoding: a 4-byte entry header, the name (less a known prefix:
	// counting all of it errs on the safe side) and the value, padded to 4 bytes.
	sizes[name] = (4 + len(name) + len(value) + 3) &^ 3
	area := 12
	for _, n := range sizes {
		area += n
	}
	if area > maxXattrArea {
		return fmt.Errorf("tar entry %q: the xattrs of %q take %d bytes, more than the %d an EROFS inode can hold: %w",
			entry, strings.TrimPrefix(p, "/"), area, maxXattrArea, errdefs.ErrInvalidArgument)
	}
	return c.w.Setxattr(p, name, value)
}

// whiteout converts an OCI whiteout entry p (base name base) to its overlay form.
func (c *converter) whiteout(name, p, base string) error {
	dir := path.Dir(p)
	if base == opaqueMarker {
		// parents() made sure dir is a directory.
		return c.setxattr(name, dir, opaqueXattr, "y")
	}
	target := strings.TrimPrefix(base, whiteoutPrefix)
	if target == "" || target == "." || target == ".." {
		return fmt.Errorf("tar entry %q: a whiteout of nothing: %w", name, errdefs.ErrInvalidArgument)
	}
	wp := path.Join(dir, target)
	if _, ok := c.kinds[wp]; ok {
		return fmt.Errorf("tar entry %q deletes %q of the same layer, which go-erofs v0.3.1 cannot remove: %w", name, wp, errdefs.ErrNotImplemented)
	}
	if err := c.w.Mknod(wp, unix.S_IFCHR, 0); err != nil {
		return fmt.Errorf("tar entry %q: %w", name, err)
	}
	c.kinds[wp] = kindOther
	return nil
}

// hardlink adds the hardlink entry p: a placeholder of its target's type now,
// its directory entry pointed at the target's inode once the image is written.
func (c *converter) hardlink(hdr *tar.Header, p string) error {
	t, err := clean(hdr.Linkname, c.limits.MaxDepth)
	if err != nil {
		return fmt.Errorf("tar entry %q: hardlink target: %w", hdr.Name, err)
	}
	switch c.kinds[t] {
	case 0:
		return fmt.Errorf("tar entry %q: hardlink target %q is not an earlier entry of the layer: %w", hdr.Name, hdr.Linkname, errdefs.ErrInvalidArgument)
	case kindDir:
		return fmt.Errorf("tar entry %q: hardlink to the directory %q: %w", hdr.Name, hdr.Linkname, errdefs.ErrInvalidArgument)
	}
	if canon, ok := c.canon[t]; ok {
		t = canon
	}
	typ, ok := c.types[t]
	if !ok {
		// A whiteout: a layer's own whiteouts cannot be linked to.
		return fmt.Errorf("tar entry %q: hardlink to the whiteout %q: %w", hdr.Name, hdr.Linkname, errdefs.ErrInvalidArgument)
	}
	k := kindOther
	switch typ {
	case tar.TypeReg:
		var f *erofs.File
		if f, err = c.w.Create(p); err == nil {
			err = f.Close()
		}
	case tar.TypeSymlink:
		k = kindSymlink
		err = c.w.Symlink("-", p)
	default:
		mode := map[byte]uint32{tar.TypeChar: unix.S_IFCHR, tar.TypeBlock: unix.S_IFBLK, tar.TypeFifo: unix.S_IFIFO}[typ]
		err = c.w.Mknod(p, uint16(mode), 0)
	}
	if err != nil {
		return fmt.Errorf("tar entry %q: %w", hdr.Name, err)
	}
	c.kinds[p] = k
	c.canon[p] = t
	if c.nlink[t] == 0 {
		c.nlink[t] = 1
	}
	c.nlink[t]++
	c.links = append(c.links, link{name: p, target: t})
	if typ == tar.TypeSymlink {
		return nil
	}
	// As containerd's archive code does, the link's header sets the shared
	// inode's metadata.
	return c.meta(hdr, t, hdr.FileInfo().Mode())
}

// parents checks every ancestor of p: each must be a directory of the layer, or
// absent; absent ones are created 0755 and root-owned, as containerd's differ
// creates them.
func (c *converter) parents(name, p string) error {
	var missing []string
	for d := path.Dir(p); d != "/"; d = path.Dir(d) {
		k := c.kinds[d]
		if k == kindDir {
			break
		}
		switch k {
		case kindSymlink:
			return fmt.Errorf("tar entry %q: its parent %q is a symlink of the layer; writing through it is refused: %w", name, strings.TrimPrefix(d, "/"), errdefs.ErrInvalidArgument)
		case kindOther:
			return fmt.Errorf("tar entry %q: its parent %q is not a directory: %w", name, strings.TrimPrefix(d, "/"), errdefs.ErrInvalidArgument)
		}
		missing = append(missing, d)
	}
	for i := len(missing) - 1; i >= 0; i-- {
		if err := c.w.Mkdir(missing[i], 0o755); err != nil {
			return fmt.Errorf("tar entry %q: %w", name, err)
		}
		c.kinds[missing[i]] = kindDir
	}
	return nil
}

// clean maps a tar name to an absolute path inside the layer ("/" is its root).
// Leading slashes are dropped, as every tar tool does; a name that leaves the
// root once cleaned, has an element longer than Linux allows, or more than
// maxDepth elements, is an error.
func clean(name string, maxDepth int) (string, error) {
	rel := path.Clean(strings.TrimLeft(name, "/"))
	if rel == ".." || strings.HasPrefix(rel, "../") {
		return "", fmt.Errorf("tar entry %q leaves the layer's root: %w", name, errdefs.ErrInvalidArgument)
	}
	if rel == "." {
		return "/", nil
	}
	// Before anything walks the path element by element (parents is quadratic in
	// its depth).
	if d := strings.Count(rel, "/") + 1; d > maxDepth {
		return "", fmt.Errorf("tar entry %q: a path %d elements deep (at most %d): %w", truncName(name), d, maxDepth, errdefs.ErrInvalidArgument)
	}
	for _, e := range strings.Split(rel, "/") {
		if len(e) > maxNameLen {
			return "", fmt.Errorf("tar entry %q: a name of %d bytes (at most %d): %w", name, len(e), maxNameLen, errdefs.ErrInvalidArgument)
		}
	}
	return "/" + rel, nil
}

// truncName shortens a name for an error message: a hostile one may be a MiB long.
func truncName(name string) string {
	const keep = 200
	if len(name) <= keep {
		return name
	}
	return fmt.Sprintf("%s...(%d bytes)", name[:keep], len(name))
}

// checkXattrs refuses xattrs go-erofs v0.3.1 cannot encode, and those it would
// encode truncated.
func checkXattrs(hdr *tar.Header) error {
	for k, v := range hdr.PAXRecords {
		name, ok := strings.CutPrefix(k, "SCHILY.xattr.")
		if !ok {
			continue
		}
		switch {
		case len(name) > maxXattrName:
			return fmt.Errorf("tar entry %q: an xattr name of %d bytes (at most %d): %w", hdr.Name, len(name), maxXattrName, errdefs.ErrInvalidArgument)
		case len(v) > maxXattrValue:
			return fmt.Errorf("tar entry %q: xattr %q has a value of %d bytes (at most %d): %w", hdr.Name, name, len(v), maxXattrValue, errdefs.ErrInvalidArgument)
		}
		switch {
		case strings.HasPrefix(name, "user."), strings.HasPrefix(name, "trusted."), strings.HasPrefix(name, "security."):
		default:
			return fmt.Errorf("tar entry %q: xattr %q, which go-erofs v0.3.1 cannot encode: %w", hdr.Name, name, errdefs.ErrNotImplemented)
		}
	}
	return nil
}

// abortable fails every write once aborted is set.
type abortable struct {
	io.WriteSeeker
	aborted bool
}

var errAborted = errors.New("image write aborted")

func (a *abortable) Write(p []byte) (int, error) {
	if a.aborted {
		return 0, errAborted
	}
	return a.WriteSeeker.Write(p)
}
