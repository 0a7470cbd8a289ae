// Command treecheck runs inside a Caisson container whose image is the
// snapshotter's test layers (snapshotter/snapshottest) and checks that the
// rootfs the guest assembled from them is exactly snapshottest.Merged().
//
// It looks at a non-recursive bind of "/", which shows the rootfs without
// the runtime's mounts (/proc, /dev, /sys, ...). Besides the layers' content
// it allows only itself and the empty mount-point directories the runtime
// created. It needs CAP_SYS_ADMIN (a privileged container) for the bind.
package main

import (
	"fmt"
	"io/fs"
	"os"
	"path/filepath"

	"golang.org/x/sys/unix"

	"github.com/caisson-containers/caisson/snapshotter/snapshottest"
)

const view = "/dev/rootfs-view" // /dev is a tmpfs of its own, outside the view

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "treecheck:", err)
		os.Exit(1)
	}
	fmt.Println("treecheck: the rootfs is exactly the merged layers")
}

func run() error {
	if err := os.MkdirAll(view, 0o755); err != nil {
		return err
	}
	if err := unix.Mount("/", view, "", unix.MS_BIND, ""); err != nil {
		return fmt.Errorf("bind / to %s: %w", view, err)
	}
	defer unix.Unmount(view, unix.MNT_DETACH)

	want := snapshottest.Merged()
	listed := map[string]bool{}
	for _, e := range want {
		listed[e.Path] = true
	}
	self, err := os.ReadFile("/proc/self/exe")
	if err != nil {
		return err
	}
	want = append(want, snapshottest.Entry{Path: "treecheck", Mode: 0o755, Data: self})
	for _, d := range []string{"proc", "sys", "run"} {
		st, err := os.Lstat(filepath.Join(view, d))
		if err == nil && st.IsDir() && !listed[d] {
			want = append(want, snapshottest.Entry{Path: d, Mode: fs.ModeDir | st.Mode().Perm()})
		}
	}
	return snapshottest.Check(view, want)
}
