// Package copies keeps the guest's copies of the host paths a container bind-mounts
// when the pod does not share them (guest.shared_fs = "copy", or a pod from a VM
// template): the shim sends each source's tree (shim/copies), the agent writes it once
// per pod, updates it in place when the source changes, and removes it with the last
// container that mounts it.
package copies

import (
	"context"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"sync"

	"github.com/containerd/log"
	"golang.org/x/sys/unix"
)

// File is one entry of a copied tree (api/agent/v1 CopiedFile).
type File struct {
	// Path is relative to the tree's root, slash-separated; empty for the root.
	Path     string
	Mode     uint32 // st_mode: S_IFREG, S_IFDIR or S_IFLNK and permission bits
	UID, GID uint32
	Data     []byte
	Link     string
}

// Store keeps the guest copies of host bind mount sources, one per key in the
// pod, shared by the containers that mount it, and removed with the last of them.
type Store struct {
	dir string

	mu     sync.Mutex
	next   int
	copies map[string]*copied  // by key
	users  map[string][]string // keys by container id
}

type copied struct {
	path string
	refs int
}

// New returns a store of copies kept under dir.
func New(dir string) *Store {
	return &Store{dir: dir, copies: map[string]*copied{}, users: map[string][]string{}}
}

// Acquire returns the guest path of the copy of key for container id: the
// existing one, or files written anew. Release gives it back.
func (c *Store) Acquire(id, key string, files []File) (string, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	cp, ok := c.copies[key]
	if !ok {
		if err := os.MkdirAll(c.dir, 0o700); err != nil {
			return "", err
		}
		p := filepath.Join(c.dir, strconv.Itoa(c.next))
		c.next++
		if err := WriteTree(p, files); err != nil {
			os.RemoveAll(p)
			return "", fmt.Errorf("copy of %s: %w", key, err)
		}
		cp = &copied{path: p}
		c.copies[key] = cp
	}
	cp.refs++
	c.users[id] = append(c.users[id], key)
	return cp.path, nil
}

// Release gives back every copy container id acquired, removing those no other uses.
func (c *Store) Release(ctx context.Context, id string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, key := range c.users[id] {
		cp := c.copies[key]
		if cp.refs--; cp.refs > 0 {
			continue
		}
		delete(c.copies, key)
		if err := os.RemoveAll(cp.path); err != nil {
			log.G(ctx).WithError(err).WithField("key", key).Warn("remove a copied mount")
		}
	}
	delete(c.users, id)
}

// WriteTree writes files at dst, which must not exist: the first is the root (a
// regular file or a directory, empty path), and parents come before children.
// Nothing is written outside dst: paths must be local, each below a directory
// listed before it (see checkTree), and are resolved in an os.Root, which
// follows no link out of it.
func WriteTree(dst string, files []File) error {
	if err := checkTree(files); err != nil {
		return err
	}
	rootf := files[0]
	if rootf.Mode&unix.S_IFMT == unix.S_IFREG {
		if err := os.WriteFile(dst, rootf.Data, 0o600); err != nil {
			return err
		}
		return setAttrs(dst, rootf)
	}
	if err := os.Mkdir(dst, 0o700); err != nil {
		return err
	}
	root, err := os.OpenRoot(dst)
	if err != nil {
		return err
	}
	defer root.Close()
	for _, f := range files[1:] {
		switch f.Mode & unix.S_IFMT {
		case unix.S_IFREG:
			err = root.WriteFile(f.Path, f.Data, 0o600)
		case unix.S_IFDIR:
			err = root.Mkdir(f.Path, 0o700)
		case unix.S_IFLNK:
			err = root.Symlink(f.Link, f.Path)
		}
		if err != nil {
			return err
		}
		if err := root.Lchown(f.Path, int(f.UID), int(f.GID)); err != nil {
			return err
		}
		if f.Mode&unix.S_IFMT != unix.S_IFLNK {
			if err := root.Chmod(f.Path, fileMode(f.Mode)); err != nil {
				return err
			}
		}
	}
	return setAttrs(dst, rootf)
}

func setAttrs(p string, f File) error {
	if err := os.Lchown(p, int(f.UID), int(f.GID)); err != nil {
		return err
	}
	return os.Chmod(p, fileMode(f.Mode))
}

// fileMode is the permission bits of st_mode as an fs.FileMode.
func fileMode(m uint32) fs.FileMode {
	fm := fs.FileMode(m & 0o777)
	if m&unix.S_ISUID != 0 {
		fm |= fs.ModeSetuid
	}
	if m&unix.S_ISGID != 0 {
		fm |= fs.ModeSetgid
	}
	if m&unix.S_ISVTX != 0 {
		fm |= fs.ModeSticky
	}
	return fm
}
