package snapshottest

import (
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestCheck builds a small tree and checks that Check passes on the exact
// expectation and reports each kind of difference.
func TestCheck(t *testing.T) {
	root := t.TempDir()
	mtime := time.Date(2020, 1, 2, 3, 4, 5, 0, time.UTC)
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	must(os.Mkdir(filepath.Join(root, "d"), 0o750))
	must(os.WriteFile(filepath.Join(root, "d", "f"), []byte("hello"), 0o640))
	must(os.Chmod(filepath.Join(root, "d"), 0o750))
	must(os.Chmod(filepath.Join(root, "d", "f"), 0o640))
	must(os.Link(filepath.Join(root, "d", "f"), filepath.Join(root, "hl")))
	must(os.Symlink("d/f", filepath.Join(root, "ln")))
	for _, p := range []string{"d/f", "d"} {
		must(os.Chtimes(filepath.Join(root, p), mtime, mtime))
	}
	uid, gid := os.Getuid(), os.Getgid()
	want := []Entry{
		{Path: "d", Mode: fs.ModeDir | 0o750, UID: uid, GID: gid, ModTime: mtime},
		{Path: "d/f", Mode: 0o640, UID: uid, GID: gid, Data: []byte("hello"), ModTime: mtime},
		{Path: "hl", Mode: 0o640, UID: uid, GID: gid, Data: []byte("hello"), Link: "d/f"},
		{Path: "ln", Mode: fs.ModeSymlink | 0o777, UID: uid, GID: gid, Target: "d/f"},
	}
	if err := Check(root, want); err != nil {
		t.Fatalf("exact expectation: %v", err)
	}
	for _, tc := range []struct {
		name string
		edit func([]Entry) []Entry
		want string
	}{
		{"content", func(e []Entry) []Entry { e[1].Data = []byte("hellO"); return e }, "d/f: content differs"},
		{"size", func(e []Entry) []Entry { e[1].Data = []byte("hi"); return e }, "d/f: size 5, want 2"},
		{"mode", func(e []Entry) []Entry { e[0].Mode = fs.ModeDir | 0o755; return e }, "d: mode"},
		{"setuid", func(e []Entry) []Entry { e[1].Mode |= fs.ModeSetuid; return e }, "d/f: mode"},
		{"owner", func(e []Entry) []Entry { e[1].UID = uid + 1; return e }, "d/f: owner"},
		{"mtime", func(e []Entry) []Entry { e[0].ModTime = mtime.Add(time.Second); return e }, "d: mtime"},
		{"target", func(e []Entry) []Entry { e[3].Target = "d"; return e }, "ln: symlink target"},
		{"xattr", func(e []Entry) []Entry { e[1].Xattrs = map[string]string{"user.x": "1"}; return e }, "d/f: xattrs"},
		{"missing", func(e []Entry) []Entry { return append(e, Entry{Path: "gone", Mode: 0o644}) }, "gone: missing"},
		{"unexpected", func(e []Entry) []Entry { return e[:3] }, "ln: unexpected"},
		{"hardlink", func(e []Entry) []Entry { e[3].Link = "d/f"; return e }, "ln: not a hardlink of d/f"},
		{"whiteout", func(e []Entry) []Entry { return append(e, Whiteout("d/w")) }, "d/w: missing"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			w := tc.edit(append([]Entry(nil), want...))
			err := Check(root, w)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("got %v, want an error containing %q", err, tc.want)
			}
		})
	}
}
