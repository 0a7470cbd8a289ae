package container

import (
	"fmt"
	"os"
	"path"
	"strings"

	"github.com/containerd/errdefs"
	securejoin "github.com/cyphar/filepath-securejoin"
	specs "github.com/opencontainers/runtime-spec/specs-go"
)

const defaultPath = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

// checkExecutable fails with NotFound when the process's program is certainly not in
// the container: every place it could be is in the rootfs (no mount of the spec covers
// it) and none holds an executable file. libcontainer would otherwise report it only as
// text from inside the half-started container.
func checkExecutable(rootfs string, mounts []specs.Mount, p *specs.Process) error {
	if len(p.Args) == 0 {
		return nil
	}
	name := p.Args[0]
	var candidates []string
	switch {
	case path.IsAbs(name):
		candidates = []string{name}
	case strings.Contains(name, "/"):
		candidates = []string{path.Join(p.Cwd, name)}
	default:
		dirs := defaultPath
		for _, e := range p.Env {
			if v, ok := strings.CutPrefix(e, "PATH="); ok {
				dirs = v
			}
		}
		for _, d := range strings.Split(dirs, ":") {
			if path.IsAbs(d) {
				candidates = append(candidates, path.Join(d, name))
			}
		}
	}
	for _, c := range candidates {
		if underMount(c, mounts) {
			return nil // a mount may provide it; libcontainer will tell
		}
		full, err := securejoin.SecureJoin(rootfs, c)
		if err != nil {
			continue
		}
		if st, err := os.Stat(full); err == nil && !st.IsDir() && st.Mode().Perm()&0o111 != 0 {
			return nil
		}
	}
	return fmt.Errorf("executable %q not found in the container (looked for %s): %w", name, strings.Join(candidates, ", "), errdefs.ErrNotFound)
}

func underMount(p string, mounts []specs.Mount) bool {
	for _, m := range mounts {
		d := path.Clean(m.Destination)
		if p == d || strings.HasPrefix(p, d+"/") {
			return true
		}
	}
	return false
}
