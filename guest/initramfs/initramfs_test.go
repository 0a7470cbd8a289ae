package initramfs

import (
	"bytes"
	"compress/gzip"
	"errors"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/cavaliergopher/cpio"
	"github.com/containerd/errdefs"
)

const testDep = `kernel/a.ko: kernel/b.ko kernel/c.ko
kernel/b.ko: kernel/c.ko
kernel/c.ko:
kernel/d-e.ko.xz: kernel/c.ko
kernel/x.ko: kernel/y.ko
kernel/y.ko: kernel/x.ko
kernel/z.ko: kernel/missing.ko
`

func TestClosure(t *testing.T) {
	dep, err := ParseModulesDep(strings.NewReader(testDep))
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name    string
		modules []string
		want    []string
		wantErr error
	}{
		{name: "leaf", modules: []string{"c"}, want: []string{"kernel/c.ko"}},
		{name: "deps first", modules: []string{"a"}, want: []string{"kernel/c.ko", "kernel/b.ko", "kernel/a.ko"}},
		{name: "shared deps once", modules: []string{"d_e", "a"}, want: []string{"kernel/c.ko", "kernel/d-e.ko.xz", "kernel/b.ko", "kernel/a.ko"}},
		{name: "dash name", modules: []string{"d-e"}, want: []string{"kernel/c.ko", "kernel/d-e.ko.xz"}},
		{name: "unknown", modules: []string{"nope"}, wantErr: errdefs.ErrNotFound},
		{name: "missing dependency", modules: []string{"z"}, wantErr: errdefs.ErrNotFound},
		{name: "cycle", modules: []string{"x"}, wantErr: errdefs.ErrFailedPrecondition},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := dep.Closure(tc.modules)
			if tc.wantErr != nil {
				if !errors.Is(err, tc.wantErr) {
					t.Fatalf("err = %v, want %v", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if !slices.Equal(got, tc.want) {
				t.Fatalf("got %v, want %v", got, tc.want)
			}
		})
	}
}

func TestBuildDeterministic(t *testing.T) {
	dir := t.TempDir()
	write := func(name, content string) string {
		p := filepath.Join(dir, name)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	img := Image{
		Agent:         write("agent", "the agent"),
		KernelRelease: "6.1.0-test",
		ModulesDir:    filepath.Join(dir, "mods"),
		ModulesDep:    write("modules.dep", testDep),
		Modules:       []string{"a"},
		Busybox:       write("busybox", "busybox"),
	}
	for _, m := range []string{"a", "b", "c"} {
		write("mods/kernel/"+m+".ko", "module "+m)
	}
	build := func() []byte {
		a, err := Build(img)
		if err != nil {
			t.Fatal(err)
		}
		var buf bytes.Buffer
		if _, err := a.WriteTo(&buf); err != nil {
			t.Fatal(err)
		}
		return buf.Bytes()
	}
	first := build()
	// Different host timestamps and permissions must not change the bytes.
	if err := os.Chtimes(img.Agent, time0, time0); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(first, build()) {
		t.Fatal("two builds of the same inputs differ")
	}

	zr, err := gzip.NewReader(bytes.NewReader(first))
	if err != nil {
		t.Fatal(err)
	}
	r := cpio.NewReader(zr)
	got := map[string]string{}
	var order []string
	for {
		hdr, err := r.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		if !hdr.ModTime.Equal(time0) || hdr.Uid != 0 || hdr.Guid != 0 {
			t.Errorf("%s: mtime %v uid %d gid %d, want zero", hdr.Name, hdr.ModTime, hdr.Uid, hdr.Guid)
		}
		b, _ := io.ReadAll(r)
		got[hdr.Name] = string(b)
		order = append(order, hdr.Name)
	}
	if !slices.IsSorted(order) {
		t.Errorf("entries not sorted: %v", order)
	}
	for name, want := range map[string]string{
		"init":                                "the agent",
		"lib/modules/6.1.0-test/kernel/a.ko":  "module a",
		"lib/modules/6.1.0-test/modules.load": "kernel/c.ko\nkernel/b.ko\nkernel/a.ko\n",
		"bin/busybox":                         "busybox",
		"dev":                                 "",
	} {
		if got[name] != want {
			t.Errorf("%s = %q, want %q", name, got[name], want)
		}
	}

	img.Busybox = ""
	if bytes.Equal(first, build()) {
		t.Fatal("an image without busybox is the same as one with it")
	}
}

var time0 = time.Unix(0, 0)
