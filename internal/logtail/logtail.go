// Package logtail reads the end of a log file, for errors that quote it (QEMU's
// stderr, the guest console).
package logtail

import (
	"bytes"
	"io"
	"os"
)

// Read returns at most the last n bytes of the file at path, from the first whole line
// when the file is longer, with surrounding space trimmed; "" when it cannot be read.
func Read(path string, n int64) string {
	f, err := os.Open(path)
	if err != nil {
		return ""
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return ""
	}
	// One byte more than n, when there is one, says whether the cut is at a line start.
	off := max(st.Size()-n-1, 0)
	b, err := io.ReadAll(io.NewSectionReader(f, off, st.Size()-off))
	if err != nil {
		return ""
	}
	if off > 0 {
		if i := bytes.IndexByte(b, '\n'); i >= 0 {
			b = b[i+1:]
		} else {
			b = b[1:]
		}
	}
	return string(bytes.TrimSpace(b))
}
