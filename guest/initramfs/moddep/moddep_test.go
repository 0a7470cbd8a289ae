package moddep

import (
	"bytes"
	"errors"
	"slices"
	"strings"
	"testing"

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
	dep, err := Parse(strings.NewReader(testDep))
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

func TestRoots(t *testing.T) {
	dep, err := Parse(strings.NewReader(testDep))
	if err != nil {
		t.Fatal(err)
	}
	// x and y need each other; missing.ko is needed but not in the graph.
	if got, want := dep.Roots(), []string{"a", "d_e", "z"}; !slices.Equal(got, want) {
		t.Fatalf("Roots() = %v, want %v", got, want)
	}
}

func TestWriteSubsetRoundTrip(t *testing.T) {
	dep, err := Parse(strings.NewReader(testDep))
	if err != nil {
		t.Fatal(err)
	}
	mods, err := dep.Closure([]string{"a", "d-e"})
	if err != nil {
		t.Fatal(err)
	}
	var buf bytes.Buffer
	if err := dep.WriteSubset(&buf, mods); err != nil {
		t.Fatal(err)
	}
	sub, err := Parse(&buf)
	if err != nil {
		t.Fatal(err)
	}
	if got, want := sub.Roots(), []string{"a", "d_e"}; !slices.Equal(got, want) {
		t.Errorf("subset roots %v, want %v", got, want)
	}
	got, err := sub.Closure(sub.Roots())
	if err != nil || !slices.Equal(got, []string{"kernel/c.ko", "kernel/b.ko", "kernel/a.ko", "kernel/d-e.ko.xz"}) {
		t.Errorf("subset closure %v (%v)", got, err)
	}
	if err := dep.WriteSubset(&buf, []string{"kernel/nope.ko"}); !errors.Is(err, errdefs.ErrNotFound) {
		t.Errorf("unknown module: %v", err)
	}
}

func TestName(t *testing.T) {
	for in, want := range map[string]string{
		"kernel/drivers/char/hw_random/virtio-rng.ko": "virtio_rng",
		"kernel/fs/erofs/erofs.ko.xz":                 "erofs",
	} {
		if got := Name(in); got != want {
			t.Errorf("Name(%q) = %q, want %q", in, got, want)
		}
	}
}
