package copies

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/caisson-containers/caisson/internal/testutil"
)

func TestWriteTree(t *testing.T) {
	testutil.RequireRoot(t) // ownership
	dir := unix.S_IFDIR | 0o755
	outside := t.TempDir()
	for _, tc := range []struct {
		name    string
		files   []File
		wantErr string
	}{
		{name: "file", files: []File{{Mode: unix.S_IFREG | 0o640, UID: 1000, GID: 2000, Data: []byte("token")}}},
		{name: "tree", files: []File{
			{Mode: uint32(dir)},
			{Path: "d", Mode: unix.S_IFDIR | 0o2770, UID: 7, GID: 8},
			{Path: "d/f", Mode: unix.S_IFREG | 0o400, UID: 7, GID: 8, Data: []byte("alpha")},
			{Path: "l", Mode: unix.S_IFLNK | 0o777, UID: 7, GID: 8, Link: "d/f"},
		}},
		{name: "no root", files: []File{{Path: "f", Mode: unix.S_IFREG}}, wantErr: "no root"},
		{name: "file root with children", files: []File{{Mode: unix.S_IFREG}, {Path: "f", Mode: unix.S_IFREG}}, wantErr: "the root is a regular file"},
		{name: "dotdot", files: []File{{Mode: uint32(dir)}, {Path: "../x", Mode: unix.S_IFREG}}, wantErr: "not a clean relative path"},
		{name: "absolute", files: []File{{Mode: uint32(dir)}, {Path: "/x", Mode: unix.S_IFREG}}, wantErr: "not a clean relative path"},
		{name: "through a link out", files: []File{{Mode: uint32(dir)}, {Path: "l", Mode: unix.S_IFLNK, Link: outside},
			{Path: "l/x", Mode: unix.S_IFREG, Data: []byte("x")}}, wantErr: "its parent is not a directory listed before it"},
		{name: "device", files: []File{{Mode: uint32(dir)}, {Path: "null", Mode: unix.S_IFCHR | 0o666}}, wantErr: "not a regular file, directory or symbolic link"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dst := filepath.Join(t.TempDir(), "copy")
			err := WriteTree(dst, tc.files)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("error %v, want %q", err, tc.wantErr)
				}
				if ents, _ := os.ReadDir(outside); len(ents) != 0 {
					t.Fatalf("wrote outside: %v", ents)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			for _, f := range tc.files {
				p := filepath.Join(dst, f.Path)
				var st unix.Stat_t
				if err := unix.Lstat(p, &st); err != nil {
					t.Fatal(err)
				}
				if (f.Mode&unix.S_IFMT != unix.S_IFLNK && st.Mode != f.Mode) || st.Mode&unix.S_IFMT != f.Mode&unix.S_IFMT || st.Uid != f.UID || st.Gid != f.GID {
					t.Fatalf("%q: mode %o uid %d gid %d, want %o %d %d", f.Path, st.Mode, st.Uid, st.Gid, f.Mode, f.UID, f.GID)
				}
				switch f.Mode & syscall.S_IFMT {
				case syscall.S_IFREG:
					if b, _ := os.ReadFile(p); string(b) != string(f.Data) {
						t.Fatalf("%q holds %q", f.Path, b)
					}
				case syscall.S_IFLNK:
					if l, _ := os.Readlink(p); l != f.Link {
						t.Fatalf("%q links to %q", f.Path, l)
					}
				}
			}
		})
	}
}

func TestStoreShared(t *testing.T) {
	ctx := context.Background()
	c := New(filepath.Join(t.TempDir(), "mounts"))
	tree := []File{{Mode: unix.S_IFDIR | 0o755}}
	a, err := c.Acquire("c1", "/host/empty-dir", tree)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(a, "written"), []byte("by c1"), 0o644); err != nil {
		t.Fatal(err)
	}
	// The second container's files are ignored: it sees what the first wrote.
	b, err := c.Acquire("c2", "/host/empty-dir", []File{{Mode: unix.S_IFREG}})
	if err != nil || b != a {
		t.Fatalf("second acquire: %q, %v; want %q", b, err, a)
	}
	other, err := c.Acquire("c2", "/host/other", tree)
	if err != nil || other == a {
		t.Fatalf("other key: %q, %v", other, err)
	}
	c.Release(ctx, "c1")
	if _, err := os.Stat(filepath.Join(a, "written")); err != nil {
		t.Fatalf("released while c2 uses it: %v", err)
	}
	c.Release(ctx, "c2")
	for _, p := range []string{a, other} {
		if _, err := os.Stat(p); !os.IsNotExist(err) {
			t.Fatalf("%s left after the last release: %v", p, err)
		}
	}
}
