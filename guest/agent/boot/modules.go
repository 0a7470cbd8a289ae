package boot

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"time"

	"github.com/containerd/log"
	"golang.org/x/sys/unix"

	"github.com/caisson-containers/caisson/guest/initramfs/moddep"
)

// ModulesDir is where the initramfs keeps the modules of the running kernel.
func ModulesDir() (string, error) {
	var u unix.Utsname
	if err := unix.Uname(&u); err != nil {
		return "", err
	}
	return filepath.Join("/lib/modules", unix.ByteSliceToString(u.Release[:])), nil
}

// Modules is the loading of the guest's kernel modules.
type Modules struct {
	done chan struct{}
	n    int
	err  error
}

// backgroundNice is the CPU priority of the background loading: the lowest, so that the
// agent's start and its first answers go first on the guest's (usually one) vCPU.
const backgroundNice = 19

// LoadModules loads the modules the initramfs carries, as its dir/modules.dep lists them
// (only those, dependencies first, as the image builder writes it). It returns once now
// and their dependencies are loaded (what the agent needs to talk to the shim), and loads
// in the background, at the lowest CPU priority, every other module that no module needs
// (the image's list), with its dependencies, except those in skip (another transport's
// channel). A module of now or skip the image does not have is built into the kernel. A
// module that is loaded already is not an error.
func LoadModules(ctx context.Context, dir string, now, skip []string) (*Modules, error) {
	m := &Modules{done: make(chan struct{})}
	dep, err := readGraph(dir)
	if err != nil {
		return nil, err
	}
	first, rest, err := plan(dep, now, skip)
	if err != nil {
		return nil, err
	}
	if err := m.load(ctx, dir, first); err != nil {
		return nil, err
	}
	log.G(ctx).WithFields(log.Fields{"count": m.n, "uptime": Uptime()}).Debug("kernel modules for the agent's channel loaded")
	go func() {
		defer close(m.done)
		// The thread is never unlocked: it ends with the goroutine, and its priority with it.
		runtime.LockOSThread()
		if err := unix.Setpriority(unix.PRIO_PROCESS, unix.Gettid(), backgroundNice); err != nil {
			log.G(ctx).WithError(err).Warn("kernel modules load at normal priority")
		}
		m.err = m.load(ctx, dir, rest)
		if m.err != nil {
			log.G(ctx).WithError(m.err).Error("kernel modules")
			return
		}
		log.G(ctx).WithFields(log.Fields{"count": m.n, "uptime": Uptime()}).Debug("kernel modules loaded")
	}()
	return m, nil
}

// Wait returns once every module is loaded, with the error that stopped the loading.
func (m *Modules) Wait(ctx context.Context) error {
	select {
	case <-m.done:
		return m.err
	case <-ctx.Done():
		return ctx.Err()
	}
}

func (m *Modules) load(ctx context.Context, dir string, paths []string) error {
	debug := log.GetLevel() >= log.DebugLevel
	for _, p := range paths {
		start := time.Now()
		if err := loadModule(filepath.Join(dir, p)); err != nil {
			return err
		}
		m.n++
		if debug {
			log.G(ctx).WithFields(log.Fields{"module": moddep.Name(p), "took": time.Since(start)}).Debug("kernel module loaded")
		}
	}
	return nil
}

// plan returns the modules to load before the agent serves (now, with their dependencies)
// and after (every root of the graph but now and skip, with their dependencies), both in
// load order.
func plan(dep *moddep.Graph, now, skip []string) (first, rest []string, err error) {
	first, err = dep.Closure(slices.DeleteFunc(slices.Clone(now), func(n string) bool { return !dep.Has(n) }))
	if err != nil {
		return nil, nil, err
	}
	roots := slices.DeleteFunc(dep.Roots(), func(n string) bool { return slices.Contains(now, n) || slices.Contains(skip, n) })
	rest, err = dep.Closure(roots)
	if err != nil {
		return nil, nil, err
	}
	rest = slices.DeleteFunc(rest, func(p string) bool { return slices.Contains(first, p) })
	return first, rest, nil
}

// readGraph reads the image's modules.dep; without one (a kernel with everything built
// in) the graph is empty.
func readGraph(dir string) (*moddep.Graph, error) {
	f, err := os.Open(filepath.Join(dir, moddep.FileName))
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return moddep.Parse(strings.NewReader(""))
		}
		return nil, err
	}
	defer f.Close()
	return moddep.Parse(f)
}

func loadModule(path string) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	if err := unix.FinitModule(int(f.Fd()), "", 0); err != nil && !errors.Is(err, unix.EEXIST) {
		return fmt.Errorf("load module %s: %w", filepath.Base(path), err)
	}
	return nil
}
