package initramfs

import (
	"fmt"
	"io"
	"path"
	"slices"
	"strings"

	"github.com/cavaliergopher/cpio"
	"github.com/pierrec/lz4/v4"

	"github.com/caisson-containers/caisson/guest/initramfs/moddep"
)

// Modules lists the kernel modules an initramfs written by Archive.WriteTo carries: the
// kernel release of its lib/modules directory and the modules' names, sorted. These are
// the modules the guest loads at boot, without the modules image.
func Modules(r io.Reader) (release string, names []string, err error) {
	cr := cpio.NewReader(lz4.NewReader(r))
	for {
		hdr, err := cr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			return "", nil, fmt.Errorf("read initramfs: %w", err)
		}
		rest, ok := strings.CutPrefix(hdr.Name, "lib/modules/")
		if !ok || !strings.Contains(path.Base(rest), ".ko") {
			continue
		}
		rel, _, _ := strings.Cut(rest, "/")
		if release != "" && rel != release {
			return "", nil, fmt.Errorf("initramfs has modules of kernels %s and %s", release, rel)
		}
		release = rel
		names = append(names, moddep.Name(rest))
	}
	slices.Sort(names)
	return release, names, nil
}
