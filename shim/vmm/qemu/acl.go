package qemu

import (
	"encoding/binary"
	"errors"
	"fmt"
	"slices"
	"syscall"

	"golang.org/x/sys/unix"
)

// A jailed QEMU opens a few files itself although the shim hands it a descriptor: a
// memory-backend-file (virtio-pmem, a template's RAM) takes a path only, which the shim
// makes /proc/self/fd/N, and the kernel checks QEMU's user against the file's mode on
// that open. Layer images are 0600 root: the shim grants the jail's user read access to
// each such file it attaches with a POSIX ACL entry (user:UID:r--), which gives nothing
// to anyone else and nothing to QEMU beyond the files it was handed (it sees no other
// path to them in its mount namespace).

// ACL xattr format (linux/posix_acl_xattr.h): a version, then entries of tag, permissions
// and id, sorted by tag then id.
const (
	aclXattr      = "system.posix_acl_access"
	aclVersion    = 2
	aclUserObj    = 0x01
	aclUser       = 0x02
	aclGroupObj   = 0x04
	aclGroup      = 0x08
	aclMask       = 0x10
	aclOther      = 0x20
	aclUndefined  = 0xffffffff
	aclEntryBytes = 8
)

type aclEntry struct {
	tag  uint16
	perm uint16
	id   uint32
}

// grantAccess makes path readable (and writable, with write) by uid through an ACL entry,
// unless its mode already lets uid in.
func grantAccess(path string, uid uint32, write bool) error {
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		return err
	}
	want := uint16(4)
	if write {
		want |= 2
	}
	mode := uint16(st.Mode & 0o777)
	switch {
	case st.Uid == uid && (mode>>6)&want == want:
		return nil
	case mode&want == want:
		return nil // others may already
	}
	entries, err := readACL(path, mode)
	if err != nil {
		return err
	}
	i := slices.IndexFunc(entries, func(e aclEntry) bool { return e.tag == aclUser && e.id == uid })
	if i >= 0 {
		entries[i].perm |= want
	} else {
		entries = append(entries, aclEntry{tag: aclUser, perm: want, id: uid})
	}
	// The mask bounds the named entries and the owning group: their union.
	var mask uint16
	entries = slices.DeleteFunc(entries, func(e aclEntry) bool { return e.tag == aclMask })
	for _, e := range entries {
		if e.tag == aclUser || e.tag == aclGroup || e.tag == aclGroupObj {
			mask |= e.perm
		}
	}
	entries = append(entries, aclEntry{tag: aclMask, perm: mask, id: aclUndefined})
	slices.SortFunc(entries, func(a, b aclEntry) int {
		if a.tag != b.tag {
			return int(a.tag) - int(b.tag)
		}
		return int(int64(a.id) - int64(b.id))
	})
	b := make([]byte, 4, 4+aclEntryBytes*len(entries))
	binary.LittleEndian.PutUint32(b, aclVersion)
	for _, e := range entries {
		b = binary.LittleEndian.AppendUint16(b, e.tag)
		b = binary.LittleEndian.AppendUint16(b, e.perm)
		b = binary.LittleEndian.AppendUint32(b, e.id)
	}
	if err := unix.Setxattr(path, aclXattr, b, 0); err != nil {
		return fmt.Errorf("grant user %d access to %s: %w", uid, path, err)
	}
	return nil
}

// readACL returns path's access ACL, or the one its mode amounts to if it has none.
func readACL(path string, mode uint16) ([]aclEntry, error) {
	buf := make([]byte, 4096)
	n, err := unix.Getxattr(path, aclXattr, buf)
	if errors.Is(err, unix.ENODATA) {
		return []aclEntry{
			{tag: aclUserObj, perm: (mode >> 6) & 7, id: aclUndefined},
			{tag: aclGroupObj, perm: (mode >> 3) & 7, id: aclUndefined},
			{tag: aclOther, perm: mode & 7, id: aclUndefined},
		}, nil
	}
	if err != nil {
		return nil, fmt.Errorf("acl of %s: %w", path, err)
	}
	buf = buf[:n]
	if len(buf) < 4 || binary.LittleEndian.Uint32(buf) != aclVersion || (len(buf)-4)%aclEntryBytes != 0 {
		return nil, fmt.Errorf("acl of %s: unknown format: %w", path, syscall.EINVAL)
	}
	var entries []aclEntry
	for b := buf[4:]; len(b) > 0; b = b[aclEntryBytes:] {
		entries = append(entries, aclEntry{
			tag:  binary.LittleEndian.Uint16(b),
			perm: binary.LittleEndian.Uint16(b[2:]),
			id:   binary.LittleEndian.Uint32(b[4:]),
		})
	}
	return entries, nil
}
