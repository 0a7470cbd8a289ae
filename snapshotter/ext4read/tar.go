package ext4read

import (
	"archive/tar"
	"context"
	"fmt"
	"io"
	"path"
	"sort"
	"strings"
	"time"

	"github.com/containerd/errdefs"
	"github.com/containerd/log"
)

// Format is how WriteTar writes an overlay upper directory.
type Format int

const (
	// FormatOverlay writes the directory as it is, for tarerofs: overlay
	// whiteouts stay 0/0 character devices, every xattr is kept (opaque
	// markers, overlayfs's bookkeeping, ACLs), mtimes to the nanosecond. This is
	// what mkfs.erofs made of the mounted directory.
	FormatOverlay Format = iota
	// FormatOCI writes an OCI layer diff, as containerd's archive.ChangeWriter
	// writes the diff of an overlay upper directory (fs.DiffSourceOverlayFS): a
	// whiteout is an empty ".wh.NAME" file dated 1970, an opaque directory is
	// followed by its ".wh..wh..opq", trusted.overlay.* xattrs are dropped,
	// mtimes are cut to the second. Of the other xattrs only
	// security.capability is kept, as containerd keeps it, unless AllXattrs.
	FormatOCI
)

// TarOptions configure WriteTar.
type TarOptions struct {
	Format Format
	// AllXattrs, with FormatOCI, keeps every xattr but trusted.overlay.*.
	AllXattrs bool
	// MaxModTime, with FormatOCI, if set, is the latest mtime written: later
	// ones are clamped to it (containerd's diff.WithSourceDateEpoch).
	MaxModTime *time.Time
	// MaxFileSize bounds a regular file's size, MaxLayerSize the sum of them
	// (a file's size is what its inode claims: a sparse file counts whole).
	// Zero means DefaultMaxFileSize and DefaultMaxLayerSize.
	MaxFileSize, MaxLayerSize int64
}

const (
	// DefaultMaxFileSize and DefaultMaxLayerSize are a layer's limits (tarerofs).
	DefaultMaxFileSize  = 64 << 30
	DefaultMaxLayerSize = 256 << 30

	whiteoutPrefix = ".wh."
	opaqueMarker   = ".wh..wh..opq"
	opaqueXattr    = "trusted.overlay.opaque"
	paxXattr       = "SCHILY.xattr."
)

// WriteTar writes the tree below the directory dir of f to w as a tar stream,
// in Walk's order, ending it with the end-of-archive marker. Errors name the
// entry. Sockets are left out (a tar cannot hold them; containerd's diff skips
// them too).
func WriteTar(ctx context.Context, f *FS, dir *Inode, w io.Writer, opts TarOptions) error {
	if opts.MaxFileSize <= 0 {
		opts.MaxFileSize = DefaultMaxFileSize
	}
	if opts.MaxLayerSize <= 0 {
		opts.MaxLayerSize = DefaultMaxLayerSize
	}
	tw := tar.NewWriter(w)
	t := &tarWriter{ctx: ctx, f: f, tw: tw, opts: opts, links: map[uint32]string{}}
	if err := f.Walk(ctx, dir, t.entry); err != nil {
		return err
	}
	return tw.Close()
}

type tarWriter struct {
	ctx   context.Context
	f     *FS
	tw    *tar.Writer
	opts  TarOptions
	links map[uint32]string // inode → the tar name of its first non-directory entry
	total int64
}

func (t *tarWriter) entry(p string, in *Inode) error {
	oci := t.opts.Format == FormatOCI
	base := path.Base(p)
	if in.Type() == TypeChar && in.Major == 0 && in.Minor == 0 {
		// An overlay whiteout. (overlayfs links whiteouts to one shared
		// inode: never write them as hardlinks, which a layer may not have.)
		if !oci {
			hdr := &tar.Header{Typeflag: tar.TypeChar, Name: p}
			if err := t.header(p, in, hdr, nil); err != nil {
				return err
			}
			return t.write(p, hdr, nil)
		}
		epoch := time.Unix(0, 0).UTC()
		return t.write(p, &tar.Header{Typeflag: tar.TypeReg, Name: path.Join(path.Dir(p), whiteoutPrefix+base),
			ModTime: epoch, AccessTime: epoch, ChangeTime: epoch, Format: tar.FormatPAX}, nil)
	}
	if strings.HasPrefix(base, whiteoutPrefix) {
		// Read back from a tar, the name would be a whiteout, not this entry.
		return fmt.Errorf("%s: a name starting with %q cannot be written to a layer tar: %w", p, whiteoutPrefix, errdefs.ErrNotImplemented)
	}
	hdr := &tar.Header{Name: p}
	var data io.Reader
	switch in.Type() {
	case TypeDir:
		hdr.Typeflag = tar.TypeDir
		hdr.Name += "/"
	case TypeReg:
		if first, ok := t.links[in.Ino]; ok {
			hdr.Typeflag, hdr.Linkname = tar.TypeLink, first
			break
		}
		if in.Size > t.opts.MaxFileSize {
			return fmt.Errorf("%s: a file of %d bytes (at most %d): %w", p, in.Size, t.opts.MaxFileSize, errdefs.ErrInvalidArgument)
		}
		if t.total += in.Size; t.total > t.opts.MaxLayerSize {
			return fmt.Errorf("%s: the files hold more than %d bytes: %w", p, t.opts.MaxLayerSize, errdefs.ErrInvalidArgument)
		}
		hdr.Typeflag, hdr.Size = tar.TypeReg, in.Size
		r, err := t.f.Open(in)
		if err != nil {
			return fmt.Errorf("%s: %w", p, err)
		}
		data = r
	case TypeLink:
		if first, ok := t.links[in.Ino]; ok {
			hdr.Typeflag, hdr.Linkname = tar.TypeLink, first
			break
		}
		target, err := t.f.Readlink(in)
		if err != nil {
			return fmt.Errorf("%s: %w", p, err)
		}
		hdr.Typeflag, hdr.Linkname = tar.TypeSymlink, target
	case TypeChar, TypeBlock, TypeFIFO:
		if first, ok := t.links[in.Ino]; ok {
			hdr.Typeflag, hdr.Linkname = tar.TypeLink, first
			break
		}
		hdr.Typeflag = map[uint32]byte{TypeChar: tar.TypeChar, TypeBlock: tar.TypeBlock, TypeFIFO: tar.TypeFifo}[in.Type()]
	case TypeSocket:
		log.G(t.ctx).WithField("path", p).Debug("ext4read: a socket is left out of the layer tar")
		return nil
	}
	if in.Type() != TypeDir && hdr.Typeflag != tar.TypeLink {
		t.links[in.Ino] = p
	}
	var opaque bool
	if err := t.header(p, in, hdr, &opaque); err != nil {
		return err
	}
	if err := t.write(p, hdr, data); err != nil {
		return err
	}
	if oci && opaque {
		epoch := time.Unix(0, 0).UTC()
		return t.write(p, &tar.Header{Typeflag: tar.TypeReg, Name: path.Join(p, opaqueMarker),
			ModTime: epoch, AccessTime: epoch, ChangeTime: epoch, Format: tar.FormatPAX}, nil)
	}
	return nil
}

// header fills hdr's metadata from in: mode, owner, mtime, device numbers, xattrs.
func (t *tarWriter) header(p string, in *Inode, hdr *tar.Header, opaque *bool) error {
	oci := t.opts.Format == FormatOCI
	hdr.Format = tar.FormatPAX
	hdr.Mode = int64(in.Mode & 0o7777)
	hdr.Uid, hdr.Gid = int(in.UID), int(in.GID)
	hdr.ModTime = in.Mtime
	if oci {
		if m := t.opts.MaxModTime; m != nil && hdr.ModTime.After(*m) {
			hdr.ModTime = *m
		}
		hdr.ModTime = hdr.ModTime.Truncate(time.Second)
	}
	if hdr.Typeflag == tar.TypeChar || hdr.Typeflag == tar.TypeBlock {
		hdr.Devmajor, hdr.Devminor = int64(in.Major), int64(in.Minor)
	}
	if hdr.Typeflag == tar.TypeLink {
		// A hardlink's metadata is its target's; the entry has no data.
		hdr.Size = 0
	}
	xattrs, err := t.f.Xattrs(in)
	if err != nil {
		return fmt.Errorf("%s: %w", p, err)
	}
	names := make([]string, 0, len(xattrs))
	for n := range xattrs {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		v := xattrs[n]
		if oci {
			if n == opaqueXattr && opaque != nil && in.Type() == TypeDir && string(v) == "y" {
				*opaque = true
			}
			if strings.HasPrefix(n, "trusted.overlay.") || (!t.opts.AllXattrs && n != "security.capability") {
				continue
			}
		}
		if hdr.PAXRecords == nil {
			hdr.PAXRecords = map[string]string{}
		}
		hdr.PAXRecords[paxXattr+n] = string(v)
	}
	return nil
}

func (t *tarWriter) write(p string, hdr *tar.Header, data io.Reader) error {
	if err := t.tw.WriteHeader(hdr); err != nil {
		return fmt.Errorf("%s: tar header: %w", p, err)
	}
	if data == nil {
		return nil
	}
	n, err := io.Copy(t.tw, data)
	if err != nil {
		return fmt.Errorf("%s: %w", p, err)
	}
	if n != hdr.Size {
		return fmt.Errorf("%s: read %d of %d bytes: %w", p, n, hdr.Size, errdefs.ErrInvalidArgument)
	}
	return nil
}
