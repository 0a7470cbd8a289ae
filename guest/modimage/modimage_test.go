package modimage

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/containerd/errdefs"
	erofs "github.com/erofs/go-erofs"
)

// signed appends a kernel module signature trailer to ko (see initramfs.StripModuleSignature).
func signed(ko, sig string) []byte {
	b := []byte(ko + sig)
	info := make([]byte, 12)
	info[2] = 2
	binary.BigEndian.PutUint32(info[8:], uint32(len(sig)))
	b = append(b, info...)
	return append(b, "~Module signature appended~\n"...)
}

var time1 = time.Unix(1e9, 0)

func TestBuild(t *testing.T) {
	if _, err := exec.LookPath("mkfs.erofs"); err != nil {
		t.Skip("mkfs.erofs not installed (erofs-utils)")
	}
	src := t.TempDir()
	files := map[string][]byte{
		"modules.dep":                  []byte("kernel/net/llc/llc.ko:\nkernel/net/bridge/bridge.ko: kernel/net/llc/llc.ko\n"),
		"modules.alias":                []byte("alias rtnl-link-bridge bridge\n"),
		"kernel/net/llc/llc.ko":        []byte("\x7fELF llc"),
		"kernel/net/bridge/bridge.ko":  signed("\x7fELF bridge", "SIGNATURE"),
		"kernel/net/bridge/readme.txt": []byte("kept as it is"),
	}
	for name, b := range files {
		p := filepath.Join(src, name)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.Symlink("/usr/src/linux-headers", filepath.Join(src, "build")); err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	out := filepath.Join(t.TempDir(), FileName)
	img := Image{Dir: src, Release: "6.1.0-test"}
	if err := Build(ctx, img, out); err != nil {
		t.Fatal(err)
	}
	first, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	if len(first) == 0 || len(first)%Alignment != 0 {
		t.Errorf("image of %d bytes, not a multiple of %d", len(first), Alignment)
	}
	// Other timestamps on the host give the same bytes.
	if err := os.Chtimes(filepath.Join(src, "modules.dep"), time1, time1); err != nil {
		t.Fatal(err)
	}
	if err := Build(ctx, img, out); err != nil {
		t.Fatal(err)
	}
	if second, _ := os.ReadFile(out); !bytes.Equal(first, second) {
		t.Error("two builds of the same tree differ")
	}

	f, err := os.Open(out)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	info, err := Inspect(f)
	if err != nil || len(info.Releases) != 1 || info.Releases[0] != "6.1.0-test" || info.Modules["6.1.0-test"] != 2 {
		t.Fatalf("Inspect: %+v, %v", info, err)
	}
	fsys, err := erofs.Open(f)
	if err != nil {
		t.Fatal(err)
	}
	for name, want := range map[string]string{
		"6.1.0-test/kernel/net/bridge/bridge.ko":  "\x7fELF bridge",
		"6.1.0-test/kernel/net/llc/llc.ko":        "\x7fELF llc",
		"6.1.0-test/kernel/net/bridge/readme.txt": "kept as it is",
		"6.1.0-test/modules.alias":                "alias rtnl-link-bridge bridge\n",
	} {
		got, err := fs.ReadFile(fsys, name)
		if err != nil || string(got) != want {
			t.Errorf("%s = %q, %v; want %q", name, got, err, want)
		}
	}
	if _, err := fs.Stat(fsys, "6.1.0-test/build"); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("the headers link came along: %v", err)
	}
}

func TestBuildBadInput(t *testing.T) {
	ctx := context.Background()
	out := filepath.Join(t.TempDir(), FileName)
	if err := Build(ctx, Image{Dir: t.TempDir(), Release: "6.1"}, out); !errdefs.IsNotFound(err) {
		t.Errorf("a tree without modules.dep: %v", err)
	}
	if err := Build(ctx, Image{Dir: t.TempDir(), Release: "../x"}, out); !errdefs.IsInvalidArgument(err) {
		t.Errorf("a release with a slash: %v", err)
	}
	if _, err := os.Stat(out); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("a failed build left %s", out)
	}
	if _, err := Inspect(bytes.NewReader(make([]byte, 8192))); !errdefs.IsInvalidArgument(err) {
		t.Errorf("Inspect of zeros: %v", err)
	}
}
