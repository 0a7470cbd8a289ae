package task

import (
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"syscall"

	"github.com/containerd/errdefs"

	agent "github.com/caisson-containers/caisson/api/agent/v1"
)

// copyTree reads the bind mount source src, a regular file or a tree of regular
// files, directories and symbolic links (not followed), as CopiedFiles, parents
// before children, the root first with an empty path. The content of its files
// and the targets of its links together may not exceed limit bytes; sockets,
// devices and fifos are refused. Errors name the path and the reason.
func copyTree(src string, limit int64) ([]*agent.CopiedFile, error) {
	root, err := filepath.EvalSymlinks(src)
	if err != nil {
		return nil, fmt.Errorf("cannot read %s: %w: %w", src, err, errdefs.ErrInvalidArgument)
	}
	var (
		files []*agent.CopiedFile
		size  int64 // content bytes so far; past limit, only counted
	)
	src = root
	err = filepath.WalkDir(src, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return fmt.Errorf("cannot read %s: %w", path, err)
		}
		rel, err := filepath.Rel(src, path)
		if err != nil {
			return err
		}
		if rel == "." {
			rel = ""
		}
		info, err := d.Info()
		if err != nil {
			return fmt.Errorf("cannot read %s: %w", path, err)
		}
		st, ok := info.Sys().(*syscall.Stat_t)
		if !ok {
			return fmt.Errorf("cannot read the owner of %s", path)
		}
		f := &agent.CopiedFile{Path: filepath.ToSlash(rel), Mode: st.Mode, Uid: st.Uid, Gid: st.Gid}
		switch m := info.Mode(); {
		case m.IsDir():
		case m.IsRegular():
			if size += info.Size(); size > limit {
				return nil
			}
			if f.Data, err = os.ReadFile(path); err != nil {
				return fmt.Errorf("cannot read %s: %w", path, err)
			}
			size += int64(len(f.Data)) - info.Size() // it may have changed since
		case m&fs.ModeSymlink != 0:
			if f.Link, err = os.Readlink(path); err != nil {
				return fmt.Errorf("cannot read %s: %w", path, err)
			}
			size += int64(len(f.Link))
		default:
			return fmt.Errorf("%s is a %s, which cannot be copied into the VM (only regular files, directories and symbolic links can)",
				path, fileType(m))
		}
		files = append(files, f)
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("%w: %w", err, errdefs.ErrInvalidArgument)
	}
	if size > limit {
		return nil, fmt.Errorf("%s holds %d bytes, over the %d bytes copied into the VM at most (guest.copied_mount_limit_bytes): %w",
			src, size, limit, errdefs.ErrInvalidArgument)
	}
	return files, nil
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
