package tarerofs

import (
	"encoding/binary"
	"fmt"
	"io"
	"io/fs"
	"path"
	"strings"

	erofs "github.com/erofs/go-erofs"
)

// go-erofs v0.3.1's Writer gives every name its own inode. A hardlink NAME of
// TARGET is therefore written as a placeholder inode of TARGET's type, TARGET's
// link count is set with SetNlink, and once the image is complete the directory
// entry of NAME is pointed at TARGET's inode (relink). The placeholder is left
// unreferenced: an EROFS image has no allocation map, so it is a few dead bytes.

// link is one hardlink to patch: name's directory entry gets target's inode.
type link struct {
	name, target string // absolute paths in the image
}

// EROFS on-disk offsets (Documentation/filesystems/erofs.rst, include/erofs_fs.h).
const (
	superBlockOffset = 1024
	sbBlkSizeBits    = 12 // u8
	sbMetaBlkAddr    = 40 // u32

	inodeFormat     = 0  // u16: bit 0 extended, bits 1-3 data layout
	inodeXattrCount = 2  // u16
	inodeSize       = 8  // u32 (compact) or u64 (extended)
	inodeRawBlkAddr = 16 // u32

	layoutFlatPlain  = 0
	layoutFlatInline = 2

	direntSize = 12 // nid u64, nameoff u16, file_type u8, reserved u8
)

// image is what relink reads and patches: the image file.
type image interface {
	io.ReaderAt
	io.WriterAt
}

// relink points each link's directory entry at its target's inode.
func relink(img image, links []link) error {
	if len(links) == 0 {
		return nil
	}
	fsys, err := erofs.Open(img)
	if err != nil {
		return fmt.Errorf("reopen image: %w", err)
	}
	var sb [64]byte
	if _, err := img.ReadAt(sb[:], superBlockOffset); err != nil {
		return err
	}
	blockSize := int64(1) << sb[sbBlkSizeBits]
	metaStart := int64(binary.LittleEndian.Uint32(sb[sbMetaBlkAddr:])) * blockSize
	// nid is the inode of p itself: a hardlink to a symlink shares the symlink's
	// inode, not that of whatever it points to (fs.Stat would follow it).
	nid := func(p string) (uint64, error) {
		name := strings.TrimPrefix(p, "/")
		if name == "" {
			name = "."
		}
		fi, err := fs.Lstat(fsys, name)
		if err != nil {
			return 0, err
		}
		st, ok := fi.Sys().(*erofs.Stat)
		if !ok {
			return 0, fmt.Errorf("%s: no EROFS inode information", p)
		}
		return uint64(st.Ino), nil
	}
	for _, l := range links {
		target, err := nid(l.target)
		if err != nil {
			return fmt.Errorf("hardlink %s: target: %w", l.name, err)
		}
		dir, err := nid(path.Dir(l.name))
		if err != nil {
			return fmt.Errorf("hardlink %s: directory: %w", l.name, err)
		}
		off, err := direntOffset(img, metaStart, blockSize, dir, path.Base(l.name))
		if err != nil {
			return fmt.Errorf("hardlink %s: %w", l.name, err)
		}
		var b [8]byte
		binary.LittleEndian.PutUint64(b[:], target)
		if _, err := img.WriteAt(b[:], off); err != nil {
			return err
		}
	}
	return nil
}

// direntOffset returns the image offset of the directory entry name in the
// directory whose inode is dirNid.
func direntOffset(img io.ReaderAt, metaStart, blockSize int64, dirNid uint64, name string) (int64, error) {
	ipos := metaStart + int64(dirNid)*32
	var ino [64]byte
	if _, err := img.ReadAt(ino[:], ipos); err != nil {
		return 0, err
	}
	format := binary.LittleEndian.Uint16(ino[inodeFormat:])
	extended := format&1 != 0
	layout := (format >> 1) & 7
	isize, size := int64(32), int64(binary.LittleEndian.Uint32(ino[inodeSize:]))
	if extended {
		isize, size = 64, int64(binary.LittleEndian.Uint64(ino[inodeSize:]))
	}
	xattrSize := int64(0)
	if n := int64(binary.LittleEndian.Uint16(ino[inodeXattrCount:])); n > 0 {
		xattrSize = 12 + (n-1)*4
	}
	blkAddr := int64(binary.LittleEndian.Uint32(ino[inodeRawBlkAddr:]))
	// Where byte i of the directory's data is: whole blocks from blkAddr, and
	// for the inline layout a last partial block right after the inode.
	blockAt := func(i int64) (int64, int64) {
		n := min(blockSize, size-i*blockSize)
		if layout == layoutFlatInline && (i+1)*blockSize > size {
			return ipos + isize + xattrSize, n
		}
		return (blkAddr + i) * blockSize, n
	}
	if layout != layoutFlatPlain && layout != layoutFlatInline {
		return 0, fmt.Errorf("directory layout %d is not flat", layout)
	}
	for i := int64(0); i*blockSize < size; i++ {
		pos, n := blockAt(i)
		blk := make([]byte, n)
		if _, err := img.ReadAt(blk, pos); err != nil {
			return 0, err
		}
		if len(blk) < direntSize {
			break
		}
		count := int(binary.LittleEndian.Uint16(blk[8:])) / direntSize
		for j := range count {
			d := blk[j*direntSize:]
			start := int(binary.LittleEndian.Uint16(d[8:]))
			end := len(blk)
			if j+1 < count {
				end = int(binary.LittleEndian.Uint16(blk[(j+1)*direntSize+8:]))
			}
			if start > end || end > len(blk) {
				return 0, fmt.Errorf("corrupt directory block")
			}
			got := strings.TrimRight(string(blk[start:end]), "\x00")
			if got == name {
				return pos + int64(j*direntSize), nil
			}
		}
	}
	return 0, fmt.Errorf("no directory entry %q", name)
}
