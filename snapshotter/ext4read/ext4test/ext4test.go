// Package ext4test builds the ext4 images the tests of package ext4read and of
// the snapshotter read: a writable image as the shim makes it, filled through the
// kernel (a loop mount) with every kind of entry an overlay upper directory
// holds, and the kernel's view of it to compare against. Its helpers need root.
package ext4test

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// Record is what the tests compare of one entry.
type Record struct {
	Path         string
	Mode         uint32
	UID, GID     uint32
	Size         int64
	Mtime        time.Time
	Major, Minor uint32
	Target       string
	Xattrs       string
	Data         string // sha256 of a regular file's content
	Ino          uint64 // compared as groups: entries sharing an inode
}

func (r Record) String() string {
	return fmt.Sprintf("%s mode=%o uid=%d gid=%d size=%d mtime=%s dev=%d:%d target=%q xattrs=%s data=%s",
		r.Path, r.Mode, r.UID, r.GID, r.Size, r.Mtime.Format(time.RFC3339Nano), r.Major, r.Minor, r.Target, r.Xattrs, r.Data)
}

// XattrString is a stable text form of xattrs, to compare (empty ACLs left out).
func XattrString(m map[string][]byte) string {
	var names []string
	for n := range m {
		if !strings.HasPrefix(n, "system.posix_acl") || len(m[n]) > 0 {
			names = append(names, n)
		}
	}
	sort.Strings(names)
	var b strings.Builder
	for _, n := range names {
		fmt.Fprintf(&b, "%s=%x;", n, m[n])
	}
	return b.String()
}

// HostRecords walks root through the kernel (a mounted image): the reference.
func HostRecords(t testing.TB, root string) []Record {
	t.Helper()
	var out []Record
	err := filepath.Walk(root, func(p string, fi os.FileInfo, err error) error {
		if err != nil || p == root {
			return err
		}
		rel, _ := filepath.Rel(root, p)
		var st2 unix.Stat_t
		if err := unix.Lstat(p, &st2); err != nil {
			return err
		}
		st := &st2
		r := Record{Path: rel, Mode: st.Mode, UID: st.Uid, GID: st.Gid, Mtime: time.Unix(st2.Mtim.Sec, st2.Mtim.Nsec).UTC(), Ino: st.Ino}
		if st.Mode&unix.S_IFMT == unix.S_IFCHR || st.Mode&unix.S_IFMT == unix.S_IFBLK {
			r.Major, r.Minor = unix.Major(st.Rdev), unix.Minor(st.Rdev)
		}
		switch st.Mode & unix.S_IFMT {
		case unix.S_IFREG:
			r.Size = st.Size
			b, err := os.ReadFile(p)
			if err != nil {
				return err
			}
			r.Data = fmt.Sprintf("%x", sha256.Sum256(b))
		case unix.S_IFLNK:
			r.Target, _ = os.Readlink(p)
		}
		x := map[string][]byte{}
		buf := make([]byte, 1<<16)
		n, err := unix.Llistxattr(p, buf)
		if err != nil {
			return err
		}
		for _, name := range strings.Split(string(buf[:n]), "\x00") {
			if name == "" {
				continue
			}
			v := make([]byte, 1<<16)
			vn, err := unix.Lgetxattr(p, name, v)
			if err != nil {
				return fmt.Errorf("%s: %s: %w", p, name, err)
			}
			x[name] = v[:vn]
		}
		r.Xattrs = XattrString(x)
		out = append(out, r)
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// CompareRecords compares two walks, entry by entry, and their hardlink groups.
func CompareRecords(t testing.TB, want, got []Record) {
	t.Helper()
	if len(want) != len(got) {
		t.Errorf("%d entries, want %d", len(got), len(want))
	}
	wantIno, gotIno := map[uint64]string{}, map[uint64]string{}
	for i := 0; i < min(len(want), len(got)); i++ {
		w, g := want[i], got[i]
		wi, gi := w.Ino, g.Ino
		w.Ino, g.Ino = 0, 0
		if w != g {
			t.Errorf("entry %d:\n got  %v\n want %v", i, g, w)
		}
		// The same entries share an inode on both sides.
		first, seen := wantIno[wi]
		gfirst, gseen := gotIno[gi]
		if seen != gseen || first != gfirst {
			t.Errorf("%s: hardlinked to %q here, to %q in the reference", w.Path, gfirst, first)
		}
		if !seen {
			wantIno[wi], gotIno[gi] = w.Path, w.Path
		}
	}
}

// NeedRoot skips a test that needs root, mkfs.ext4 and loop mounts.
func NeedRoot(t testing.TB) {
	t.Helper()
	if testing.Short() {
		t.Skip("needs root, mkfs.ext4 and loop mounts (not with -short)")
	}
	if os.Geteuid() != 0 {
		t.Skip("needs root: builds its fixture through a loop mount")
	}
	if _, err := exec.LookPath("mkfs.ext4"); err != nil {
		t.Skip("needs mkfs.ext4")
	}
}

// Run runs a command, failing t with its output if it fails.
func Run(t testing.TB, name string, args ...string) {
	t.Helper()
	if out, err := exec.Command(name, args...).CombinedOutput(); err != nil {
		t.Fatalf("%s %s: %v: %s", name, strings.Join(args, " "), err, out)
	}
}

// WritableImage makes the ext4 image img as the shim does (mkfs.ext4 -q on a
// sparse file of size bytes, with extra mkfs options), has the kernel write fill
// into it through a loop mount, and unmounts it.
func WritableImage(t testing.TB, img string, size int64, opts []string, fill func(root string)) {
	t.Helper()
	f, err := os.Create(img)
	if err != nil {
		t.Fatal(err)
	}
	f.Truncate(size)
	f.Close()
	Run(t, "mkfs.ext4", append(append([]string{"-q", "-F"}, opts...), img)...)
	mnt := t.TempDir()
	Run(t, "mount", "-o", "loop", img, mnt)
	unmounted := false
	defer func() {
		if !unmounted {
			unix.Unmount(mnt, unix.MNT_DETACH)
		}
	}()
	fill(mnt)
	Run(t, "umount", mnt)
	unmounted = true
}

// WithMounted loop-mounts the image img (of type fstype: "ext4" without
// replaying its journal, or "erofs") read-only for fn: the kernel's reading,
// the reference.
func WithMounted(t testing.TB, img, fstype string, fn func(root string)) {
	t.Helper()
	mnt := t.TempDir()
	opts := "ro,loop"
	if fstype == "ext4" {
		opts += ",noload"
	}
	Run(t, "mount", "-t", fstype, "-o", opts, img, mnt)
	defer Run(t, "umount", mnt)
	fn(mnt)
}

func must(t testing.TB, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

// Fill says what FillUpper writes beyond the common entries.
type Fill struct {
	// LongName adds a file with a 255-byte name (mkfs.erofs 1.5 cannot store it).
	LongName bool
	// ACL adds a POSIX access ACL (go-erofs cannot store it).
	ACL bool
}

// FillUpper writes into root/upper every kind of entry an overlay upper directory
// holds (and what fill adds), and makes root/work.
func FillUpper(t testing.TB, root string, fill Fill) {
	u := filepath.Join(root, "upper")
	must(t, os.MkdirAll(filepath.Join(u, "dir/sub"), 0o755))
	must(t, os.WriteFile(filepath.Join(u, "small"), []byte("hello\n"), 0o644))
	must(t, os.WriteFile(filepath.Join(u, "dir/sub/file"), bytes.Repeat([]byte("0123456789abcdef"), 70_000), 0o600))
	// Sparse: data, a hole, data, a hole at the end.
	sp, err := os.Create(filepath.Join(u, "sparse"))
	must(t, err)
	sp.WriteAt([]byte("start"), 0)
	sp.WriteAt([]byte("middle"), 10<<20)
	must(t, sp.Truncate(30<<20))
	sp.Close()
	// Unwritten extents: fallocated, partly written.
	fa, err := os.Create(filepath.Join(u, "fallocated"))
	must(t, err)
	must(t, unix.Fallocate(int(fa.Fd()), 0, 0, 1<<20))
	fa.WriteAt([]byte("written"), 8192)
	fa.Close()
	// Fragmented: many extents, so the tree has an index level.
	fr, err := os.Create(filepath.Join(u, "fragmented"))
	must(t, err)
	for i := 0; i < 400; i++ {
		fr.WriteAt([]byte(fmt.Sprintf("block %d", i)), int64(i)*2*4096)
	}
	fr.Close()
	must(t, os.Symlink("small", filepath.Join(u, "fastlink")))
	// An xattr on a symlink itself (overlayfs puts trusted.overlay.* there).
	must(t, unix.Lsetxattr(filepath.Join(u, "fastlink"), "trusted.overlay.origin", []byte{0, 0xfb, 1}, 0))
	must(t, os.Symlink("/"+strings.Repeat("long-target/", 30), filepath.Join(u, "slowlink")))
	must(t, os.Link(filepath.Join(u, "small"), filepath.Join(u, "dir/hardlink")))
	must(t, unix.Mknod(filepath.Join(u, "whiteout"), unix.S_IFCHR, 0))
	must(t, os.Link(filepath.Join(u, "whiteout"), filepath.Join(u, "dir/whiteout2")))
	must(t, unix.Mknod(filepath.Join(u, "null"), unix.S_IFCHR|0o666, int(unix.Mkdev(1, 3))))
	must(t, unix.Mknod(filepath.Join(u, "bigdev"), unix.S_IFBLK|0o600, int(unix.Mkdev(259, 70000))))
	must(t, unix.Mkfifo(filepath.Join(u, "fifo"), 0o640))
	must(t, os.Mkdir(filepath.Join(u, "opaque"), 0o700))
	must(t, unix.Setxattr(filepath.Join(u, "opaque"), "trusted.overlay.opaque", []byte("y"), 0))
	must(t, unix.Setxattr(filepath.Join(u, "small"), "user.note", []byte("a note"), 0))
	must(t, unix.Setxattr(filepath.Join(u, "small"), "security.capability",
		[]byte{0, 0, 0, 2, 0, 0x20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0}, 0))
	// Too big for the inode's extra space: goes to an xattr block.
	must(t, unix.Setxattr(filepath.Join(u, "dir/sub/file"), "user.big", bytes.Repeat([]byte("x"), 600), 0))
	if fill.ACL {
		must(t, unix.Setxattr(filepath.Join(u, "dir"), "system.posix_acl_access", TestACL, 0))
	}
	must(t, os.Chown(filepath.Join(u, "dir/sub/file"), 100000, 200000))
	must(t, os.Chmod(filepath.Join(u, "dir/sub/file"), 0o4755))
	must(t, os.Chmod(filepath.Join(u, "dir/sub"), 0o1777))
	// A large directory: htree-indexed.
	must(t, os.Mkdir(filepath.Join(u, "many"), 0o755))
	for i := 0; i < 3000; i++ {
		must(t, os.WriteFile(filepath.Join(u, "many", fmt.Sprintf("entry-with-a-longish-name-%05d", i)), nil, 0o644))
	}
	// A 255-byte name (mkfs.erofs 1.5 cannot store it).
	if fill.LongName {
		must(t, os.WriteFile(filepath.Join(u, strings.Repeat("n", 255)), []byte("long"), 0o644))
	}
	must(t, os.Mkdir(filepath.Join(root, "work"), 0o755))
	ts := time.Date(2021, 3, 4, 5, 6, 7, 123456789, time.UTC)
	must(t, os.Chtimes(filepath.Join(u, "small"), ts, ts))
	old := time.Date(1965, 1, 1, 0, 0, 0, 5, time.UTC)
	must(t, unix.Lutimes(filepath.Join(u, "fastlink"), []unix.Timeval{unix.NsecToTimeval(old.UnixNano()), unix.NsecToTimeval(old.UnixNano())}))
	future := time.Date(2100, 1, 1, 0, 0, 0, 999, time.UTC)
	must(t, os.Chtimes(filepath.Join(u, "fifo"), future, future))
}

// TestACL is user::rwx,user:1234:rwx,group::r-x,mask::rwx,other::r-x in the
// xattr form (version 2).
var TestACL = func() []byte {
	le := binary.LittleEndian
	b := le.AppendUint32(nil, 2)
	for _, e := range [][3]uint32{{0x01, 7, 0xffffffff}, {0x02, 7, 1234}, {0x04, 5, 0xffffffff}, {0x10, 7, 0xffffffff}, {0x20, 5, 0xffffffff}} {
		b = le.AppendUint16(b, uint16(e[0]))
		b = le.AppendUint16(b, uint16(e[1]))
		b = le.AppendUint32(b, e[2])
	}
	return b
}()
