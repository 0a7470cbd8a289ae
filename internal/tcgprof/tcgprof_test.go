package tcgprof

import (
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
)

func writeDump(t *testing.T, content string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "dump")
	if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

func TestDumps(t *testing.T) {
	// A block translated twice has two lines; the counts are cumulative.
	a, err := ReadDump(writeDump(t, "ffffffff81000010 4 10\n401000 3 2\n"))
	if err != nil {
		t.Fatal(err)
	}
	z, err := ReadDump(writeDump(t, "ffffffff81000010 4 10\n401000 3 5\n401000 3 1\nffffffff81000100 2 7\n"))
	if err != nil {
		t.Fatal(err)
	}
	d := z.Since(a)
	want := Counts{0x401000: 12, 0xffffffff81000100: 14}
	if !reflect.DeepEqual(d, want) {
		t.Fatalf("Since: %v, want %v", d, want)
	}
	if all, kernel := d.Totals(); all != 26 || kernel != 14 {
		t.Errorf("Totals: %d, %d; want 26, 14", all, kernel)
	}

	kallsyms, err := ReadKallsyms(strings.NewReader("0000000000000000 A fixed_percpu_data\n" +
		"ffffffff81000000 T _stext\nffffffff810000f0 t do_thing\nffffffff81000200 d some_data\n" +
		"ffffffffc0000000 t vring_interrupt\t[virtio_ring]\n"))
	if err != nil {
		t.Fatal(err)
	}
	if name, _ := kallsyms.Lookup(0xffffffff81000100); name != "do_thing" {
		t.Errorf("Lookup: %q, want do_thing", name)
	}
	if name, _ := kallsyms.Lookup(0xffffffffc0000010); name != "vring_interrupt [virtio_ring]" {
		t.Errorf("Lookup of a module's: %q", name)
	}
	if _, ok := kallsyms.Lookup(0x1000); ok {
		t.Error("an address below every symbol has a name")
	}
	got := d.ByFunction(kallsyms, nil)
	wantFns := []Function{{"k do_thing", 14}, {"u ?", 12}}
	if !reflect.DeepEqual(got, wantFns) {
		t.Errorf("ByFunction: %v, want %v", got, wantFns)
	}
}

func TestBadDumps(t *testing.T) {
	for _, content := range []string{"401000 3\n", "xyz 1 1\n", "401000 3 -1\n", "401000 3 1 extra\n"} {
		if _, err := ReadDump(writeDump(t, content)); err == nil {
			t.Errorf("%q: no error", content)
		}
	}
	if _, err := ReadDump(filepath.Join(t.TempDir(), "none")); err == nil {
		t.Error("a missing dump: no error")
	}
}

// The test binary itself has function symbols to read.
func TestReadELF(t *testing.T) {
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	s, err := ReadELF(exe)
	if err != nil {
		t.Skipf("test binary without symbols: %v", err)
	}
	if len(s.addrs) == 0 {
		t.Fatal("no function symbols")
	}
	if name, ok := s.Lookup(s.addrs[len(s.addrs)/2]); !ok || name == "" {
		t.Errorf("Lookup of a symbol's own address: %q, %v", name, ok)
	}
}
