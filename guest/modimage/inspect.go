package modimage

import (
	"fmt"
	"io"
	"io/fs"
	"path"

	"github.com/containerd/errdefs"
	erofs "github.com/erofs/go-erofs"

	"github.com/caisson-containers/caisson/guest/initramfs/moddep"
)

// Inspect reads an image's top directories and their modules.dep.
func Inspect(r io.ReaderAt) (Info, error) {
	img, err := erofs.Open(r)
	if err != nil {
		return Info{}, fmt.Errorf("not an EROFS image: %v: %w", err, errdefs.ErrInvalidArgument)
	}
	entries, err := fs.ReadDir(img, ".")
	if err != nil {
		return Info{}, err
	}
	info := Info{Modules: map[string]int{}}
	for _, e := range entries {
		if !e.IsDir() {
			continue
		}
		f, err := img.Open(path.Join(e.Name(), moddep.FileName))
		if err != nil {
			continue
		}
		g, err := moddep.Parse(f)
		f.Close()
		if err != nil {
			return Info{}, fmt.Errorf("%s/%s: %w", e.Name(), moddep.FileName, err)
		}
		info.Releases = append(info.Releases, e.Name())
		info.Modules[e.Name()] = g.Len()
	}
	if len(info.Releases) == 0 {
		return Info{}, fmt.Errorf("no RELEASE/%s in the image: %w", moddep.FileName, errdefs.ErrNotFound)
	}
	return info, nil
}
