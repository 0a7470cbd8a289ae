package copies

import (
	"net"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/containerd/errdefs"
	"golang.org/x/sys/unix"
)

func TestCopyTree(t *testing.T) {
	type entry struct {
		path, data, link string
		dir              bool
	}
	for _, tc := range []struct {
		name    string
		make    func(t *testing.T, src string) // src does not exist yet
		limit   int64
		want    []entry // in order, the root first
		wantErr string
	}{
		{name: "file", limit: 10,
			make: func(t *testing.T, src string) { write(t, src, "token") },
			want: []entry{{path: "", data: "token"}}},
		{name: "empty dir", limit: 10,
			make: func(t *testing.T, src string) { mkdir(t, src) },
			want: []entry{{path: "", dir: true}}},
		{name: "dir with files and symlinks", limit: 100,
			make: func(t *testing.T, src string) {
				// A ConfigMap volume as the kubelet writes it.
				mkdir(t, src)
				mkdir(t, filepath.Join(src, "..2026_11_23"))
				write(t, filepath.Join(src, "..2026_11_23", "a"), "alpha")
				write(t, filepath.Join(src, "..2026_11_23", "b"), "beta")
				symlink(t, "..2026_11_23", filepath.Join(src, "..data"))
				symlink(t, "..data/a", filepath.Join(src, "a"))
			},
			want: []entry{{path: "", dir: true}, {path: "..2026_11_23", dir: true}, {path: "..2026_11_23/a", data: "alpha"},
				{path: "..2026_11_23/b", data: "beta"}, {path: "..data", link: "..2026_11_23"}, {path: "a", link: "..data/a"}}},
		{name: "nested", limit: 100,
			make: func(t *testing.T, src string) {
				mkdir(t, filepath.Join(src, "x", "y", "z"))
				write(t, filepath.Join(src, "x", "y", "z", "f"), "deep")
			},
			want: []entry{{path: "", dir: true}, {path: "x", dir: true}, {path: "x/y", dir: true}, {path: "x/y/z", dir: true}, {path: "x/y/z/f", data: "deep"}}},
		{name: "the source is a link to a dir", limit: 100,
			make: func(t *testing.T, src string) {
				mkdir(t, src+".real")
				write(t, filepath.Join(src+".real", "f"), "x")
				symlink(t, src+".real", src)
			},
			want: []entry{{path: "", dir: true}, {path: "f", data: "x"}}},
		{name: "exactly the limit", limit: 8,
			make: func(t *testing.T, src string) {
				mkdir(t, src)
				write(t, filepath.Join(src, "a"), "1234")
				write(t, filepath.Join(src, "b"), "5678")
			},
			want: []entry{{path: "", dir: true}, {path: "a", data: "1234"}, {path: "b", data: "5678"}}},
		{name: "over the limit", limit: 7,
			make: func(t *testing.T, src string) {
				mkdir(t, src)
				write(t, filepath.Join(src, "a"), "1234")
				write(t, filepath.Join(src, "b"), "5678")
			},
			wantErr: "holds 8 bytes, over the 7 bytes copied into the VM at most (guest.copied_mount_limit_bytes)"},
		{name: "file over the limit", limit: 4,
			make:    func(t *testing.T, src string) { write(t, src, "12345") },
			wantErr: "holds 5 bytes, over the 4"},
		{name: "socket in the tree", limit: 100,
			make: func(t *testing.T, src string) {
				mkdir(t, src)
				l, err := net.Listen("unix", filepath.Join(src, "s"))
				if err != nil {
					t.Fatal(err)
				}
				t.Cleanup(func() { l.Close() })
			},
			wantErr: "/s is a socket, which cannot be copied"},
		{name: "fifo", limit: 100,
			make: func(t *testing.T, src string) {
				if err := unix.Mkfifo(src, 0o600); err != nil {
					t.Fatal(err)
				}
			},
			wantErr: "is a fifo, which cannot be copied"},
		{name: "device", limit: 100,
			make:    func(t *testing.T, src string) { symlink(t, "/dev/null", src) },
			wantErr: "/dev/null is a character device, which cannot be copied"},
		{name: "missing", limit: 100,
			make:    func(t *testing.T, src string) {},
			wantErr: "cannot read"},
		{name: "unreadable", limit: 100,
			// Reading a process's mem at offset 0 fails (EIO), even for root.
			make:    func(t *testing.T, src string) { symlink(t, "/proc/self/mem", src) },
			wantErr: "cannot read /proc/"},
		{name: "dangling link copied as it is", limit: 100,
			make: func(t *testing.T, src string) {
				mkdir(t, src)
				symlink(t, "/nowhere", filepath.Join(src, "l"))
			},
			want: []entry{{path: "", dir: true}, {path: "l", link: "/nowhere"}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			src := filepath.Join(t.TempDir(), "src")
			tc.make(t, src)
			files, _, err := Tree(src, tc.limit)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) || !errdefs.IsInvalidArgument(err) {
					t.Fatalf("error %v, want an invalid argument saying %q", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			var got []entry
			for _, f := range files {
				e := entry{path: f.Path, data: string(f.Data), link: f.Link}
				switch f.Mode & syscall.S_IFMT {
				case syscall.S_IFDIR:
					e.dir = true
				case syscall.S_IFREG, syscall.S_IFLNK:
				default:
					t.Fatalf("%q has mode %o", f.Path, f.Mode)
				}
				got = append(got, e)
			}
			if len(got) != len(tc.want) {
				t.Fatalf("got %+v, want %+v", got, tc.want)
			}
			for i := range got {
				if got[i] != tc.want[i] {
					t.Fatalf("entry %d is %+v, want %+v", i, got[i], tc.want[i])
				}
			}
		})
	}
}

func write(t *testing.T, p, data string) {
	t.Helper()
	if err := os.WriteFile(p, []byte(data), 0o640); err != nil {
		t.Fatal(err)
	}
}

func mkdir(t *testing.T, p string) {
	t.Helper()
	if err := os.MkdirAll(p, 0o755); err != nil {
		t.Fatal(err)
	}
}

func symlink(t *testing.T, target, p string) {
	t.Helper()
	if err := os.Symlink(target, p); err != nil {
		t.Fatal(err)
	}
}
