package ext4read

import (
	"bytes"
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"

	"github.com/containerd/errdefs"
)

// seedImage builds, without root, a small ext4 image whose /upper holds a few
// files, a directory and a fragmented file (an extent tree with an index level),
// with mkfs.ext4 -d as a stand-in for what a guest writes.
func seedImage(t testing.TB, blockSize int) string {
	t.Helper()
	for _, b := range []string{"mkfs.ext4", "debugfs"} {
		if _, err := exec.LookPath(b); err != nil {
			t.Skipf("needs %s", b)
		}
	}
	dir := t.TempDir()
	src := filepath.Join(dir, "src")
	for _, d := range []string{"upper/sub/deeper", "work"} {
		if err := os.MkdirAll(filepath.Join(src, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	for i := 0; i < 20; i++ {
		if err := os.WriteFile(filepath.Join(src, "upper", fmt.Sprintf("f%02d", i)), []byte(strings.Repeat("x", i*100)), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.Symlink("f01", filepath.Join(src, "upper/sub/link")); err != nil {
		t.Fatal(err)
	}
	img := filepath.Join(dir, "rw.ext4")
	args := []string{"-q", "-F", "-b", strconv.Itoa(blockSize), "-O", "^has_journal", "-N", "48", "-d", src, img, "400"}
	if out, err := exec.Command("mkfs.ext4", args...).CombinedOutput(); err != nil {
		t.Fatalf("mkfs.ext4: %v: %s", err, out)
	}
	// A fragmented file: 8 one-block extents with holes between them, too many
	// for the inode's 4 root entries, so the tree gets an index level.
	frag := filepath.Join(dir, "frag")
	fh, err := os.Create(frag)
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 8; i++ {
		fh.WriteAt([]byte(fmt.Sprintf("extent %d", i)), int64(i*2*blockSize))
	}
	fh.Close()
	debugfs(t, img, "write "+frag+" /upper/frag")
	return img
}

// debugfs runs one debugfs -w request on img and returns its output.
func debugfs(t testing.TB, img, req string) string {
	t.Helper()
	out, err := exec.Command("debugfs", "-w", "-R", req, img).CombinedOutput()
	if err != nil {
		t.Fatalf("debugfs %q: %v: %s", req, err, out)
	}
	return string(out)
}

// walkTar is what the snapshotter does with an image: WriteTar of /upper.
func walkTar(img string, limits Limits, opts TarOptions) error {
	fh, err := os.Open(img)
	if err != nil {
		return err
	}
	defer fh.Close()
	fi, err := fh.Stat()
	if err != nil {
		return err
	}
	f, err := Open(fh, fi.Size(), limits)
	if err != nil {
		return err
	}
	upper, err := f.Lookup("upper")
	if err != nil {
		return err
	}
	return WriteTar(context.Background(), f, upper, io.Discard, opts)
}

// patch writes b at off of img.
func patch(t *testing.T, img string, off int64, b []byte) {
	t.Helper()
	fh, err := os.OpenFile(img, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer fh.Close()
	if _, err := fh.WriteAt(b, off); err != nil {
		t.Fatal(err)
	}
}

// TestHostileImages: an image made to hurt the reader gives a clean error of
// the right kind naming what is wrong, and no panic, hang or huge allocation.
func TestHostileImages(t *testing.T) {
	const bs = 1024
	le := binary.LittleEndian
	for _, tc := range []struct {
		name   string
		hurt   func(t *testing.T, img string)
		limits Limits
		opts   TarOptions
		kind   func(error) bool
		want   string // in the error
	}{
		{name: "intact", hurt: func(*testing.T, string) {}},
		{
			name: "truncated",
			hurt: func(t *testing.T, img string) {
				// Cut where f19's data starts.
				if err := os.Truncate(img, int64(firstBlock(t, debugfs(t, img, "stat /upper/f19")))*bs); err != nil {
					t.Fatal(err)
				}
			},
			kind: errdefs.IsInvalidArgument, want: "f19: ext4 image: inode",
		},
		{
			name: "a file claiming 1 TiB",
			hurt: func(t *testing.T, img string) { debugfs(t, img, "sif /upper/f05 size 0x10000000000") },
			kind: errdefs.IsInvalidArgument, want: `f05: a file of 1099511627776 bytes`,
		},
		{
			name: "files claiming more than a layer's total",
			hurt: func(t *testing.T, img string) {
				debugfs(t, img, "sif /upper/f05 size 0x100000000")
				debugfs(t, img, "sif /upper/f06 size 0x100000000")
			},
			opts: TarOptions{MaxLayerSize: 6 << 30},
			kind: errdefs.IsInvalidArgument, want: "f06: the files hold more than",
		},
		{
			name: "a directory claiming 1 TiB",
			hurt: func(t *testing.T, img string) { debugfs(t, img, "sif /upper/sub size 0x10000000000") },
			kind: errdefs.IsInvalidArgument, want: "sub: ext4 image: directory inode",
		},
		{
			name: "a directory loop",
			hurt: func(t *testing.T, img string) { debugfs(t, img, "link /upper /upper/sub/deeper/loop") },
			kind: errdefs.IsInvalidArgument, want: "sub/deeper/loop: ext4 image: directory inode",
		},
		{
			name: "a symlink claiming a long target",
			hurt: func(t *testing.T, img string) { debugfs(t, img, "sif /upper/sub/link size 0x7fffffff") },
			kind: errdefs.IsInvalidArgument, want: "sub/link: ext4 image: inode",
		},
		{
			name: "an inode number past the inode count",
			hurt: func(t *testing.T, img string) {
				// The directory entry of f00 names inode 100000.
				out := debugfs(t, img, "stat /upper")
				blk := firstBlock(t, out)
				b := readAt(t, img, int64(blk)*bs, bs)
				i := bytes.Index(b, []byte("f00"))
				if i < 8 {
					t.Fatalf("no entry f00 in the block of /upper")
				}
				patch(t, img, int64(blk)*bs+int64(i-8), le.AppendUint32(nil, 100000))
			},
			kind: errdefs.IsInvalidArgument, want: `entry "f00" names inode 100000`,
		},
		{
			name: "a directory entry overrunning its block",
			hurt: func(t *testing.T, img string) {
				blk := firstBlock(t, debugfs(t, img, "stat /upper/sub"))
				patch(t, img, int64(blk)*bs+4, le.AppendUint16(nil, 2000))
			},
			kind: errdefs.IsInvalidArgument, want: "entry length 2000",
		},
		{
			name: "an extent tree node pointing at itself",
			hurt: func(t *testing.T, img string) {
				// The index level's leaf block: make it an index node (depth 1)
				// whose one entry is itself.
				out := debugfs(t, img, "ex /upper/frag")
				m := regexp.MustCompile(`(?m)^\s*0/\s*1\s+1/\s*1\s+0\s*-\s*\d+\s+(\d+)`).FindStringSubmatch(out)
				if m == nil {
					t.Fatalf("no index level in the extent tree:\n%s", out)
				}
				leaf, _ := strconv.Atoi(m[1])
				node := make([]byte, 24)
				le.PutUint16(node[0:], extentMagic)
				le.PutUint16(node[2:], 1)
				le.PutUint16(node[4:], 84)
				le.PutUint16(node[6:], 1)
				le.PutUint32(node[16:], uint32(leaf))
				patch(t, img, int64(leaf)*bs, node)
			},
			kind: errdefs.IsInvalidArgument, want: "frag: ext4 image: inode",
		},
		{
			name:   "more entries than the limit",
			hurt:   func(*testing.T, string) {},
			limits: Limits{MaxEntries: 10},
			kind:   errdefs.IsInvalidArgument, want: "more than 10 entries",
		},
		{
			name:   "a path deeper than the limit",
			hurt:   func(*testing.T, string) {},
			limits: Limits{MaxDepth: 1},
			kind:   errdefs.IsInvalidArgument, want: "sub/deeper: ext4 image: a path 2 elements deep",
		},
		{
			name: "not ext4",
			hurt: func(t *testing.T, img string) { patch(t, img, 1024+56, []byte{0, 0}) },
			kind: errdefs.IsInvalidArgument, want: "no ext2/3/4 superblock",
		},
		{
			name: "an unknown incompat feature",
			hurt: func(t *testing.T, img string) {
				b := readAt(t, img, 1024+96, 4)
				patch(t, img, 1024+96, le.AppendUint32(nil, le.Uint32(b)|incompatInlineData))
			},
			kind: errdefs.IsNotImplemented, want: "incompat features",
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			img := seedImage(t, bs)
			tc.hurt(t, img)
			err := walkTar(img, tc.limits, tc.opts)
			t.Log(err)
			if tc.kind == nil {
				if err != nil {
					t.Fatal(err)
				}
				return
			}
			if err == nil || !tc.kind(err) || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("got %v, want an error of the right kind holding %q", err, tc.want)
			}
		})
	}
}

// firstBlock is the first data block in a debugfs stat output.
func firstBlock(t *testing.T, stat string) uint64 {
	t.Helper()
	m := regexp.MustCompile(`\(0(?:-\d+)?\):(\d+)`).FindStringSubmatch(stat)
	if m == nil {
		t.Fatalf("no block in:\n%s", stat)
	}
	b, _ := strconv.ParseUint(m[1], 10, 64)
	return b
}

func readAt(t *testing.T, img string, off int64, n int) []byte {
	t.Helper()
	fh, err := os.Open(img)
	if err != nil {
		t.Fatal(err)
	}
	defer fh.Close()
	b := make([]byte, n)
	if _, err := fh.ReadAt(b, off); err != nil {
		t.Fatal(err)
	}
	return b
}

// FuzzWalk: whatever the bytes, reading an image ends in a tar or an error,
// never a panic or a hang.
func FuzzWalk(f *testing.F) {
	f.Add(readFile(f, seedImage(f, 1024)))
	f.Fuzz(func(t *testing.T, img []byte) {
		fsys, err := Open(bytes.NewReader(img), int64(len(img)), Limits{MaxEntries: 1000, MaxDirSize: 1 << 20})
		if err != nil {
			return
		}
		root, err := fsys.Lookup("/")
		if err != nil {
			return
		}
		WriteTar(context.Background(), fsys, root, io.Discard, TarOptions{MaxFileSize: 1 << 20, MaxLayerSize: 4 << 20})
		WriteTar(context.Background(), fsys, root, io.Discard, TarOptions{Format: FormatOCI, MaxFileSize: 1 << 20, MaxLayerSize: 4 << 20})
	})
}

func readFile(t testing.TB, p string) []byte {
	t.Helper()
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	return b
}
