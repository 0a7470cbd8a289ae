package snapshotter

import (
	"archive/tar"
	"testing"

	"github.com/caisson-containers/caisson/snapshotter/snapshottest"
)

// Short names for the layer fixtures of package snapshottest.
type layerEntry = snapshottest.TarEntry

var (
	epoch     = snapshottest.Epoch
	dirE      = snapshottest.Dir
	fileE     = snapshottest.File
	linkE     = snapshottest.Hardlink
	symlinkE  = snapshottest.Symlink
	whiteoutE = snapshottest.OCIWhiteout
	expectAll = snapshottest.Expect
)

// buildTar writes entries as an uncompressed PAX tar.
func buildTar(t testing.TB, entries []layerEntry) []byte {
	t.Helper()
	b, err := snapshottest.Tar(entries)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func fileHeader(name string, size int) tar.Header {
	return tar.Header{Typeflag: tar.TypeReg, Name: name, Mode: 0o644, Size: int64(size)}
}
