// Package ext4read reads an ext4 image in userspace, for the writable images a
// Caisson guest has written (ROOT/snapshots/ID/rw.ext4): the guest controls every
// byte of them, so the host must not hand them to its kernel's ext4 driver (a loop
// mount parses them as root, in the kernel). A bug here is a wrong or refused
// layer, not a host kernel bug.
//
// It reads what an overlay upper directory holds: directories (linear and
// htree, read linearly), regular files (extent-mapped, with holes and unwritten
// extents read as zeros), symlinks (fast and slow), character and block devices
// (overlay whiteouts are 0/0 character devices), FIFOs, sockets, hardlinks (by
// inode number), modes, 32-bit uid/gid, mtimes to the nanosecond, and xattrs in
// the inode and in an xattr block (user., trusted., security., POSIX ACLs turned
// into their xattr form). The journal is not replayed, as a "noload" mount would
// not: a guest killed mid-write leaves what is on disk.
//
// Everything is bounded and checked, never trusted: inode numbers against the
// superblock, block numbers against the image, extent trees by their depth (at
// most 5 levels, strictly decreasing, so a tree cannot loop), a directory's size
// (Limits.MaxDirSize), names (no "/", NUL, ".", ".." or duplicates), xattr entries
// against their inode or block. A malformed image is an errdefs.ErrInvalidArgument
// naming the inode (and, through Walk, the path); what this reader does not
// implement (inline data, block-mapped files, xattr inodes, meta_bg) is
// errdefs.ErrNotImplemented.
//
// Why not github.com/diskfs/go-diskfs's ext4 (v1.9.4): in a file's hole it reads
// the blocks before the next extent instead of zeros, returns unwritten extents'
// stale blocks instead of zeros, recurses into extent index blocks with no depth
// bound (a node naming itself recurses until the stack overflows, bringing down
// containerd), and allocates buffers of the sizes an inode claims. Reading
// hostile images is this package's whole purpose.
package ext4read

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"time"

	"github.com/containerd/errdefs"
)

const (
	superblockOffset = 1024
	superblockSize   = 1024
	superMagic       = 0xEF53
	rootIno          = 2

	// Feature flags (superblock s_feature_incompat).
	incompatFiletype   = 0x2
	incompatRecover    = 0x4
	incompatJournalDev = 0x8
	incompatMetaBG     = 0x10
	incompatExtents    = 0x40
	incompat64bit      = 0x80
	incompatMMP        = 0x100
	incompatFlexBG     = 0x200
	incompatEAInode    = 0x400
	incompatDirData    = 0x1000
	incompatCsumSeed   = 0x2000
	incompatLargeDir   = 0x4000
	incompatInlineData = 0x8000
	incompatEncrypt    = 0x10000
	incompatCasefold   = 0x20000

	// incompatKnown are the incompat features this reader understands or
	// that do not change what it reads.
	incompatKnown = incompatFiletype | incompatRecover | incompatExtents | incompat64bit |
		incompatMMP | incompatFlexBG | incompatCsumSeed | incompatLargeDir

	// Inode flags (i_flags).
	flagIndex      = 0x1000
	flagEAInode    = 0x200000
	flagExtents    = 0x80000
	flagInlineData = 0x10000000
	flagEncrypt    = 0x800

	// maxExtentDepth is the kernel's EXT4_MAX_EXTENT_DEPTH.
	maxExtentDepth = 5
	extentMagic    = 0xF30A
	// maxUninitLen: an extent longer than this is unwritten (ee_len - 32768 blocks).
	maxInitLen = 32768
)

// Limits bound what Walk reads from one image. A zero field takes its default.
type Limits struct {
	// MaxDirSize bounds one directory's size in bytes. Default DefaultMaxDirSize.
	MaxDirSize int64
	// MaxEntries bounds the entries Walk visits. Default DefaultMaxEntries.
	MaxEntries int
	// MaxDepth bounds the elements of a path Walk visits. Default DefaultMaxDepth.
	MaxDepth int
}

const (
	// DefaultMaxDirSize is 256 MiB: a directory of a million 255-byte names.
	DefaultMaxDirSize = 256 << 20
	// DefaultMaxEntries is a million entries, as a layer's limit (tarerofs).
	DefaultMaxEntries = 1_000_000
	// DefaultMaxDepth is 1024 path elements, as a layer's limit (tarerofs).
	DefaultMaxDepth = 1024
)

func (l Limits) withDefaults() Limits {
	if l.MaxDirSize <= 0 {
		l.MaxDirSize = DefaultMaxDirSize
	}
	if l.MaxEntries <= 0 {
		l.MaxEntries = DefaultMaxEntries
	}
	if l.MaxDepth <= 0 {
		l.MaxDepth = DefaultMaxDepth
	}
	return l
}

// FS is an ext4 image opened for reading.
type FS struct {
	r      io.ReaderAt
	size   int64 // bytes of the image
	limits Limits

	blockSize      int64
	blocks         uint64 // s_blocks_count, bounded by the image's size
	firstDataBlock uint64
	inodesCount    uint32
	inodesPerGroup uint32
	inodeSize      int64
	descSize       int64
	groups         uint64
}

func invalid(format string, args ...any) error {
	return fmt.Errorf("ext4 image: "+format+": %w", append(args, errdefs.ErrInvalidArgument)...)
}

// catch turns a panic into an error: the callers run in containerd's process (or
// the snapshotter's), which a reader's bug must not bring down. Every check is
// meant to be explicit; this is the net under them.
func catch(err *error) {
	if r := recover(); r != nil {
		*err = invalid("reader failure (a bug, on a malformed image): %v", r)
	}
}

func unsupported(format string, args ...any) error {
	return fmt.Errorf("ext4 image: "+format+": %w", append(args, errdefs.ErrNotImplemented)...)
}

// Open reads and checks the superblock of the image r of size bytes.
func Open(r io.ReaderAt, size int64, limits Limits) (_ *FS, retErr error) {
	defer catch(&retErr)
	sb := make([]byte, superblockSize)
	if err := readFull(r, size, sb, superblockOffset); err != nil {
		return nil, fmt.Errorf("superblock: %w", err)
	}
	le := binary.LittleEndian
	if le.Uint16(sb[56:]) != superMagic {
		return nil, invalid("no ext2/3/4 superblock (magic %#x)", le.Uint16(sb[56:]))
	}
	f := &FS{r: r, size: size, limits: limits.withDefaults()}
	logBlock := le.Uint32(sb[24:])
	if logBlock > 6 { // 1 KiB << 6 = 64 KiB, ext4's largest block
		return nil, invalid("block size 1024<<%d", logBlock)
	}
	f.blockSize = 1024 << logBlock
	incompat := le.Uint32(sb[96:])
	if incompat&incompatEncrypt != 0 || incompat&incompatCasefold != 0 {
		return nil, unsupported("encrypted or case-folded file names (incompat features %#x)", incompat)
	}
	if unknown := incompat &^ incompatKnown; unknown != 0 {
		return nil, unsupported("incompat features %#x (meta_bg, inline_data, ea_inode, dirdata, journal device ... are not read)", unknown)
	}
	rawBlocks := uint64(le.Uint32(sb[4:]))
	if incompat&incompat64bit != 0 {
		rawBlocks |= uint64(le.Uint32(sb[0x150:])) << 32
	}
	f.blocks = rawBlocks
	if max := uint64(size / f.blockSize); f.blocks > max {
		// A truncated image, or a superblock claiming more: what is past the
		// image's end cannot be read.
		f.blocks = max
	}
	f.firstDataBlock = uint64(le.Uint32(sb[20:]))
	blocksPerGroup := uint64(le.Uint32(sb[32:]))
	f.inodesPerGroup = le.Uint32(sb[40:])
	f.inodesCount = le.Uint32(sb[0:])
	if blocksPerGroup == 0 || f.inodesPerGroup == 0 || f.inodesCount == 0 || rawBlocks <= f.firstDataBlock {
		return nil, invalid("zero blocks or inodes per group")
	}
	f.inodeSize = 128
	if le.Uint32(sb[76:]) >= 1 { // EXT2_DYNAMIC_REV
		f.inodeSize = int64(le.Uint16(sb[88:]))
	}
	if f.inodeSize < 128 || f.inodeSize > f.blockSize || f.inodeSize&(f.inodeSize-1) != 0 {
		return nil, invalid("inode size %d", f.inodeSize)
	}
	f.descSize = 32
	if incompat&incompat64bit != 0 {
		f.descSize = int64(le.Uint16(sb[254:]))
		if f.descSize < 64 || f.descSize > f.blockSize || f.descSize&(f.descSize-1) != 0 {
			return nil, invalid("group descriptor size %d", f.descSize)
		}
	}
	f.groups = (rawBlocks - f.firstDataBlock + blocksPerGroup - 1) / blocksPerGroup
	if uint64(f.inodesCount) > f.groups*uint64(f.inodesPerGroup) {
		return nil, invalid("%d inodes in %d groups of %d", f.inodesCount, f.groups, f.inodesPerGroup)
	}
	return f, nil
}

// readFull reads len(p) bytes at off of r, which has size bytes: a read past the
// end is an error saying the image is truncated.
func readFull(r io.ReaderAt, size int64, p []byte, off int64) error {
	if off < 0 || off > size || int64(len(p)) > size-off {
		return invalid("%d bytes at offset %d are past the end of the image (%d bytes): truncated or corrupt", len(p), off, size)
	}
	n, err := r.ReadAt(p, off)
	if n == len(p) {
		return nil
	}
	if err == nil || errors.Is(err, io.EOF) {
		return invalid("short read of %d bytes at offset %d: truncated", len(p), off)
	}
	return err
}

// readBlock reads block b into p (len(p) <= blockSize), checking b is in the image.
func (f *FS) readBlock(b uint64, p []byte) error {
	if b == 0 || b >= f.blocks {
		return invalid("block %d is outside the file system (%d blocks)", b, f.blocks)
	}
	return readFull(f.r, f.size, p, int64(b)*f.blockSize)
}

// Inode is one inode's metadata.
type Inode struct {
	Ino   uint32
	Mode  uint32 // type and permission bits, as st_mode
	UID   uint32
	GID   uint32
	Size  int64
	Nlink uint32
	Mtime time.Time
	// Major and Minor are a device's numbers.
	Major, Minor uint32

	flags   uint32
	block   [60]byte
	fileACL uint64
	raw     []byte
}

// File types (st_mode & S_IFMT).
const (
	TypeMask   = 0o170000
	TypeFIFO   = 0o010000
	TypeChar   = 0o020000
	TypeDir    = 0o040000
	TypeBlock  = 0o060000
	TypeReg    = 0o100000
	TypeLink   = 0o120000
	TypeSocket = 0o140000
)

// Type is i.Mode's file type.
func (i *Inode) Type() uint32 { return i.Mode & TypeMask }

// Inode reads inode ino.
func (f *FS) Inode(ino uint32) (*Inode, error) {
	if ino == 0 || ino > f.inodesCount {
		return nil, invalid("inode %d out of range (1..%d)", ino, f.inodesCount)
	}
	group := uint64(ino-1) / uint64(f.inodesPerGroup)
	index := int64(ino-1) % int64(f.inodesPerGroup)
	gd := make([]byte, f.descSize)
	gdOff := int64(f.firstDataBlock+1)*f.blockSize + int64(group)*f.descSize
	if err := readFull(f.r, f.size, gd, gdOff); err != nil {
		return nil, fmt.Errorf("inode %d: group descriptor %d: %w", ino, group, err)
	}
	le := binary.LittleEndian
	table := uint64(le.Uint32(gd[8:]))
	if f.descSize >= 64 {
		table |= uint64(le.Uint32(gd[0x28:])) << 32
	}
	if table == 0 || table >= f.blocks {
		return nil, invalid("inode %d: inode table of group %d at block %d, outside the file system", ino, group, table)
	}
	raw := make([]byte, f.inodeSize)
	if err := readFull(f.r, f.size, raw, int64(table)*f.blockSize+index*f.inodeSize); err != nil {
		return nil, fmt.Errorf("inode %d: %w", ino, err)
	}
	in := &Inode{Ino: ino, raw: raw}
	in.Mode = uint32(le.Uint16(raw[0:]))
	in.UID = uint32(le.Uint16(raw[2:])) | uint32(le.Uint16(raw[120:]))<<16
	in.GID = uint32(le.Uint16(raw[24:])) | uint32(le.Uint16(raw[122:]))<<16
	size := uint64(le.Uint32(raw[4:])) | uint64(le.Uint32(raw[108:]))<<32
	if size > 1<<62 {
		return nil, invalid("inode %d: size %d", ino, size)
	}
	in.Size = int64(size)
	in.Nlink = uint32(le.Uint16(raw[26:]))
	in.flags = le.Uint32(raw[32:])
	copy(in.block[:], raw[40:100])
	in.fileACL = uint64(le.Uint32(raw[104:])) | uint64(le.Uint16(raw[118:]))<<32
	sec := int64(int32(le.Uint32(raw[16:])))
	var nsec int64
	if f.inodeSize > 128 && int64(le.Uint16(raw[128:])) >= 12 && 128+int64(le.Uint16(raw[128:])) <= f.inodeSize {
		// i_mtime_extra: 2 epoch bits extending the seconds, 30 bits of ns.
		x := le.Uint32(raw[136:])
		sec += int64(x&3) << 32
		nsec = int64(x >> 2)
		if nsec >= 1e9 {
			return nil, invalid("inode %d: mtime nanoseconds %d", ino, nsec)
		}
	}
	in.Mtime = time.Unix(sec, nsec).UTC()
	if t := in.Type(); t == TypeChar || t == TypeBlock {
		if old := le.Uint32(in.block[0:]); old != 0 {
			in.Major, in.Minor = (old>>8)&0xff, old&0xff
		} else {
			n := le.Uint32(in.block[4:])
			in.Major = (n & 0xfff00) >> 8
			in.Minor = (n & 0xff) | ((n >> 12) & 0xfff00)
		}
	}
	switch in.Type() {
	case TypeFIFO, TypeChar, TypeDir, TypeBlock, TypeReg, TypeLink, TypeSocket:
	default:
		return nil, invalid("inode %d: file type %#o", ino, in.Type())
	}
	if in.flags&flagEncrypt != 0 {
		return nil, unsupported("inode %d is encrypted", ino)
	}
	return in, nil
}

// extent is a run of a file's blocks.
type extent struct {
	logical   uint64 // first file block
	physical  uint64 // first image block
	length    uint64
	unwritten bool
}

// maxExtents bounds the extents of one file held in memory (32 MiB of them): a
// file fragmented further is refused rather than read.
const maxExtents = 1 << 20

// extentWalk collects an extent tree's leaves in file order.
type extentWalk struct {
	f         *FS
	in        *Inode
	maxBlocks uint64 // blocks of the file's size: extents past them are not read
	out       []extent
	next      uint64 // the first file block the next extent may start at
	nodes     int    // tree blocks read
}

// extents returns in's extents in file order, checked against the image and
// each other, for a file of at most maxBlocks blocks.
func (f *FS) extents(in *Inode, maxBlocks uint64) ([]extent, error) {
	if in.flags&flagInlineData != 0 {
		return nil, unsupported("inode %d has inline data", in.Ino)
	}
	if in.flags&flagExtents == 0 {
		if in.Size == 0 {
			return nil, nil
		}
		return nil, unsupported("inode %d is block-mapped (ext2/3 style), not extent-mapped", in.Ino)
	}
	w := &extentWalk{f: f, in: in, maxBlocks: maxBlocks}
	if err := w.node(in.block[:], -1); err != nil {
		return nil, err
	}
	return w.out, nil
}

// node parses one node of an extent tree (the root in the inode, or a block);
// depth is the depth its parent expects (-1 for the root). Depths must fall by
// one at each level, so a tree is at most maxExtentDepth+1 levels and cannot
// loop; keys must increase, so no block is read for the same file range twice.
func (w *extentWalk) node(b []byte, depth int) error {
	le := binary.LittleEndian
	ino := w.in.Ino
	if len(b) < 12 || le.Uint16(b[0:]) != extentMagic {
		return invalid("inode %d: bad extent header", ino)
	}
	entries := int(le.Uint16(b[2:]))
	d := int(le.Uint16(b[6:]))
	if d > maxExtentDepth || (depth >= 0 && d != depth) {
		return invalid("inode %d: extent tree depth %d where %d was expected", ino, d, depth)
	}
	if 12+12*entries > len(b) {
		return invalid("inode %d: %d extent entries do not fit their node", ino, entries)
	}
	for i := 0; i < entries; i++ {
		e := b[12+12*i : 24+12*i]
		logical := uint64(le.Uint32(e[0:]))
		if logical < w.next {
			return invalid("inode %d: extent tree entry for file block %d overlaps or is out of order", ino, logical)
		}
		if logical >= w.maxBlocks {
			// Past the file's size (preallocated blocks): never read.
			return nil
		}
		if d == 0 {
			length := uint64(le.Uint16(e[4:]))
			unwritten := false
			if length > maxInitLen {
				length -= maxInitLen
				unwritten = true
			}
			if length == 0 {
				continue
			}
			ext := extent{
				logical:   logical,
				physical:  uint64(le.Uint16(e[6:]))<<32 | uint64(le.Uint32(e[8:])),
				length:    length,
				unwritten: unwritten,
			}
			if !unwritten && (ext.physical == 0 || ext.physical+length > w.f.blocks) {
				return invalid("inode %d: extent of %d blocks at block %d is outside the file system (%d blocks)", ino, length, ext.physical, w.f.blocks)
			}
			if len(w.out) >= maxExtents {
				return unsupported("inode %d has more than %d extents", ino, maxExtents)
			}
			w.out = append(w.out, ext)
			w.next = logical + length
			continue
		}
		// An index entry: everything below it starts at logical or later.
		w.next = logical
		if w.nodes++; w.nodes > maxExtents {
			return unsupported("inode %d: an extent tree of more than %d blocks", ino, maxExtents)
		}
		child := uint64(le.Uint16(e[8:]))<<32 | uint64(le.Uint32(e[4:]))
		node := make([]byte, w.f.blockSize)
		if err := w.f.readBlock(child, node); err != nil {
			return fmt.Errorf("inode %d: extent tree: %w", ino, err)
		}
		if err := w.node(node, d-1); err != nil {
			return err
		}
		// The next index entry must start past what this one covered.
		if w.next == logical {
			w.next = logical + 1
		}
	}
	return nil
}

// fileReader reads a file's data through its extents: holes and unwritten
// extents read as zeros, and it ends at the inode's size.
type fileReader struct {
	f       *FS
	ino     uint32
	extents []extent
	size    int64
	off     int64
}

// Open returns a reader of the regular file in's data (exactly in.Size bytes).
func (f *FS) Open(in *Inode) (io.Reader, error) {
	if in.Type() != TypeReg {
		return nil, invalid("inode %d is not a regular file", in.Ino)
	}
	ext, err := f.extents(in, f.blocksFor(in.Size))
	if err != nil {
		return nil, err
	}
	return &fileReader{f: f, ino: in.Ino, extents: ext, size: in.Size}, nil
}

func (f *FS) blocksFor(size int64) uint64 {
	return uint64((size + f.blockSize - 1) / f.blockSize)
}

func (r *fileReader) Read(p []byte) (int, error) {
	if r.off >= r.size {
		return 0, io.EOF
	}
	if int64(len(p)) > r.size-r.off {
		p = p[:r.size-r.off]
	}
	bs := r.f.blockSize
	blk := uint64(r.off / bs)
	// Drop the extents behind.
	for len(r.extents) > 0 && r.extents[0].logical+r.extents[0].length <= blk {
		r.extents = r.extents[1:]
	}
	if len(r.extents) == 0 || r.extents[0].logical > blk {
		// A hole up to the next extent (or the end).
		end := r.size
		if len(r.extents) > 0 {
			end = min(end, int64(r.extents[0].logical)*bs)
		}
		n := int(min(int64(len(p)), end-r.off))
		clear(p[:n])
		r.off += int64(n)
		return n, nil
	}
	e := r.extents[0]
	end := min(r.size, int64(e.logical+e.length)*bs)
	n := int(min(int64(len(p)), end-r.off))
	if e.unwritten {
		clear(p[:n])
	} else {
		at := int64(e.physical)*bs + (r.off - int64(e.logical)*bs)
		if err := readFull(r.f.r, r.f.size, p[:n], at); err != nil {
			return 0, fmt.Errorf("inode %d: %w", r.ino, err)
		}
	}
	r.off += int64(n)
	return n, nil
}

// Readlink returns the target of the symlink in.
func (f *FS) Readlink(in *Inode) (string, error) {
	if in.Type() != TypeLink {
		return "", invalid("inode %d is not a symlink", in.Ino)
	}
	const pathMax = 4096
	if in.Size <= 0 || in.Size >= pathMax {
		return "", invalid("inode %d: a symlink target of %d bytes", in.Ino, in.Size)
	}
	if in.flags&(flagExtents|flagInlineData) == 0 && in.Size < 60 {
		// A fast symlink: the target is in i_block.
		return string(in.block[:in.Size]), nil
	}
	r, err := f.Open(&Inode{Ino: in.Ino, Mode: TypeReg, Size: in.Size, flags: in.flags, block: in.block})
	if err != nil {
		return "", err
	}
	b, err := io.ReadAll(r)
	if err != nil {
		return "", err
	}
	return string(b), nil
}

// DirEntry is a name in a directory.
type DirEntry struct {
	Name string
	Ino  uint32
}

// ReadDir returns the entries of directory in but "." and "..", in on-disk order.
// Names are checked: not empty, ".", "..", nor holding "/" or NUL, and not twice.
func (f *FS) ReadDir(in *Inode) ([]DirEntry, error) {
	if in.Type() != TypeDir {
		return nil, invalid("inode %d is not a directory", in.Ino)
	}
	if in.Size > f.limits.MaxDirSize {
		return nil, invalid("directory inode %d has %d bytes (at most %d)", in.Ino, in.Size, f.limits.MaxDirSize)
	}
	if in.Size%f.blockSize != 0 {
		return nil, invalid("directory inode %d has %d bytes, not whole blocks", in.Ino, in.Size)
	}
	r, err := f.Open(&Inode{Ino: in.Ino, Mode: TypeReg, Size: in.Size, flags: in.flags, block: in.block})
	if err != nil {
		return nil, err
	}
	le := binary.LittleEndian
	seen := map[string]bool{}
	var out []DirEntry
	blk := make([]byte, f.blockSize)
	for n := 0; ; n++ {
		if _, err := io.ReadFull(r, blk); errors.Is(err, io.EOF) {
			break
		} else if err != nil {
			return nil, err
		}
		for off := 0; off < len(blk); {
			if off+8 > len(blk) {
				return nil, invalid("directory inode %d, block %d: an entry header crosses the block's end", in.Ino, n)
			}
			ino := le.Uint32(blk[off:])
			recLen := int(le.Uint16(blk[off+4:]))
			if f.blockSize == 65536 && (recLen == 0 || recLen == 65535) {
				recLen = 65536
			}
			nameLen := int(blk[off+6])
			if recLen < 12 || recLen%4 != 0 || off+recLen > len(blk) || 8+nameLen > recLen {
				return nil, invalid("directory inode %d, block %d, offset %d: entry length %d (name %d bytes)", in.Ino, n, off, recLen, nameLen)
			}
			name := string(blk[off+8 : off+8+nameLen])
			off += recLen
			if ino == 0 || name == "." || name == ".." {
				continue // free space, an htree node, a checksum tail, or the dots
			}
			if ino > f.inodesCount {
				return nil, invalid("directory inode %d: entry %q names inode %d (at most %d)", in.Ino, name, ino, f.inodesCount)
			}
			if err := checkName(name); err != nil {
				return nil, invalid("directory inode %d: %v", in.Ino, err)
			}
			if seen[name] {
				return nil, invalid("directory inode %d: the name %q twice", in.Ino, name)
			}
			seen[name] = true
			if len(out) >= f.limits.MaxEntries {
				return nil, invalid("directory inode %d has more than %d entries", in.Ino, f.limits.MaxEntries)
			}
			out = append(out, DirEntry{Name: name, Ino: ino})
		}
	}
	return out, nil
}

func checkName(name string) error {
	if name == "" {
		return errors.New("an empty name")
	}
	for i := 0; i < len(name); i++ {
		if name[i] == '/' || name[i] == 0 {
			return fmt.Errorf("the name %q holds %q", name, name[i])
		}
	}
	return nil
}
