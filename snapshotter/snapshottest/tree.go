// Package snapshottest checks that a mounted filesystem shows exactly an expected
// tree: types, modes (setuid/setgid/sticky too), ownership, contents, symlink
// targets, device numbers, xattrs, mtimes and hardlinks. It needs only the
// standard library and x/sys, so a test binary built for the guest can run the
// same check on a layer mounted inside a VM.
package snapshottest

import (
	"bytes"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// Entry is one expected path.
type Entry struct {
	// Path is slash-separated and relative to the tree's root ("." is the root).
	Path string
	// Mode holds the type bits (fs.ModeDir, fs.ModeSymlink, fs.ModeDevice|
	// fs.ModeCharDevice, ...), the permission bits and fs.ModeSetuid,
	// fs.ModeSetgid, fs.ModeSticky. A regular file has no type bits.
	Mode     fs.FileMode
	UID, GID int
	// Data is a regular file's whole content.
	Data []byte
	// Target is a symlink's target.
	Target string
	// Major and Minor are a device node's numbers.
	Major, Minor uint32
	// Xattrs are compared exactly, apart from overlayfs's bookkeeping
	// attributes (IgnoredXattr).
	Xattrs map[string]string
	// ModTime, if not zero, must equal the mtime to the second.
	ModTime time.Time
	// Link, if set, names another entry this one must be a hardlink of.
	Link string
}

// Whiteout is an overlay whiteout for path: a 0/0 character device.
func Whiteout(path string) Entry {
	return Entry{Path: path, Mode: fs.ModeDevice | fs.ModeCharDevice}
}

// IgnoredXattr reports xattrs that overlayfs adds for its own bookkeeping while
// it writes an upper directory; they are not part of a layer's content.
func IgnoredXattr(name string) bool {
	switch name {
	case "trusted.overlay.origin", "trusted.overlay.impure", "trusted.overlay.nlink", "trusted.overlay.upper", "trusted.overlay.uuid":
		return true
	}
	return false
}

// Check compares the tree at root with want and returns every difference found
// (nil if none). Paths under root that want does not list are differences too;
// the root itself is checked only if want names ".".
func Check(root string, want []Entry) error {
	var errs []error
	byPath := map[string]Entry{}
	for _, e := range want {
		byPath[clean(e.Path)] = e
	}
	seen := map[string]bool{}
	inodes := map[string]uint64{}
	err := filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			errs = append(errs, err)
			return nil
		}
		rel, err := filepath.Rel(root, p)
		if err != nil {
			return err
		}
		rel = filepath.ToSlash(rel)
		var st unix.Stat_t
		if err := unix.Lstat(p, &st); err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", rel, err))
			return nil
		}
		inodes[rel] = st.Ino
		e, ok := byPath[rel]
		if !ok {
			if rel != "." {
				errs = append(errs, fmt.Errorf("%s: unexpected %s", rel, describe(p, &st)))
			}
			return nil
		}
		seen[rel] = true
		errs = append(errs, compare(p, rel, e, &st)...)
		return nil
	})
	if err != nil {
		errs = append(errs, err)
	}
	// Hardlinks, once every inode is known.
	for _, e := range want {
		if e.Link == "" {
			continue
		}
		a, okA := inodes[clean(e.Path)]
		b, okB := inodes[clean(e.Link)]
		if okA && okB && a != b {
			errs = append(errs, fmt.Errorf("%s: not a hardlink of %s", e.Path, e.Link))
		}
	}
	var missing []string
	for p := range byPath {
		if !seen[p] && p != "." {
			missing = append(missing, p)
		}
	}
	sort.Strings(missing)
	for _, p := range missing {
		errs = append(errs, fmt.Errorf("%s: missing", p))
	}
	return errors.Join(errs...)
}

func clean(p string) string {
	p = strings.TrimPrefix(filepath.ToSlash(filepath.Clean("/"+p)), "/")
	if p == "" {
		return "."
	}
	return p
}

func fileMode(st *unix.Stat_t) fs.FileMode {
	m := fs.FileMode(st.Mode & 0o777)
	switch st.Mode & unix.S_IFMT {
	case unix.S_IFDIR:
		m |= fs.ModeDir
	case unix.S_IFLNK:
		m |= fs.ModeSymlink
	case unix.S_IFCHR:
		m |= fs.ModeDevice | fs.ModeCharDevice
	case unix.S_IFBLK:
		m |= fs.ModeDevice
	case unix.S_IFIFO:
		m |= fs.ModeNamedPipe
	case unix.S_IFSOCK:
		m |= fs.ModeSocket
	}
	if st.Mode&unix.S_ISUID != 0 {
		m |= fs.ModeSetuid
	}
	if st.Mode&unix.S_ISGID != 0 {
		m |= fs.ModeSetgid
	}
	if st.Mode&unix.S_ISVTX != 0 {
		m |= fs.ModeSticky
	}
	return m
}

func describe(p string, st *unix.Stat_t) string {
	return fmt.Sprintf("%v uid=%d gid=%d size=%d", fileMode(st), st.Uid, st.Gid, st.Size)
}

func compare(p, rel string, e Entry, st *unix.Stat_t) []error {
	var errs []error
	bad := func(format string, args ...any) {
		errs = append(errs, fmt.Errorf("%s: "+format, append([]any{rel}, args...)...))
	}
	if got := fileMode(st); got != e.Mode {
		bad("mode %v, want %v", got, e.Mode)
		return errs
	}
	if int(st.Uid) != e.UID || int(st.Gid) != e.GID {
		bad("owner %d:%d, want %d:%d", st.Uid, st.Gid, e.UID, e.GID)
	}
	switch {
	case e.Mode.IsRegular():
		if st.Size != int64(len(e.Data)) {
			bad("size %d, want %d", st.Size, len(e.Data))
		} else if got, err := fileDigest(p); err != nil {
			bad("read: %v", err)
		} else if got != sha256.Sum256(e.Data) {
			bad("content differs")
		}
	case e.Mode&fs.ModeSymlink != 0:
		if got, err := os.Readlink(p); err != nil || got != e.Target {
			bad("symlink target %q (%v), want %q", got, err, e.Target)
		}
	case e.Mode&fs.ModeDevice != 0:
		if maj, mnr := unix.Major(st.Rdev), unix.Minor(st.Rdev); maj != e.Major || mnr != e.Minor {
			bad("device %d:%d, want %d:%d", maj, mnr, e.Major, e.Minor)
		}
	}
	if !e.ModTime.IsZero() && st.Mtim.Sec != e.ModTime.Unix() {
		bad("mtime %v, want %v", time.Unix(st.Mtim.Sec, 0).UTC(), e.ModTime.UTC())
	}
	got, err := xattrs(p)
	if err != nil {
		bad("xattrs: %v", err)
	} else if !equalXattrs(got, e.Xattrs) {
		bad("xattrs %v, want %v", got, e.Xattrs)
	}
	return errs
}

func fileDigest(p string) ([32]byte, error) {
	f, err := os.Open(p)
	if err != nil {
		return [32]byte{}, err
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return [32]byte{}, err
	}
	var sum [32]byte
	copy(sum[:], h.Sum(nil))
	return sum, nil
}

func xattrs(p string) (map[string]string, error) {
	buf := make([]byte, 64<<10)
	n, err := unix.Llistxattr(p, buf)
	if err != nil {
		if errors.Is(err, unix.ENOTSUP) {
			return nil, nil
		}
		return nil, err
	}
	out := map[string]string{}
	for _, name := range bytes.Split(buf[:n], []byte{0}) {
		if len(name) == 0 || IgnoredXattr(string(name)) {
			continue
		}
		v := make([]byte, 64<<10)
		m, err := unix.Lgetxattr(p, string(name), v)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", name, err)
		}
		out[string(name)] = string(v[:m])
	}
	return out, nil
}

func equalXattrs(a, b map[string]string) bool {
	if len(a) != len(b) {
		return false
	}
	for k, v := range a {
		if w, ok := b[k]; !ok || w != v {
			return false
		}
	}
	return true
}
