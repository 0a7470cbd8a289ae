// Command mkmodules writes the guest kernel's modules image (see package guest/modimage).
// `make guest` runs it; the output is the same bytes for the same inputs.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"

	"github.com/caisson-containers/caisson/guest/modimage"
)

func main() {
	var (
		img modimage.Image
		out string
	)
	flag.StringVar(&out, "o", "", "output file (EROFS, padded to a multiple of 2 MiB)")
	flag.StringVar(&img.Dir, "dir", "", "the kernel's lib/modules/RELEASE directory, with depmod's files")
	flag.StringVar(&img.Release, "release", "", "guest kernel release (uname -r)")
	flag.Parse()
	if out == "" || img.Dir == "" || img.Release == "" {
		flag.Usage()
		os.Exit(2)
	}
	if err := modimage.Build(context.Background(), img, out); err != nil {
		fmt.Fprintln(os.Stderr, "mkmodules:", err)
		os.Exit(1)
	}
	f, err := os.Open(out)
	if err != nil {
		fmt.Fprintln(os.Stderr, "mkmodules:", err)
		os.Exit(1)
	}
	defer f.Close()
	info, err := modimage.Inspect(f)
	if err != nil {
		fmt.Fprintln(os.Stderr, "mkmodules: the image written cannot be read back:", err)
		os.Exit(1)
	}
	st, _ := f.Stat()
	fmt.Printf("modules image: %d modules of %s, %d bytes\n", info.Modules[img.Release], img.Release, st.Size())
}
