package copies

import (
	"bytes"
	"context"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"

	"github.com/containerd/errdefs"
	"golang.org/x/sys/unix"

	"github.com/caisson-containers/caisson/internal/testutil"
)

const (
	tDir  = unix.S_IFDIR | 0o755
	tFile = unix.S_IFREG | 0o644
	tLink = unix.S_IFLNK | 0o777
)

// kubeletTree is a volume as the kubelet's atomic writer leaves it: version
// directory ts with the keys, "..data" linking to it, and a link per key.
func kubeletTree(ts string, keys map[string]string) []File {
	files := []File{{Mode: tDir}, {Path: ts, Mode: tDir}}
	names := make([]string, 0, len(keys))
	for k := range keys {
		names = append(names, k)
	}
	slices.Sort(names)
	for _, k := range names {
		files = append(files, File{Path: ts + "/" + k, Mode: tFile, Data: []byte(keys[k])})
	}
	files = append(files, File{Path: "..data", Mode: tLink, Link: ts})
	for _, k := range names {
		files = append(files, File{Path: k, Mode: tLink, Link: "..data/" + k})
	}
	return files
}

func TestUpdateTree(t *testing.T) {
	testutil.RequireRoot(t) // ownership
	outside := t.TempDir()
	for _, tc := range []struct {
		name          string
		before, after []File
		// check, if set, runs with the copy and what was open or known of it before the update.
		check   func(t *testing.T, dst string, before map[string]uint64, open map[string]*os.File)
		wantErr string
		errIs   error
	}{
		{name: "add a file and a directory",
			before: []File{{Mode: tDir}, {Path: "a", Mode: tFile, Data: []byte("alpha")}},
			after: []File{{Mode: tDir}, {Path: "a", Mode: tFile, Data: []byte("alpha")},
				{Path: "d", Mode: unix.S_IFDIR | 0o750, UID: 5, GID: 6}, {Path: "d/b", Mode: unix.S_IFREG | 0o400, UID: 5, GID: 6, Data: []byte("beta")}},
			check: func(t *testing.T, dst string, before map[string]uint64, _ map[string]*os.File) {
				if ino(t, filepath.Join(dst, "a")) != before["a"] {
					t.Error("the unchanged file was replaced")
				}
			}},
		{name: "change a file",
			before: []File{{Mode: tDir}, {Path: "a", Mode: tFile, Data: []byte("alpha")}},
			after:  []File{{Mode: tDir}, {Path: "a", Mode: tFile, Data: []byte("ALPHA, longer")}},
			check: func(t *testing.T, dst string, before map[string]uint64, open map[string]*os.File) {
				if ino(t, filepath.Join(dst, "a")) == before["a"] {
					t.Error("the changed file was written in place, not renamed over")
				}
				// A reader that had it open keeps reading the old content.
				if b := readAll(t, open["a"]); string(b) != "alpha" {
					t.Errorf("open file reads %q after the update, want the old content", b)
				}
			}},
		{name: "mode and owner only",
			before: []File{{Mode: tDir}, {Path: "a", Mode: tFile, Data: []byte("alpha")}},
			after:  []File{{Mode: unix.S_IFDIR | 0o700, UID: 3}, {Path: "a", Mode: unix.S_IFREG | 0o2600, UID: 1, GID: 2, Data: []byte("alpha")}},
			check: func(t *testing.T, dst string, before map[string]uint64, _ map[string]*os.File) {
				if ino(t, filepath.Join(dst, "a")) != before["a"] {
					t.Error("a file whose content did not change was replaced")
				}
			}},
		{name: "remove entries",
			before: []File{{Mode: tDir}, {Path: "a", Mode: tFile}, {Path: "d", Mode: tDir}, {Path: "d/e", Mode: tDir},
				{Path: "d/e/f", Mode: tFile, Data: []byte("x")}, {Path: "l", Mode: tLink, Link: "d/e/f"}},
			after: []File{{Mode: tDir}, {Path: "a", Mode: tFile}}},
		{name: "kubelet link swap",
			before: kubeletTree("..2026_11_23_17_00_00.1", map[string]string{"key": "old", "gone": "bye"}),
			after:  kubeletTree("..2026_11_23_18_00_00.2", map[string]string{"key": "new", "added": "hello"}),
			check: func(t *testing.T, dst string, _ map[string]uint64, open map[string]*os.File) {
				if b := readAll(t, open["key"]); string(b) != "old" {
					t.Errorf("open key reads %q after the swap, want the old content", b)
				}
			}},
		{name: "link retargeted",
			before: []File{{Mode: tDir}, {Path: "a", Mode: tFile, Data: []byte("a")}, {Path: "b", Mode: tFile, Data: []byte("b")}, {Path: "l", Mode: tLink, Link: "a"}},
			after:  []File{{Mode: tDir}, {Path: "a", Mode: tFile, Data: []byte("a")}, {Path: "b", Mode: tFile, Data: []byte("b")}, {Path: "l", Mode: tLink, Link: "b"}}},
		{name: "file becomes a directory, directory a link",
			before: []File{{Mode: tDir}, {Path: "f", Mode: tFile, Data: []byte("x")}, {Path: "d", Mode: tDir}, {Path: "d/x", Mode: tFile}},
			after:  []File{{Mode: tDir}, {Path: "d", Mode: tLink, Link: "f"}, {Path: "f", Mode: tDir}, {Path: "f/y", Mode: tFile, Data: []byte("y")}}},
		{name: "a link out of the copy becomes a directory",
			before: []File{{Mode: tDir}, {Path: "l", Mode: tLink, Link: outside}},
			after:  []File{{Mode: tDir}, {Path: "l", Mode: tDir}, {Path: "l/x", Mode: tFile, Data: []byte("in")}}},
		{name: "root file rewritten in place",
			before: []File{{Mode: tFile, Data: []byte("a long token")}},
			after:  []File{{Mode: unix.S_IFREG | 0o600, UID: 9, Data: []byte("short")}},
			check: func(t *testing.T, dst string, before map[string]uint64, _ map[string]*os.File) {
				if ino(t, dst) != before[""] {
					t.Error("the root file was replaced: a container's bind mount of it would not see the change")
				}
			}},
		{name: "root changes type", before: []File{{Mode: tFile}}, after: []File{{Mode: tDir}},
			wantErr: "the copy's root is a regular file and the source's a directory", errIs: errdefs.ErrFailedPrecondition},
		{name: "dotdot", before: []File{{Mode: tDir}}, after: []File{{Mode: tDir}, {Path: "../x", Mode: tFile}},
			wantErr: "not a clean relative path", errIs: errdefs.ErrInvalidArgument},
		{name: "absolute", before: []File{{Mode: tDir}}, after: []File{{Mode: tDir}, {Path: outside + "/x", Mode: tFile}},
			wantErr: "not a clean relative path", errIs: errdefs.ErrInvalidArgument},
		{name: "through a link out", before: []File{{Mode: tDir}, {Path: "l", Mode: tLink, Link: outside}},
			after:   []File{{Mode: tDir}, {Path: "l", Mode: tLink, Link: outside}, {Path: "l/x", Mode: tFile, Data: []byte("x")}},
			wantErr: "its parent is not a directory listed before it", errIs: errdefs.ErrInvalidArgument},
		{name: "listed twice", before: []File{{Mode: tDir}}, after: []File{{Mode: tDir}, {Path: "a", Mode: tFile}, {Path: "a", Mode: tDir}},
			wantErr: "listed twice", errIs: errdefs.ErrInvalidArgument},
		{name: "no root", before: []File{{Mode: tDir}}, after: []File{{Path: "a", Mode: tFile}},
			wantErr: "no root", errIs: errdefs.ErrInvalidArgument},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dst := filepath.Join(t.TempDir(), "copy")
			if err := WriteTree(dst, tc.before); err != nil {
				t.Fatal(err)
			}
			inodes := map[string]uint64{}
			open := map[string]*os.File{}
			for _, f := range tc.before {
				p := filepath.Join(dst, f.Path)
				inodes[f.Path] = ino(t, p)
				if f.Mode&unix.S_IFMT != unix.S_IFDIR {
					if r, err := os.Open(p); err == nil {
						t.Cleanup(func() { r.Close() })
						open[f.Path] = r
					}
				}
			}
			err := UpdateTree(dst, tc.after)
			if ents, _ := os.ReadDir(outside); len(ents) != 0 {
				t.Fatalf("wrote outside the copy: %v", ents)
			}
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) || !errors.Is(err, tc.errIs) {
					t.Fatalf("error %v, want %q (%v)", err, tc.wantErr, tc.errIs)
				}
				assertTree(t, dst, tc.before) // untouched
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			assertTree(t, dst, tc.after)
			if tc.check != nil {
				tc.check(t, dst, inodes, open)
			}
			// Applying the same tree again changes nothing.
			again := map[string]uint64{}
			for _, f := range tc.after {
				again[f.Path] = ino(t, filepath.Join(dst, f.Path))
			}
			if err := UpdateTree(dst, tc.after); err != nil {
				t.Fatal(err)
			}
			for _, f := range tc.after {
				if ino(t, filepath.Join(dst, f.Path)) != again[f.Path] {
					t.Errorf("a second identical update replaced %q", f.Path)
				}
			}
		})
	}
}

// TestUpdateTreeSteps checks every state a reader could see while a
// kubelet-shaped copy moves between versions: after each change UpdateTree
// makes, each key present in both versions reads as one complete version, and
// the one link "..data" names a complete version directory.
func TestUpdateTreeSteps(t *testing.T) {
	dst := filepath.Join(t.TempDir(), "copy")
	big := func(c string) string { return strings.Repeat(c, 64<<10) }
	versions := [][]File{
		kubeletTree("..2026_11_23_17_00_00.1", map[string]string{"a": big("1"), "b": "one", "gone": "x"}),
		kubeletTree("..2026_11_23_17_00_00.2", map[string]string{"a": big("2"), "b": "two", "added": "y"}),
	}
	want := map[string][]string{"a": {big("1"), big("2")}, "b": {"one", "two"}}
	if err := WriteTree(dst, versions[0]); err != nil {
		t.Fatal(err)
	}
	steps := 0
	updateStep = func() {
		steps++
		for key, vals := range want {
			b, err := os.ReadFile(filepath.Join(dst, key))
			if err != nil {
				t.Fatalf("step %d: %v", steps, err)
			}
			if string(b) != vals[0] && string(b) != vals[1] {
				t.Fatalf("step %d: %s holds %.10q…, neither version", steps, key, b)
			}
		}
		for _, k := range []string{"a", "b"} {
			b1, err1 := os.ReadFile(filepath.Join(dst, "..data", k))
			b2, err2 := os.ReadFile(filepath.Join(dst, k))
			if err1 != nil || err2 != nil || !bytes.Equal(b1, b2) {
				t.Fatalf("step %d: ..data/%s and %s differ (%v, %v)", steps, k, k, err1, err2)
			}
		}
	}
	t.Cleanup(func() { updateStep = nil })
	for i := range 2 {
		if err := UpdateTree(dst, versions[(i+1)%2]); err != nil {
			t.Fatal(err)
		}
		assertTree(t, dst, versions[(i+1)%2])
	}
	if steps < 10 {
		t.Fatalf("only %d steps checked", steps)
	}
}

func TestStoreUpdate(t *testing.T) {
	ctx := context.Background()
	c := New(filepath.Join(t.TempDir(), "mounts"))
	if err := c.Update("/host/cm", []File{{Mode: tDir}}); !errdefs.IsNotFound(err) {
		t.Fatalf("update of a key nobody holds: %v, want NotFound", err)
	}
	p, err := c.Acquire("c1", "/host/cm", kubeletTree("..1", map[string]string{"k": "v1"}))
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Update("/host/cm", kubeletTree("..2", map[string]string{"k": "v2"})); err != nil {
		t.Fatal(err)
	}
	if b, err := os.ReadFile(filepath.Join(p, "k")); err != nil || string(b) != "v2" {
		t.Fatalf("k after the update: %q, %v", b, err)
	}
	c.Release(ctx, "c1")
	if err := c.Update("/host/cm", []File{{Mode: tDir}}); !errdefs.IsNotFound(err) {
		t.Fatalf("update after the last release: %v, want NotFound", err)
	}
}

// assertTree checks that dst holds exactly files.
func assertTree(t *testing.T, dst string, files []File) {
	t.Helper()
	want := map[string]File{}
	for _, f := range files {
		want[f.Path] = f
	}
	got := map[string]bool{}
	root := files[0].Mode&unix.S_IFMT == unix.S_IFDIR
	walk := func(p string) {
		rel, _ := filepath.Rel(dst, p)
		if rel == "." {
			rel = ""
		}
		got[rel] = true
		f, ok := want[rel]
		if !ok {
			t.Errorf("%q is in the copy but not in the source", rel)
			return
		}
		var st unix.Stat_t
		if err := unix.Lstat(p, &st); err != nil {
			t.Fatal(err)
		}
		if st.Mode&unix.S_IFMT != f.Mode&unix.S_IFMT || (f.Mode&unix.S_IFMT != unix.S_IFLNK && st.Mode != f.Mode) || st.Uid != f.UID || st.Gid != f.GID {
			t.Errorf("%q: mode %o uid %d gid %d, want %o %d %d", rel, st.Mode, st.Uid, st.Gid, f.Mode, f.UID, f.GID)
		}
		switch f.Mode & syscall.S_IFMT {
		case syscall.S_IFREG:
			if b, _ := os.ReadFile(p); !bytes.Equal(b, f.Data) {
				t.Errorf("%q holds %q, want %q", rel, b, f.Data)
			}
		case syscall.S_IFLNK:
			if l, _ := os.Readlink(p); l != f.Link {
				t.Errorf("%q links to %q, want %q", rel, l, f.Link)
			}
		}
	}
	if !root {
		walk(dst)
	} else if err := filepath.WalkDir(dst, func(p string, _ fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		walk(p)
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	for p := range want {
		if !got[p] {
			t.Errorf("%q is missing from the copy", p)
		}
	}
}

func ino(t *testing.T, p string) uint64 {
	t.Helper()
	var st unix.Stat_t
	if err := unix.Lstat(p, &st); err != nil {
		t.Fatal(err)
	}
	return st.Ino
}

func readAll(t *testing.T, f *os.File) []byte {
	t.Helper()
	if f == nil {
		t.Fatal("not open")
	}
	b := make([]byte, 1<<10)
	n, err := f.ReadAt(b, 0)
	if err != nil && n == 0 {
		t.Fatal(err)
	}
	return b[:n]
}
