// Package copies is the shim's side of copied mounts: a host path a container
// bind-mounts, when the pod does not share host paths with its VM (guest.shared_fs =
// "copy", or a pod from a VM template), is read here (Tree) and sent with the
// container's create; the agent keeps the guest's copy (guest/agent/copies). A Watcher
// sends the source again when it changes on the host.
package copies

import (
	"crypto/sha256"
	"encoding/binary"
	"fmt"
	"hash"
	"io/fs"
	"os"
	"path/filepath"
	"syscall"

	"github.com/containerd/errdefs"

	agent "github.com/caisson-containers/caisson/api/agent/v1"
)

// Tree reads the bind mount source src, a regular file or a tree of regular
// files, directories and symbolic links (not followed), as CopiedFiles, parents
// before children, the root first with an empty path, and the signature of what
// it read (see treeSignature), taken before the content. The content of its
// files and the targets of its links together may not exceed limit bytes (an
// *overLimitError); sockets, devices and fifos are refused. Errors name the path
// and the reason.
func Tree(src string, limit int64) ([]*agent.CopiedFile, Signature, error) {
	var (
		files []*agent.CopiedFile
		size  int64 // content bytes so far; past limit, only counted
	)
	root, sig, err := walkTree(src, func(e treeEntry) error {
		f := &agent.CopiedFile{Path: e.rel, Mode: e.st.Mode, Uid: e.st.Uid, Gid: e.st.Gid, Link: e.link}
		switch m := e.info.Mode(); {
		case m.IsDir():
		case m.IsRegular():
			if size += e.info.Size(); size > limit {
				return nil
			}
			var err error
			if f.Data, err = os.ReadFile(e.path); err != nil {
				return fmt.Errorf("cannot read %s: %w", e.path, err)
			}
			size += int64(len(f.Data)) - e.info.Size() // it may have changed since
		case m&fs.ModeSymlink != 0:
			size += int64(len(f.Link))
		}
		files = append(files, f)
		return nil
	})
	if err != nil {
		return nil, Signature{}, err
	}
	if size > limit {
		return nil, Signature{}, &overLimitError{path: root, size: size, limit: limit}
	}
	return files, sig, nil
}

// overLimitError is a source holding more than the copy limit.
type overLimitError struct {
	path        string
	size, limit int64
}

func (e *overLimitError) Error() string {
	return fmt.Sprintf("%s holds %d bytes, over the %d bytes copied into the VM at most (guest.copied_mount_limit_bytes): %v",
		e.path, e.size, e.limit, errdefs.ErrInvalidArgument)
}

func (e *overLimitError) Unwrap() error { return errdefs.ErrInvalidArgument }

// Signature sums up what a tree looks like without reading its files: the path
// the source resolves to, and each entry's path, type, mode, owner, size,
// modification and change times, inode and link target. A file written, a link
// swapped, an entry added, removed or replaced changes it.
type Signature [sha256.Size]byte

// treeSignature returns the signature of src, as Tree would take it.
func treeSignature(src string) (Signature, error) {
	_, sig, err := walkTree(src, func(treeEntry) error { return nil })
	return sig, err
}

// treeEntry is an entry of a walked tree.
type treeEntry struct {
	rel  string // slash-separated, relative to the root; empty for the root
	path string
	info fs.FileInfo
	st   *syscall.Stat_t
	link string // a symbolic link's target
}

// walkTree resolves src, walks it (parents before children, links not
// followed), refuses what cannot be copied, and calls fn for each entry,
// returning the resolved root and the tree's signature. Errors wrap
// errdefs.ErrInvalidArgument.
func walkTree(src string, fn func(treeEntry) error) (string, Signature, error) {
	root, err := filepath.EvalSymlinks(src)
	if err != nil {
		return "", Signature{}, fmt.Errorf("cannot read %s: %w: %w", src, err, errdefs.ErrInvalidArgument)
	}
	h := sha256.New()
	h.Write([]byte(root))
	err = filepath.WalkDir(root, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return fmt.Errorf("cannot read %s: %w", path, err)
		}
		rel, err := filepath.Rel(root, path)
		if err != nil {
			return err
		}
		if rel == "." {
			rel = ""
		}
		e := treeEntry{rel: filepath.ToSlash(rel), path: path}
		if e.info, err = d.Info(); err != nil {
			return fmt.Errorf("cannot read %s: %w", path, err)
		}
		var ok bool
		if e.st, ok = e.info.Sys().(*syscall.Stat_t); !ok {
			return fmt.Errorf("cannot read the owner of %s", path)
		}
		switch m := e.info.Mode(); {
		case m.IsDir(), m.IsRegular():
		case m&fs.ModeSymlink != 0:
			if e.link, err = os.Readlink(path); err != nil {
				return fmt.Errorf("cannot read %s: %w", path, err)
			}
		default:
			return fmt.Errorf("%s is a %s, which cannot be copied into the VM (only regular files, directories and symbolic links can)",
				path, fileType(m))
		}
		sign(h, e)
		return fn(e)
	})
	if err != nil {
		return "", Signature{}, fmt.Errorf("%w: %w", err, errdefs.ErrInvalidArgument)
	}
	var sig Signature
	h.Sum(sig[:0])
	return root, sig, nil
}

func sign(h hash.Hash, e treeEntry) {
	var b [8 * 9]byte
	for i, v := range []uint64{uint64(len(e.rel)), uint64(e.st.Mode), uint64(e.st.Uid)<<32 | uint64(e.st.Gid), uint64(e.st.Size),
		uint64(e.st.Mtim.Nano()), uint64(e.st.Ctim.Nano()), e.st.Ino, e.st.Dev, uint64(len(e.link))} {
		binary.LittleEndian.PutUint64(b[8*i:], v)
	}
	h.Write(b[:])
	h.Write([]byte(e.rel))
	h.Write([]byte(e.link))
}

func fileType(m fs.FileMode) string {
	switch {
	case m&fs.ModeSocket != 0:
		return "socket"
	case m&fs.ModeNamedPipe != 0:
		return "fifo"
	case m&fs.ModeCharDevice != 0:
		return "character device"
	case m&fs.ModeDevice != 0:
		return "block device"
	}
	return "special file"
}
