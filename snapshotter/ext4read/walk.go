package ext4read

import (
	"context"
	"fmt"
	"path"
	"sort"
	"strings"

	"github.com/containerd/errdefs"
)

// Lookup returns the inode at p, a slash-separated path from the image's root,
// following no symlink. A missing element is errdefs.ErrNotFound.
func (f *FS) Lookup(p string) (_ *Inode, retErr error) {
	defer catch(&retErr)
	in, err := f.Inode(rootIno)
	if err != nil {
		return nil, fmt.Errorf("root directory: %w", err)
	}
	for _, name := range strings.Split(strings.Trim(path.Clean("/"+p), "/"), "/") {
		if name == "" {
			continue
		}
		if in.Type() != TypeDir {
			return nil, fmt.Errorf("%s: %q is not a directory: %w", p, name, errdefs.ErrFailedPrecondition)
		}
		entries, err := f.ReadDir(in)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", p, err)
		}
		var next uint32
		for _, e := range entries {
			if e.Name == name {
				next = e.Ino
				break
			}
		}
		if next == 0 {
			return nil, fmt.Errorf("%s: %w", p, errdefs.ErrNotFound)
		}
		if in, err = f.Inode(next); err != nil {
			return nil, fmt.Errorf("%s: %w", p, err)
		}
	}
	return in, nil
}

// WalkFunc is called for each entry: p is its path relative to the walked
// directory ("a/b"), in its inode.
type WalkFunc func(p string, in *Inode) error

// Walk calls fn for every entry below the directory dir, parents before their
// children, each directory's entries in byte order of their names (as
// filepath.Walk). A directory met twice (a directory hardlink or a loop) is an
// error, as are more than Limits.MaxEntries entries or a path deeper than
// Limits.MaxDepth; errors name the entry's path.
func (f *FS) Walk(ctx context.Context, dir *Inode, fn WalkFunc) (retErr error) {
	defer catch(&retErr)
	w := &walker{f: f, fn: fn, ctx: ctx, dirs: map[uint32]bool{dir.Ino: true}}
	return w.dir("", dir, 0)
}

type walker struct {
	f       *FS
	fn      WalkFunc
	ctx     context.Context
	dirs    map[uint32]bool
	entries int
}

func (w *walker) dir(p string, in *Inode, depth int) error {
	if err := w.ctx.Err(); err != nil {
		return err
	}
	entries, err := w.f.ReadDir(in)
	if err != nil {
		return fmt.Errorf("%s: %w", displayPath(p), err)
	}
	sort.Slice(entries, func(i, j int) bool { return entries[i].Name < entries[j].Name })
	if depth+1 > w.f.limits.MaxDepth {
		if len(entries) > 0 {
			return fmt.Errorf("%s: %w", path.Join(p, entries[0].Name), invalid("a path %d elements deep (at most %d)", depth+1, w.f.limits.MaxDepth))
		}
		return nil
	}
	for _, e := range entries {
		cp := path.Join(p, e.Name)
		if w.entries++; w.entries > w.f.limits.MaxEntries {
			return fmt.Errorf("%s: %w", cp, invalid("more than %d entries", w.f.limits.MaxEntries))
		}
		child, err := w.f.Inode(e.Ino)
		if err != nil {
			return fmt.Errorf("%s: %w", cp, err)
		}
		if child.Type() == TypeDir {
			if w.dirs[child.Ino] {
				return fmt.Errorf("%s: %w", cp, invalid("directory inode %d is reached twice (a directory hardlink or loop)", child.Ino))
			}
			w.dirs[child.Ino] = true
		}
		if err := w.fn(cp, child); err != nil {
			return err
		}
		if child.Type() == TypeDir {
			if err := w.dir(cp, child, depth+1); err != nil {
				return err
			}
		}
	}
	return nil
}

func displayPath(p string) string {
	if p == "" {
		return "."
	}
	return p
}
