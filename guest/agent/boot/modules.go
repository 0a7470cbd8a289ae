package boot

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"github.com/containerd/log"
	"golang.org/x/sys/unix"
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

// LoadModules loads the modules listed in dir/modules.load (paths relative to dir,
// dependencies first, as the initramfs builder writes them). It returns once the list
// up to the last of the modules named in first is loaded (what the agent needs to talk
// to the shim; the builder lists them first) and loads the rest in the background. A
// module that is loaded already is not an error.
func LoadModules(ctx context.Context, dir string, first []string) (*Modules, error) {
	m := &Modules{done: make(chan struct{})}
	list, err := readLoadList(dir)
	if err != nil {
		return nil, err
	}
	split := 0
	for i, p := range list {
		if slices.Contains(first, moduleName(p)) {
			split = i + 1
		}
	}
	if err := m.load(dir, list[:split]); err != nil {
		return nil, err
	}
	log.G(ctx).WithField("count", m.n).Debug("kernel modules for the agent's channel loaded")
	go func() {
		defer close(m.done)
		m.err = m.load(dir, list[split:])
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

func (m *Modules) load(dir string, paths []string) error {
	for _, p := range paths {
		if err := loadModule(filepath.Join(dir, p)); err != nil {
			return err
		}
		m.n++
	}
	return nil
}

func readLoadList(dir string) ([]string, error) {
	f, err := os.Open(filepath.Join(dir, "modules.load"))
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil, nil // a kernel with everything built in
		}
		return nil, err
	}
	defer f.Close()
	var list []string
	s := bufio.NewScanner(f)
	for s.Scan() {
		if p := strings.TrimSpace(s.Text()); p != "" {
			list = append(list, p)
		}
	}
	return list, s.Err()
}

// moduleName is the kernel's name of the module file p.
func moduleName(p string) string {
	base := filepath.Base(p)
	if i := strings.Index(base, ".ko"); i >= 0 {
		base = base[:i]
	}
	return strings.ReplaceAll(base, "-", "_")
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
