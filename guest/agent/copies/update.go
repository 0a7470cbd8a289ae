package copies

import (
	"bytes"
	"errors"
	"fmt"
	"io/fs"
	"math/rand/v2"
	"os"
	"path"
	"path/filepath"
	"strconv"
	"syscall"

	"github.com/containerd/errdefs"
	"golang.org/x/sys/unix"
)

// Update brings the copy of key to files, the source's new content (see
// UpdateTree). A key no container holds is NotFound.
func (c *Store) Update(key string, files []File) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	cp, ok := c.copies[key]
	if !ok {
		return fmt.Errorf("copy of %s: %w", key, errdefs.ErrNotFound)
	}
	if err := UpdateTree(cp.path, files); err != nil {
		return fmt.Errorf("update the copy of %s: %w", key, err)
	}
	return nil
}

// UpdateTree brings the copy at dst, which WriteTree wrote, to files (in
// WriteTree's form) by applying the difference in place, in an order that
// keeps every path a reader can see valid:
//
//  1. directories and regular files, parents before children: a new or changed
//     file is written under a temporary name beside it, with its mode and
//     owner, then renamed over the old one, so a reader sees the old content
//     or the new, never part of it, and a file a container has open keeps its
//     old content;
//  2. symbolic links, created or retargeted the same way (a temporary link
//     renamed over the old one), so a link never points at a directory or file
//     that is not complete yet;
//  3. entries that files no longer hold, removed.
//
// A volume the kubelet's atomic writer keeps (entries that are links into
// "..data", itself a link to a "..<timestamp>" directory) therefore moves from
// one version to the next in the one rename of "..data"; a plain tree changes
// file by file, each file atomically. An entry that changes between directory
// and non-directory is removed before it is written again.
//
// A root that is a regular file is rewritten in place (new data written over
// the old, then the file cut to its length): containers see it through a bind
// mount of its inode, which a rename would not change. That one case is not
// atomic: a reader may see a mix of the two contents.
//
// Paths are checked as WriteTree's are, and each entry's parent must be a
// directory of files; everything is resolved in an os.Root of dst.
func UpdateTree(dst string, files []File) error {
	if err := checkTree(files); err != nil {
		return err
	}
	rootf := files[0]
	st, err := os.Lstat(dst)
	if err != nil {
		return err
	}
	isDir := rootf.Mode&unix.S_IFMT == unix.S_IFDIR
	if st.IsDir() != isDir || (!isDir && !st.Mode().IsRegular()) {
		return fmt.Errorf("the copy's root is a %s and the source's a %s now: %w",
			typeName(modeOf(st)), typeName(rootf.Mode), errdefs.ErrFailedPrecondition)
	}
	if !isDir {
		return rewriteFile(dst, rootf)
	}
	root, err := os.OpenRoot(dst)
	if err != nil {
		return err
	}
	defer root.Close()
	for _, f := range files[1:] {
		if f.Mode&unix.S_IFMT != unix.S_IFLNK {
			if err := updateEntry(root, f); err != nil {
				return err
			}
		}
	}
	for _, f := range files[1:] {
		if f.Mode&unix.S_IFMT == unix.S_IFLNK {
			if err := updateEntry(root, f); err != nil {
				return err
			}
		}
	}
	if err := prune(root, files); err != nil {
		return err
	}
	return setAttrsIfChanged(st, rootf, func(uid, gid int) error { return os.Lchown(dst, uid, gid) },
		func(m fs.FileMode) error { return os.Chmod(dst, m) })
}

// checkTree checks files as a tree: a root of the right type first, then
// clean, distinct paths of regular files, directories and links, each below a
// directory listed before it.
func checkTree(files []File) error {
	bad := func(f File, why string) error {
		return fmt.Errorf("copied file %q: %s: %w", f.Path, why, errdefs.ErrInvalidArgument)
	}
	if len(files) == 0 || files[0].Path != "" {
		return fmt.Errorf("copied tree has no root: %w", errdefs.ErrInvalidArgument)
	}
	switch files[0].Mode & unix.S_IFMT {
	case unix.S_IFREG:
		if len(files) > 1 {
			return bad(files[1], "the root is a regular file")
		}
		return nil
	case unix.S_IFDIR:
	default:
		return bad(files[0], "the root is neither a regular file nor a directory")
	}
	dirs := map[string]bool{".": true}
	seen := map[string]bool{}
	for _, f := range files[1:] {
		if f.Path == "" || !filepath.IsLocal(f.Path) || path.Clean(f.Path) != f.Path {
			return bad(f, "not a clean relative path")
		}
		if seen[f.Path] {
			return bad(f, "listed twice")
		}
		seen[f.Path] = true
		if !dirs[path.Dir(f.Path)] {
			return bad(f, "its parent is not a directory listed before it")
		}
		switch f.Mode & unix.S_IFMT {
		case unix.S_IFDIR:
			dirs[f.Path] = true
		case unix.S_IFREG, unix.S_IFLNK:
		default:
			return bad(f, "not a regular file, directory or symbolic link")
		}
	}
	return nil
}

// updateEntry makes f.Path in root what f says, replacing what is there.
func updateEntry(root *os.Root, f File) error {
	cur, err := root.Lstat(f.Path)
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return err
	}
	exists := err == nil
	typ := f.Mode & unix.S_IFMT
	if exists && modeOf(cur)&unix.S_IFMT == typ {
		same, err := sameContent(root, f)
		if err != nil {
			return err
		}
		if same {
			return setAttrsIfChanged(cur, f, func(uid, gid int) error { return root.Lchown(f.Path, uid, gid) },
				func(m fs.FileMode) error {
					if typ == unix.S_IFLNK {
						return nil // a link's mode means nothing
					}
					return root.Chmod(f.Path, m)
				})
		}
	}
	tmp, err := tempName(root, f.Path)
	if err != nil {
		return err
	}
	if err := writeEntry(root, tmp, f); err != nil {
		root.RemoveAll(tmp)
		return err
	}
	step()
	if exists && (cur.IsDir() || typ == unix.S_IFDIR) {
		// A rename cannot swap a directory with a non-directory (or replace a
		// non-empty one): the old entry goes first.
		if err := root.RemoveAll(f.Path); err != nil {
			root.RemoveAll(tmp)
			return err
		}
		step()
	}
	if err := root.Rename(tmp, f.Path); err != nil {
		root.RemoveAll(tmp)
		return err
	}
	step()
	return nil
}

// updateStep, when a test sets it, runs after each change UpdateTree makes
// that a reader could see, to check what the tree looks like in between.
var updateStep func()

func step() {
	if updateStep != nil {
		updateStep()
	}
}

// sameContent reports whether the entry at f.Path, of f's type, holds f's
// data or link target.
func sameContent(root *os.Root, f File) (bool, error) {
	switch f.Mode & unix.S_IFMT {
	case unix.S_IFREG:
		b, err := root.ReadFile(f.Path)
		return err == nil && bytes.Equal(b, f.Data), err
	case unix.S_IFLNK:
		l, err := root.Readlink(f.Path)
		return err == nil && l == f.Link, err
	}
	return true, nil // a directory's content is its entries
}

// writeEntry creates f at name, complete with its mode and owner.
func writeEntry(root *os.Root, name string, f File) error {
	switch f.Mode & unix.S_IFMT {
	case unix.S_IFDIR:
		if err := root.Mkdir(name, 0o700); err != nil {
			return err
		}
	case unix.S_IFLNK:
		if err := root.Symlink(f.Link, name); err != nil {
			return err
		}
		return root.Lchown(name, int(f.UID), int(f.GID))
	case unix.S_IFREG:
		w, err := root.OpenFile(name, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
		if err != nil {
			return err
		}
		_, err = w.Write(f.Data)
		if cerr := w.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			return err
		}
	}
	if err := root.Lchown(name, int(f.UID), int(f.GID)); err != nil {
		return err
	}
	return root.Chmod(name, fileMode(f.Mode))
}

// tempName returns a name beside p that nothing holds.
func tempName(root *os.Root, p string) (string, error) {
	for range 8 {
		// Not crypto/rand: its first use can block until the guest kernel's
		// random pool is ready, a second or more under TCG.
		name := path.Join(path.Dir(p), "..caisson_tmp_"+strconv.FormatUint(rand.Uint64(), 36))
		if _, err := root.Lstat(name); errors.Is(err, fs.ErrNotExist) {
			return name, nil
		}
	}
	return "", fmt.Errorf("no free temporary name beside %q", p)
}

// prune removes every entry of root that files do not hold, without
// following links.
func prune(root *os.Root, files []File) error {
	want := make(map[string]bool, len(files))
	for _, f := range files {
		want[f.Path] = true
	}
	return fs.WalkDir(root.FS(), ".", func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if p == "." || want[p] {
			return nil
		}
		if err := root.RemoveAll(p); err != nil {
			return err
		}
		step()
		if d.IsDir() {
			return fs.SkipDir
		}
		return nil
	})
}

// rewriteFile writes f's data over the regular file p in place (keeping its
// inode), then cuts it to length, and sets its mode and owner.
func rewriteFile(p string, f File) error {
	old, err := os.ReadFile(p)
	if err != nil {
		return err
	}
	if !bytes.Equal(old, f.Data) {
		w, err := os.OpenFile(p, os.O_WRONLY|unix.O_NOFOLLOW, 0)
		if err != nil {
			return err
		}
		_, err = w.WriteAt(f.Data, 0)
		if err == nil {
			err = w.Truncate(int64(len(f.Data)))
		}
		if cerr := w.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			return err
		}
	}
	st, err := os.Lstat(p)
	if err != nil {
		return err
	}
	return setAttrsIfChanged(st, f, func(uid, gid int) error { return os.Lchown(p, uid, gid) },
		func(m fs.FileMode) error { return os.Chmod(p, m) })
}

// setAttrsIfChanged sets f's owner and permission bits on the entry cur
// describes, through chown and chmod, where they differ.
func setAttrsIfChanged(cur fs.FileInfo, f File, chown func(uid, gid int) error, chmod func(fs.FileMode) error) error {
	st, ok := cur.Sys().(*syscall.Stat_t)
	if !ok {
		return fmt.Errorf("no owner for %q", f.Path)
	}
	if st.Uid != f.UID || st.Gid != f.GID {
		if err := chown(int(f.UID), int(f.GID)); err != nil {
			return err
		}
	}
	// chown clears setuid and setgid: compare with what it left.
	if st.Mode&^unix.S_IFMT != f.Mode&^unix.S_IFMT || st.Uid != f.UID || st.Gid != f.GID {
		return chmod(fileMode(f.Mode))
	}
	return nil
}

func modeOf(fi fs.FileInfo) uint32 {
	if st, ok := fi.Sys().(*syscall.Stat_t); ok {
		return st.Mode
	}
	return 0
}

func typeName(m uint32) string {
	switch m & unix.S_IFMT {
	case unix.S_IFREG:
		return "regular file"
	case unix.S_IFDIR:
		return "directory"
	case unix.S_IFLNK:
		return "symbolic link"
	}
	return "special file"
}
