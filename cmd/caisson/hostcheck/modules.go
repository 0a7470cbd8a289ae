package hostcheck

import (
	"fmt"
	"os"
	"strings"

	"github.com/caisson-containers/caisson/guest/initramfs"
	"github.com/caisson-containers/caisson/guest/modimage"
	"github.com/caisson-containers/caisson/shim/config"
)

// guestModules reports the guest kernel's modules: those the initramfs carries (loaded at
// every boot) and the modules image beside the kernel, from which the guest loads every
// other module on demand (docs/guest.md). Without the image pods still run, but a bridge,
// a tun device, a VLAN or netfilter in a pod fails: a warning.
func guestModules(c config.Config) []Result {
	var out []Result
	release, preloaded, err := readInitramfsModules(c.Guest.Initramfs)
	switch {
	case err != nil:
		out = append(out, Result{"guest-preload", Warn, fmt.Sprintf("cannot list the initramfs's modules: %v", err)})
	default:
		out = append(out, Result{"guest-preload", OK, fmt.Sprintf("%d modules loaded at boot from the initramfs: %s", len(preloaded), strings.Join(preloaded, " "))})
	}

	path := modimage.Beside(c.Guest.Kernel)
	f, err := os.Open(path)
	if err != nil {
		return append(out, Result{"guest-modules", Warn, fmt.Sprintf(
			"no modules image (%v): pods have only the initramfs's modules; a bridge, tun device, VLAN or netfilter in a pod fails: run `make guest` and install %s beside the kernel",
			err, modimage.FileName)})
	}
	defer f.Close()
	info, err := modimage.Inspect(f)
	if err != nil {
		return append(out, Result{"guest-modules", Warn, fmt.Sprintf("%s: %v: pods have only the initramfs's modules", path, err)})
	}
	st, err := f.Stat()
	if err != nil {
		return append(out, Result{"guest-modules", Warn, err.Error()})
	}
	if release != "" && info.Modules[release] == 0 {
		return append(out, Result{"guest-modules", Warn, fmt.Sprintf(
			"%s has modules for kernel %s, the initramfs's kernel is %s: pods have only the initramfs's modules; rebuild both with `make guest`",
			path, strings.Join(info.Releases, ", "), release)})
	}
	if release == "" {
		release = info.Releases[0]
	}
	return append(out, Result{"guest-modules", OK, fmt.Sprintf("%s (%.1f MiB): the other %d of kernel %s's %d modules, loaded on demand",
		path, float64(st.Size())/(1<<20), info.Modules[release]-len(preloaded), release, info.Modules[release])})
}

func readInitramfsModules(path string) (string, []string, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", nil, err
	}
	defer f.Close()
	return initramfs.Modules(f)
}
