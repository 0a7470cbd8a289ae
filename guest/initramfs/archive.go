// Package initramfs builds the guest's initramfs: an LZ4-compressed (legacy format) newc
// cpio archive whose bytes depend only on its contents (entries sorted by name, every
// timestamp zero, owner root, inode numbers in order).
package initramfs

import (
	"fmt"
	"io"
	"os"
	"path"
	"sort"
	"strings"

	"github.com/cavaliergopher/cpio"
	"github.com/containerd/errdefs"
)

type entry struct {
	mode   cpio.FileMode // type and permission bits
	data   []byte        // a regular file's content
	source string        // or the host file to read it from
	link   string        // a symlink's target
}

// Archive is the set of entries of an initramfs. Parent directories are added as needed
// (mode 0755). It has no device nodes: the agent mounts devtmpfs on /dev first thing.
type Archive struct {
	entries map[string]entry
}

// NewArchive returns an empty archive.
func NewArchive() *Archive {
	return &Archive{entries: map[string]entry{}}
}

func (a *Archive) add(name string, e entry) error {
	name = strings.TrimPrefix(path.Clean("/"+name), "/")
	if name == "" {
		return fmt.Errorf("initramfs entry with an empty name: %w", errdefs.ErrInvalidArgument)
	}
	if old, ok := a.entries[name]; ok {
		if old.mode&cpio.ModeType == cpio.TypeDir && e.mode&cpio.ModeType == cpio.TypeDir {
			return nil
		}
		return fmt.Errorf("initramfs entry %q added twice: %w", name, errdefs.ErrAlreadyExists)
	}
	if dir := path.Dir(name); dir != "." {
		if err := a.add(dir, entry{mode: cpio.TypeDir | 0o755}); err != nil {
			return err
		}
	}
	a.entries[name] = e
	return nil
}

// Dir adds a directory.
func (a *Archive) Dir(name string, perm os.FileMode) error {
	return a.add(name, entry{mode: cpio.TypeDir | cpio.FileMode(perm.Perm())})
}

// File adds a regular file with the given content.
func (a *Archive) File(name string, perm os.FileMode, data []byte) error {
	return a.add(name, entry{mode: cpio.TypeReg | cpio.FileMode(perm.Perm()), data: data})
}

// CopyFile adds a regular file whose content is the host file src, read when the archive
// is written.
func (a *Archive) CopyFile(name string, perm os.FileMode, src string) error {
	if _, err := os.Stat(src); err != nil {
		return err
	}
	return a.add(name, entry{mode: cpio.TypeReg | cpio.FileMode(perm.Perm()), source: src})
}

// Symlink adds a symbolic link to target.
func (a *Archive) Symlink(name, target string) error {
	return a.add(name, entry{mode: cpio.TypeSymlink | 0o777, link: target})
}

// WriteTo writes the archive, LZ4-compressed, to w.
func (a *Archive) WriteTo(w io.Writer) (int64, error) {
	cw := &countingWriter{w: w}
	zw := newLZ4Writer(cw)
	cp := cpio.NewWriter(zw)
	names := make([]string, 0, len(a.entries))
	for n := range a.entries {
		names = append(names, n)
	}
	sort.Strings(names)
	var err error
	for i, name := range names {
		e := a.entries[name]
		data := e.data
		if e.source != "" {
			if data, err = os.ReadFile(e.source); err != nil {
				return cw.n, err
			}
		}
		hdr := &cpio.Header{Name: name, Mode: e.mode, Links: 1, Inode: int64(i + 1)}
		switch e.mode & cpio.ModeType {
		case cpio.TypeDir:
			hdr.Links = 2
		case cpio.TypeSymlink:
			data = []byte(e.link)
		}
		hdr.Size = int64(len(data))
		if err := cp.WriteHeader(hdr); err != nil {
			return cw.n, fmt.Errorf("initramfs %s: %w", name, err)
		}
		if _, err := cp.Write(data); err != nil {
			return cw.n, fmt.Errorf("initramfs %s: %w", name, err)
		}
	}
	if err := cp.Close(); err != nil {
		return cw.n, err
	}
	if err := zw.Close(); err != nil {
		return cw.n, err
	}
	return cw.n, nil
}

type countingWriter struct {
	w io.Writer
	n int64
}

func (c *countingWriter) Write(p []byte) (int, error) {
	n, err := c.w.Write(p)
	c.n += int64(n)
	return n, err
}
