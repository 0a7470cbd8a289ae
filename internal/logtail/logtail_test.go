package logtail

import (
	"os"
	"path/filepath"
	"testing"
)

func TestRead(t *testing.T) {
	dir := t.TempDir()
	write := func(name, s string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(s), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	for _, tc := range []struct {
		name, content string
		n             int64
		want          string
	}{
		{"short", "  one\ntwo\n", 100, "one\ntwo"},
		{"cut mid-line", "first line\nsecond\nthird\n", 12, "third"},
		{"cut at a line start", "abc\ndef\n", 4, "def"},
		{"one long line", "abcdefghij", 4, "ghij"},
		{"empty", "", 10, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := Read(write(tc.name, tc.content), tc.n); got != tc.want {
				t.Errorf("Read = %q, want %q", got, tc.want)
			}
		})
	}
	if got := Read(filepath.Join(dir, "missing"), 10); got != "" {
		t.Errorf("a missing file reads %q", got)
	}
}
