package ext4read

import (
	"encoding/binary"
	"fmt"
)

const xattrMagic = 0xEA020000

// xattrPrefixes are ext4's name indexes (fs/ext4/xattr.h, EXT4_XATTR_INDEX_*).
var xattrPrefixes = map[byte]string{
	1: "user.",
	2: "system.posix_acl_access",
	3: "system.posix_acl_default",
	4: "trusted.",
	6: "security.",
	7: "system.",
	8: "system.richacl",
}

// Xattrs returns in's extended attributes: those in the inode's extra space and
// those in its xattr block. POSIX ACLs are returned in their xattr form
// (system.posix_acl_access, as getxattr(2) returns them), not ext4's disk form.
func (f *FS) Xattrs(in *Inode) (map[string][]byte, error) {
	out := map[string][]byte{}
	le := binary.LittleEndian
	if f.inodeSize > 128 {
		// In-inode xattrs follow i_extra_isize, after a magic number; value
		// offsets count from the first entry.
		start := 128 + int64(le.Uint16(in.raw[128:]))
		if start > f.inodeSize || start%4 != 0 {
			return nil, invalid("inode %d: i_extra_isize %d", in.Ino, start-128)
		}
		if start+4 <= f.inodeSize && le.Uint32(in.raw[start:]) == xattrMagic {
			area := in.raw[start+4:]
			if err := parseXattrs(in.Ino, area, area, out); err != nil {
				return nil, err
			}
		}
	}
	if in.fileACL != 0 {
		blk := make([]byte, f.blockSize)
		if err := f.readBlock(in.fileACL, blk); err != nil {
			return nil, fmt.Errorf("inode %d: xattr block: %w", in.Ino, err)
		}
		if le.Uint32(blk[0:]) != xattrMagic || le.Uint32(blk[8:]) != 1 {
			return nil, invalid("inode %d: xattr block %d has a bad header", in.Ino, in.fileACL)
		}
		// Value offsets count from the block's start; entries follow the
		// 32-byte header.
		if err := parseXattrs(in.Ino, blk[32:], blk, out); err != nil {
			return nil, err
		}
	}
	for _, name := range []string{"system.posix_acl_access", "system.posix_acl_default"} {
		if v, ok := out[name]; ok {
			x, err := aclToXattr(v)
			if err != nil {
				return nil, invalid("inode %d: %s: %v", in.Ino, name, err)
			}
			out[name] = x
		}
	}
	return out, nil
}

// parseXattrs reads the entries starting at entries; value offsets are into
// values. Every length and offset is checked against its area.
func parseXattrs(ino uint32, entries, values []byte, out map[string][]byte) error {
	le := binary.LittleEndian
	for off := 0; ; {
		if off+4 > len(entries) {
			return invalid("inode %d: xattr entries run past their area", ino)
		}
		if le.Uint32(entries[off:]) == 0 {
			return nil // the end marker
		}
		if off+16 > len(entries) {
			return invalid("inode %d: an xattr entry runs past its area", ino)
		}
		e := entries[off:]
		nameLen := int(e[0])
		index := e[1]
		valueOff := int(le.Uint16(e[2:]))
		valueInum := le.Uint32(e[4:])
		valueSize := int(le.Uint32(e[8:]))
		if off+16+nameLen > len(entries) {
			return invalid("inode %d: an xattr name runs past its area", ino)
		}
		prefix, ok := xattrPrefixes[index]
		if !ok {
			return unsupported("inode %d: xattr name index %d", ino, index)
		}
		name := prefix + string(e[16:16+nameLen])
		if valueInum != 0 {
			return unsupported("inode %d: xattr %q is stored in an inode of its own (ea_inode)", ino, name)
		}
		if valueSize < 0 || valueOff+valueSize > len(values) {
			return invalid("inode %d: xattr %q: a value of %d bytes at offset %d runs past its area", ino, name, valueSize, valueOff)
		}
		if _, dup := out[name]; dup {
			return invalid("inode %d: xattr %q twice", ino, name)
		}
		out[name] = append([]byte(nil), values[valueOff:valueOff+valueSize]...)
		off += (16 + nameLen + 3) &^ 3
	}
}

// ACL tags (linux/posix_acl.h).
const (
	aclUserObj  = 0x01
	aclUser     = 0x02
	aclGroupObj = 0x04
	aclGroup    = 0x08
	aclMask     = 0x10
	aclOther    = 0x20
)

// aclToXattr turns an ACL from ext4's disk form (version 1; short entries
// without an id for the *_OBJ, MASK and OTHER tags) into the xattr form
// getxattr(2) returns (version 2; every entry tag, perm, id; id -1 when none).
func aclToXattr(disk []byte) ([]byte, error) {
	le := binary.LittleEndian
	if len(disk) < 4 || le.Uint32(disk) != 1 {
		return nil, fmt.Errorf("not an ext4 ACL (version)")
	}
	out := le.AppendUint32(nil, 2)
	for b := disk[4:]; len(b) > 0; {
		if len(b) < 4 {
			return nil, fmt.Errorf("a truncated entry")
		}
		tag, perm := le.Uint16(b), le.Uint16(b[2:])
		id := uint32(0xffffffff)
		switch tag {
		case aclUserObj, aclGroupObj, aclMask, aclOther:
			b = b[4:]
		case aclUser, aclGroup:
			if len(b) < 8 {
				return nil, fmt.Errorf("a truncated entry")
			}
			id = le.Uint32(b[4:])
			b = b[8:]
		default:
			return nil, fmt.Errorf("tag %#x", tag)
		}
		out = le.AppendUint16(out, tag)
		out = le.AppendUint16(out, perm)
		out = le.AppendUint32(out, id)
	}
	return out, nil
}
