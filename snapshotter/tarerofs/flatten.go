package tarerofs

import (
	"encoding/binary"
	"fmt"
	"io"
	"io/fs"

	erofs "github.com/erofs/go-erofs"
)

// go-erofs v0.3.1 stores a regular file's data inline, right after its inode in
// the metadata area, when the whole file fits in the inode's block (files of up to
// about 4 KiB); it has no option to turn that off. The kernel maps only flat-plain
// files with DAX, so flatten moves each such file's data into a block of its own,
// appended to the image, and makes the inode flat-plain, as mkfs.erofs
// -Enoinline_data lays them out. The inline copy stays behind, unreferenced.

const (
	sbBlocks = 36 // u32: the image's size in blocks

	layoutMask = 7 << 1 // of i_format
)

// flatten rewrites every inline regular file of the image in f as flat-plain. The
// image must end on a block boundary (go-erofs's do).
func flatten(f File) error {
	fsys, err := erofs.Open(f)
	if err != nil {
		return fmt.Errorf("reopen image: %w", err)
	}
	var sb [64]byte
	if _, err := f.ReadAt(sb[:], superBlockOffset); err != nil {
		return err
	}
	blockSize := int64(1) << sb[sbBlkSizeBits]
	metaStart := int64(binary.LittleEndian.Uint32(sb[sbMetaBlkAddr:])) * blockSize
	end, err := f.Seek(0, io.SeekEnd)
	if err != nil {
		return err
	}
	if end%blockSize != 0 {
		return fmt.Errorf("image of %d bytes does not end on a block boundary", end)
	}
	var inline []uint64 // nids, each once (hardlinks share one)
	seen := map[uint64]bool{}
	if err := fs.WalkDir(fsys, ".", func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if !d.Type().IsRegular() {
			return nil
		}
		fi, err := d.Info()
		if err != nil {
			return err
		}
		st, ok := fi.Sys().(*erofs.Stat)
		if !ok {
			return fmt.Errorf("%s: no EROFS inode information", p)
		}
		nid := uint64(st.Ino)
		if st.InodeLayout == layoutFlatInline && st.Size > 0 && !seen[nid] {
			seen[nid] = true
			inline = append(inline, nid)
		}
		return nil
	}); err != nil {
		return err
	}
	if len(inline) == 0 {
		return nil
	}

	blk := make([]byte, blockSize)
	next := end / blockSize
	for _, nid := range inline {
		ipos := metaStart + int64(nid)*32
		var ino [64]byte
		if _, err := f.ReadAt(ino[:], ipos); err != nil {
			return err
		}
		format := binary.LittleEndian.Uint16(ino[inodeFormat:])
		isize, size := int64(32), int64(binary.LittleEndian.Uint32(ino[inodeSize:]))
		if format&1 != 0 {
			isize, size = 64, int64(binary.LittleEndian.Uint64(ino[inodeSize:]))
		}
		if (format&layoutMask)>>1 != layoutFlatInline || size > blockSize {
			return fmt.Errorf("inode %d: not an inline file of at most one block", nid)
		}
		xattrSize := int64(0)
		if n := int64(binary.LittleEndian.Uint16(ino[inodeXattrCount:])); n > 0 {
			xattrSize = 12 + (n-1)*4
		}
		clear(blk)
		if _, err := f.ReadAt(blk[:size], ipos+isize+xattrSize); err != nil {
			return err
		}
		if _, err := f.WriteAt(blk, next*blockSize); err != nil {
			return err
		}
		binary.LittleEndian.PutUint16(ino[inodeFormat:], format&^layoutMask|layoutFlatPlain<<1)
		binary.LittleEndian.PutUint32(ino[inodeRawBlkAddr:], uint32(next))
		if _, err := f.WriteAt(ino[:inodeRawBlkAddr+4], ipos); err != nil {
			return err
		}
		next++
	}
	var b [4]byte
	binary.LittleEndian.PutUint32(b[:], uint32(next))
	_, err = f.WriteAt(b[:], superBlockOffset+sbBlocks)
	return err
}
