package initramfs

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/cavaliergopher/cpio"
	"github.com/containerd/errdefs"
	"github.com/pierrec/lz4/v4"
)

const testDep = `kernel/a.ko: kernel/b.ko kernel/c.ko
kernel/b.ko: kernel/c.ko
kernel/c.ko:
kernel/d-e.ko.xz: kernel/c.ko
kernel/x.ko: kernel/y.ko
kernel/y.ko: kernel/x.ko
kernel/z.ko: kernel/missing.ko
`

// writer returns a function that writes a file under dir, with its directories, and
// returns its path.
func writer(t *testing.T, dir string) func(name, content string) string {
	return func(name, content string) string {
		p := filepath.Join(dir, name)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
}

func TestBuildDeterministic(t *testing.T) {
	dir := t.TempDir()
	write := writer(t, dir)
	img := Image{
		Agent:         write("agent", "the agent"),
		KernelRelease: "6.1.0-test",
		ModulesDir:    filepath.Join(dir, "mods"),
		ModulesDep:    write("modules.dep", testDep),
		Modules:       []string{"a"},
		Busybox:       write("busybox", "busybox"),
	}
	for _, m := range []string{"a", "b"} {
		write("mods/kernel/"+m+".ko", "module "+m)
	}
	write("mods/kernel/c.ko", string(signed("module c", "SIG")))
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

	r := cpio.NewReader(lz4.NewReader(bytes.NewReader(first)))
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
		"init":                               "the agent",
		"lib/modules/6.1.0-test/kernel/a.ko": "module a",
		"lib/modules/6.1.0-test/modules.dep": "kernel/c.ko:\nkernel/b.ko: kernel/c.ko\nkernel/a.ko: kernel/b.ko kernel/c.ko\n",
		"bin/busybox":                        "busybox",
		"dev":                                "",
	} {
		if got[name] != want {
			t.Errorf("%s = %q, want %q", name, got[name], want)
		}
	}

	// The agent makes /sbin/modprobe itself once it runs: with it in the image, the
	// kernel would run the agent as modprobe during its initcalls.
	if _, ok := got["sbin/modprobe"]; ok {
		t.Error("the image has sbin/modprobe")
	}

	img.Busybox = ""
	if bytes.Equal(first, build()) {
		t.Fatal("an image without busybox is the same as one with it")
	}
}

var time0 = time.Unix(0, 0)

// signed appends a kernel module signature trailer with sig to ko.
func signed(ko, sig string) []byte {
	b := []byte(ko + sig)
	info := make([]byte, moduleSigInfoLen)
	info[2] = 2 // PKEY_ID_PKCS7
	binary.BigEndian.PutUint32(info[8:], uint32(len(sig)))
	b = append(b, info...)
	return append(b, moduleSigMagic...)
}

func TestStripModuleSignature(t *testing.T) {
	for _, tc := range []struct {
		name    string
		in      []byte
		want    string
		wantErr error
	}{
		{name: "signed", in: signed("\x7fELF module", "0123456789"), want: "\x7fELF module"},
		{name: "unsigned", in: []byte("\x7fELF module"), want: "\x7fELF module"},
		{name: "empty signature", in: signed("\x7fELF", ""), want: "\x7fELF"},
		{name: "truncated trailer", in: []byte("x" + moduleSigMagic), wantErr: errdefs.ErrInvalidArgument},
		{name: "signature longer than the module", in: signed("", "abc")[3:], wantErr: errdefs.ErrInvalidArgument},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := StripModuleSignature(tc.in)
			if tc.wantErr != nil {
				if !errors.Is(err, tc.wantErr) {
					t.Fatalf("err = %v, want %v", err, tc.wantErr)
				}
				return
			}
			if err != nil || string(got) != tc.want {
				t.Fatalf("got %q, %v; want %q", got, err, tc.want)
			}
		})
	}
}

func TestLZ4Legacy(t *testing.T) {
	// More than a block: some incompressible bytes, then text.
	const size = lz4LegacyBlock + 12345
	data := make([]byte, 64<<10)
	rnd := rand.New(rand.NewPCG(1, 2))
	for i := range data {
		data[i] = byte(rnd.Uint32())
	}
	for i := 0; len(data) < size; i++ {
		data = fmt.Appendf(data, "line %d\n", i)
	}
	data = data[:size]
	for _, tc := range []struct {
		name string
		in   []byte
	}{
		{"empty", nil},
		{"small", []byte("070701 cpio")},
		{"two blocks", data},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var buf bytes.Buffer
			z := newLZ4Writer(&buf)
			// Odd-sized writes across the block boundary.
			for p := tc.in; len(p) > 0; {
				k := min(len(p), 3<<20+7)
				if _, err := z.Write(p[:k]); err != nil {
					t.Fatal(err)
				}
				p = p[k:]
			}
			if err := z.Close(); err != nil {
				t.Fatal(err)
			}
			if got := binary.LittleEndian.Uint32(buf.Bytes()); got != lz4LegacyMagic {
				t.Fatalf("magic %#x", got)
			}
			out, err := io.ReadAll(lz4.NewReader(bytes.NewReader(buf.Bytes())))
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(out, tc.in) {
				t.Fatalf("round trip: %d bytes back of %d", len(out), len(tc.in))
			}
		})
	}
}

func TestModules(t *testing.T) {
	dir := t.TempDir()
	write := writer(t, dir)
	for _, m := range []string{"a.ko", "b.ko", "c.ko", "d-e.ko.xz"} {
		write("mods/kernel/"+m, "module "+m)
	}
	a, err := Build(Image{
		Agent: write("agent", "agent"), KernelRelease: "6.1.0-test", ModulesDir: filepath.Join(dir, "mods"),
		ModulesDep: write("modules.dep", testDep), Modules: []string{"b", "d_e"},
	})
	if err != nil {
		t.Fatal(err)
	}
	var buf bytes.Buffer
	if _, err := a.WriteTo(&buf); err != nil {
		t.Fatal(err)
	}
	release, names, err := Modules(&buf)
	if err != nil || release != "6.1.0-test" || !slices.Equal(names, []string{"b", "c", "d_e"}) {
		t.Errorf("Modules: %q %v %v; want 6.1.0-test [b c d_e]", release, names, err)
	}
	if _, _, err := Modules(bytes.NewReader([]byte("not lz4"))); err == nil {
		t.Error("Modules of garbage: no error")
	}
}
