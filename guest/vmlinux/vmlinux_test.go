package vmlinux

import (
	"bytes"
	"debug/elf"
	"encoding/binary"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/pierrec/lz4/v4"

	"github.com/caisson-containers/caisson/internal/testutil"
)

// testELF is a minimal 64-bit x86 ELF with one PT_NOTE segment holding notes.
func testELF(notes []byte) []byte {
	const ehsize, phsize = 64, 56
	var b bytes.Buffer
	le := binary.LittleEndian
	b.Write([]byte{0x7f, 'E', 'L', 'F', byte(elf.ELFCLASS64), byte(elf.ELFDATA2LSB), byte(elf.EV_CURRENT)})
	b.Write(make([]byte, 9))
	binary.Write(&b, le, uint16(elf.ET_EXEC))
	binary.Write(&b, le, uint16(elf.EM_X86_64))
	binary.Write(&b, le, uint32(elf.EV_CURRENT))
	binary.Write(&b, le, uint64(0x1000000))           // entry
	binary.Write(&b, le, uint64(ehsize))              // phoff
	binary.Write(&b, le, uint64(0))                   // shoff
	binary.Write(&b, le, uint32(0))                   // flags
	binary.Write(&b, le, []uint16{ehsize, phsize, 1}) // ehsize, phentsize, phnum
	binary.Write(&b, le, []uint16{64, 0, 0})          // shentsize, shnum, shstrndx
	binary.Write(&b, le, []uint32{uint32(elf.PT_NOTE), uint32(elf.PF_R)})
	binary.Write(&b, le, []uint64{ehsize + phsize, 0, 0, uint64(len(notes)), uint64(len(notes)), 4})
	b.Write(notes)
	return b.Bytes()
}

func note(name string, typ uint32, desc []byte) []byte {
	var b bytes.Buffer
	binary.Write(&b, binary.LittleEndian, []uint32{uint32(len(name) + 1), uint32(len(desc)), typ})
	b.WriteString(name + "\x00")
	b.Write(make([]byte, (4-(len(name)+1)%4)%4))
	b.Write(desc)
	b.Write(make([]byte, (4-len(desc)%4)%4))
	return b.Bytes()
}

// pvhELF has the Linux note, then the PVH entry 0x1000850, as Debian's kernel does.
var pvhELF = testELF(append(note("Linux", 6, []byte("6.1.0\x00")), note("Xen", xenElfnotePhys32Entry, []byte{0x50, 0x08, 0x00, 0x01, 0, 0, 0, 0})...))

// kernelLZ4 compresses b as the kernel's build does: legacy frames, then the size.
func kernelLZ4(t *testing.T, b []byte) []byte {
	t.Helper()
	var out bytes.Buffer
	w := lz4.NewWriter(&out)
	if err := w.Apply(lz4.LegacyOption(true)); err != nil {
		t.Fatal(err)
	}
	if _, err := w.Write(b); err != nil {
		t.Fatal(err)
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	return binary.LittleEndian.AppendUint32(out.Bytes(), uint32(len(b)))
}

// bzImage wraps payload in a boot sector and setupSects sectors of setup, with
// the payload 0x100 bytes into the protected-mode code.
func bzImage(payload []byte, setupSects byte, version uint16) []byte {
	const payloadOffset = 0x100
	sects := int(setupSects)
	if sects == 0 {
		sects = 4
	}
	b := make([]byte, (sects+1)*512+payloadOffset, (sects+1)*512+payloadOffset+len(payload))
	b[offSetupSects] = setupSects
	copy(b[offHeaderMagic:], "HdrS")
	binary.LittleEndian.PutUint16(b[offVersion:], version)
	binary.LittleEndian.PutUint32(b[offPayloadOffset:], payloadOffset)
	binary.LittleEndian.PutUint32(b[offPayloadLength:], uint32(len(payload)))
	return append(b, payload...)
}

func TestExtract(t *testing.T) {
	good := kernelLZ4(t, pvhELF)
	wrongSize := append(bytes.Clone(good[:len(good)-4]), binary.LittleEndian.AppendUint32(nil, uint32(len(pvhELF)+1))...)
	notELF := kernelLZ4(t, bytes.Repeat([]byte("not an elf "), 1000))
	gzip := append([]byte{0x1f, 0x8b, 8, 0}, make([]byte, 60)...)
	truncated := bzImage(good, 7, 0x20f)
	truncated = truncated[:len(truncated)-10]
	corrupt := bytes.Clone(good)
	for i := 8; i < len(corrupt)-4; i++ {
		corrupt[i] ^= 0xff
	}
	for _, tc := range []struct {
		name    string
		image   []byte
		wantErr string
	}{
		{name: "lz4", image: bzImage(good, 39, 0x20f)},
		{name: "setup_sects 0 means 4", image: bzImage(good, 0, 0x20f)},
		{name: "not a bzImage", image: pvhELF, wantErr: "not a bzImage"},
		{name: "old boot protocol", image: bzImage(good, 7, 0x207), wantErr: "boot protocol 0x207"},
		{name: "gzip payload", image: bzImage(gzip, 7, 0x20f), wantErr: "gzip-compressed"},
		{name: "unknown payload", image: bzImage(make([]byte, 64), 7, 0x20f), wantErr: "not LZ4"},
		{name: "payload past the end", image: truncated, wantErr: "outside the file"},
		{name: "size trailer mismatch", image: bzImage(wrongSize, 7, 0x20f), wantErr: "its trailer says"},
		{name: "corrupt frames", image: bzImage(corrupt, 7, 0x20f), wantErr: "decompress"},
		{name: "payload not an ELF", image: bzImage(notELF, 7, 0x20f), wantErr: "not an ELF"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := Extract(tc.image)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("Extract = %v, want an error with %q", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, pvhELF) {
				t.Fatalf("Extract returned %d bytes, not the %d of the ELF compressed", len(got), len(pvhELF))
			}
		})
	}
}

func TestPVHEntry(t *testing.T) {
	for _, tc := range []struct {
		name    string
		elf     []byte
		want    uint64
		wantErr string
	}{
		{name: "8-byte entry after another note", elf: pvhELF, want: 0x1000850},
		{name: "4-byte entry", elf: testELF(note("Xen", xenElfnotePhys32Entry, []byte{0x50, 0x08, 0x00, 0x01})), want: 0x1000850},
		{name: "no PVH note", elf: testELF(note("Linux", 6, []byte("6.1.0\x00"))), wantErr: "no PVH entry note"},
		{name: "Xen note of another type", elf: testELF(note("Xen", 1, []byte{1, 2, 3, 4})), wantErr: "no PVH entry note"},
		{name: "odd entry size", elf: testELF(note("Xen", xenElfnotePhys32Entry, []byte{1, 2})), wantErr: "PVH entry note of 2 bytes"},
		{name: "not an ELF", elf: []byte("MZ not an elf at all, but long enough for a header........................"), wantErr: "bad magic"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := PVHEntry(bytes.NewReader(tc.elf))
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("PVHEntry = %#x, %v, want an error with %q", got, err, tc.wantErr)
				}
				return
			}
			if err != nil || got != tc.want {
				t.Fatalf("PVHEntry = %#x, %v, want %#x", got, err, tc.want)
			}
		})
	}
}

// The guest kernel `make guest` fetched, if it has: its vmlinux has the PVH entry.
func TestGuestKernel(t *testing.T) {
	bz := filepath.Join(testutil.RepoRoot(t), "_output", "guest", "kernel", "vmlinuz")
	b, err := os.ReadFile(bz)
	if err != nil {
		t.Skipf("needs the guest kernel package (run `make guest`): %v", err)
	}
	v, err := Extract(b)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := PVHEntry(bytes.NewReader(v)); err != nil {
		t.Fatal(err)
	}
}
