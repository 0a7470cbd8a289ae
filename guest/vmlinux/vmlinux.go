// Package vmlinux turns the guest kernel's bzImage into the uncompressed vmlinux ELF
// that pod VMs boot, and checks that an ELF can be booted that way.
//
// QEMU's -kernel boots either. A bzImage decompresses and relocates itself in the guest
// at every boot (0.3-0.4 s under TCG for Debian's LZ4 one), and QEMU keeps an anonymous
// copy of the whole file per VM to hand it over fw_cfg. A vmlinux with the PVH ELF note
// (CONFIG_PVH) is loaded by QEMU from its file and entered in 32-bit protected mode
// through pvh.bin: nothing to decompress, and its pages are the host's page cache,
// shared by every VM (see docs/guest.md).
package vmlinux

import (
	"bytes"
	"debug/elf"
	"encoding/binary"
	"errors"
	"fmt"
	"io"

	"github.com/pierrec/lz4/v4"
)

// The x86 boot protocol's setup header (Documentation/arch/x86/boot.rst), by offset in
// the bzImage.
const (
	offSetupSects    = 0x1f1 // 1 byte: 512-byte sectors of real-mode setup after the boot sector; 0 means 4
	offHeaderMagic   = 0x202 // "HdrS"
	offVersion       = 0x206 // 2 bytes: boot protocol version
	offPayloadOffset = 0x248 // 4 bytes: from the start of the protected-mode code (2.08+)
	offPayloadLength = 0x24c
	headerEnd        = 0x250
	payloadVersion   = 0x0208
)

// lz4LegacyMagic starts a payload compressed with `lz4 -l`, the kernel's CONFIG_KERNEL_LZ4.
var lz4LegacyMagic = []byte{0x02, 0x21, 0x4c, 0x18}

// compressions name the other payload formats a kernel can have, by their first bytes,
// for the error that says which one was found.
var compressions = []struct {
	magic []byte
	name  string
}{
	{[]byte{0x1f, 0x8b}, "gzip"},
	{[]byte{0x42, 0x5a, 0x68}, "bzip2"},
	{[]byte{0x5d, 0x00, 0x00}, "lzma"},
	{[]byte{0xfd, 0x37, 0x7a, 0x58, 0x5a, 0x00}, "xz"},
	{[]byte{0x89, 0x4c, 0x5a, 0x4f}, "lzo"},
	{[]byte{0x28, 0xb5, 0x2f, 0xfd}, "zstd"},
}

// SniffSize is how many of a kernel file's first bytes IsBzImage needs.
const SniffSize = offHeaderMagic + 4

// IsBzImage reports whether b, a kernel file's first bytes, is a bzImage: its x86 boot
// protocol header's magic ("HdrS") is in place.
func IsBzImage(b []byte) bool {
	return len(b) >= SniffSize && string(b[offHeaderMagic:SniffSize]) == "HdrS"
}

// Extract returns the vmlinux ELF a bzImage carries. The payload must be LZ4 (legacy
// frames followed by the uncompressed size, as the kernel's build writes it), and what it
// holds an ELF.
func Extract(bzImage []byte) ([]byte, error) {
	if len(bzImage) < headerEnd || !IsBzImage(bzImage) {
		return nil, errors.New("not a bzImage: no x86 boot protocol header (HdrS)")
	}
	if v := binary.LittleEndian.Uint16(bzImage[offVersion:]); v < payloadVersion {
		return nil, fmt.Errorf("bzImage of boot protocol %#x: its payload's place is known from 2.08", v)
	}
	setup := int(bzImage[offSetupSects])
	if setup == 0 {
		setup = 4
	}
	start := (setup+1)*512 + int(binary.LittleEndian.Uint32(bzImage[offPayloadOffset:]))
	length := int(binary.LittleEndian.Uint32(bzImage[offPayloadLength:]))
	if start < 0 || length < len(lz4LegacyMagic)+4 || start+length > len(bzImage) {
		return nil, fmt.Errorf("bzImage payload at %d, %d bytes, is outside the file's %d", start, length, len(bzImage))
	}
	payload := bzImage[start : start+length]
	if !bytes.HasPrefix(payload, lz4LegacyMagic) {
		for _, c := range compressions {
			if bytes.HasPrefix(payload, c.magic) {
				return nil, fmt.Errorf("bzImage payload is %s-compressed: only LZ4 is supported", c.name)
			}
		}
		return nil, fmt.Errorf("bzImage payload starts with % x: not LZ4 (% x)", payload[:4], lz4LegacyMagic)
	}
	// The build appends the uncompressed size to the frames; the reader sees only the frames.
	size := binary.LittleEndian.Uint32(payload[len(payload)-4:])
	var out bytes.Buffer
	out.Grow(int(size))
	if _, err := io.Copy(&out, lz4.NewReader(bytes.NewReader(payload[:len(payload)-4]))); err != nil {
		return nil, fmt.Errorf("decompress bzImage payload: %w", err)
	}
	if out.Len() != int(size) {
		return nil, fmt.Errorf("bzImage payload decompressed to %d bytes, its trailer says %d", out.Len(), size)
	}
	if !bytes.HasPrefix(out.Bytes(), []byte(elf.ELFMAG)) {
		return nil, errors.New("bzImage payload is not an ELF")
	}
	return out.Bytes(), nil
}

// xenElfnotePhys32Entry is the note (name "Xen") whose value is the kernel's 32-bit PVH
// entry point; QEMU boots an ELF -kernel only if it has one (include/xen/interface/elfnote.h).
const xenElfnotePhys32Entry = 18

// PVHEntry returns the PVH entry point of the ELF kernel r, and an error if it has none:
// QEMU refuses to boot such an ELF ("Error loading uncompressed kernel without PVH ELF Note").
func PVHEntry(r io.ReaderAt) (uint64, error) {
	f, err := elf.NewFile(r)
	if err != nil {
		return 0, err
	}
	defer f.Close()
	if f.Class != elf.ELFCLASS64 || f.Machine != elf.EM_X86_64 {
		return 0, fmt.Errorf("ELF for %v %v, not a 64-bit x86 kernel", f.Class, f.Machine)
	}
	for _, p := range f.Progs {
		if p.Type != elf.PT_NOTE {
			continue
		}
		notes, err := io.ReadAll(p.Open())
		if err != nil {
			return 0, fmt.Errorf("read ELF notes: %w", err)
		}
		if entry, ok := findNote(notes, f.ByteOrder, "Xen", xenElfnotePhys32Entry); ok {
			switch len(entry) {
			case 4:
				return uint64(f.ByteOrder.Uint32(entry)), nil
			case 8:
				return f.ByteOrder.Uint64(entry), nil
			}
			return 0, fmt.Errorf("PVH entry note of %d bytes", len(entry))
		}
	}
	return 0, errors.New("ELF kernel has no PVH entry note (Xen, XEN_ELFNOTE_PHYS32_ENTRY): built without CONFIG_PVH, QEMU cannot boot it")
}

// findNote returns the descriptor of the note name/typ in a PT_NOTE segment's bytes.
func findNote(b []byte, bo binary.ByteOrder, name string, typ uint32) ([]byte, bool) {
	align4 := func(n uint32) int { return int((n + 3) &^ 3) }
	for len(b) >= 12 {
		namesz, descsz, t := bo.Uint32(b), bo.Uint32(b[4:]), bo.Uint32(b[8:])
		b = b[12:]
		if align4(namesz) > len(b) {
			return nil, false
		}
		n := string(bytes.TrimRight(b[:namesz], "\x00"))
		b = b[align4(namesz):]
		if align4(descsz) > len(b) {
			return nil, false
		}
		desc := b[:descsz]
		b = b[align4(descsz):]
		if n == name && t == typ {
			return desc, true
		}
	}
	return nil, false
}
