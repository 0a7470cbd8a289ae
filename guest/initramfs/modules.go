package initramfs

import (
	"bufio"
	"fmt"
	"io"
	"path"
	"strings"

	"github.com/containerd/errdefs"
)

// LoadListName is the file, inside the initramfs's /lib/modules/RELEASE, that lists the
// modules to load, one path (relative to that directory) per line, dependencies first.
const LoadListName = "modules.load"

// ModulesDep is the dependency graph of a kernel's modules, as depmod writes it to
// modules.dep: each module's path (relative to /lib/modules/RELEASE) to the paths of the
// modules it needs.
type ModulesDep struct {
	deps   map[string][]string // path -> dependency paths
	byName map[string]string   // module name -> path
}

// ParseModulesDep reads a modules.dep file.
func ParseModulesDep(r io.Reader) (*ModulesDep, error) {
	m := &ModulesDep{deps: map[string][]string{}, byName: map[string]string{}}
	s := bufio.NewScanner(r)
	s.Buffer(make([]byte, 64*1024), 1024*1024)
	for line := 1; s.Scan(); line++ {
		text := strings.TrimSpace(s.Text())
		if text == "" || strings.HasPrefix(text, "#") {
			continue
		}
		mod, deps, ok := strings.Cut(text, ":")
		if !ok {
			return nil, fmt.Errorf("modules.dep line %d: no ':': %w", line, errdefs.ErrInvalidArgument)
		}
		m.deps[mod] = strings.Fields(deps)
		m.byName[ModuleName(mod)] = mod
	}
	if err := s.Err(); err != nil {
		return nil, err
	}
	return m, nil
}

// ModuleName is the kernel's name for the module file p: its base name without the .ko
// (and compression) suffix, dashes as underscores.
func ModuleName(p string) string {
	base := path.Base(p)
	if i := strings.Index(base, ".ko"); i >= 0 {
		base = base[:i]
	}
	return strings.ReplaceAll(base, "-", "_")
}

// Closure returns the paths of the named modules and of everything they depend on, in an
// order in which they can be loaded: every module after all of its dependencies. The order
// depends only on the graph and on names, so the same inputs give the same list.
func (m *ModulesDep) Closure(names []string) ([]string, error) {
	var (
		out   []string
		state = map[string]int{} // 1: visiting, 2: done
		visit func(p string, from string) error
	)
	visit = func(p, from string) error {
		switch state[p] {
		case 2:
			return nil
		case 1:
			return fmt.Errorf("module dependency cycle through %s: %w", p, errdefs.ErrFailedPrecondition)
		}
		deps, ok := m.deps[p]
		if !ok {
			return fmt.Errorf("module %s (needed by %s) is not in modules.dep: %w", p, from, errdefs.ErrNotFound)
		}
		state[p] = 1
		// modules.dep lists a module's dependencies in load order reversed
		// (modprobe loads them from the end); visiting them last-first keeps that order.
		for i := len(deps) - 1; i >= 0; i-- {
			if err := visit(deps[i], p); err != nil {
				return err
			}
		}
		state[p] = 2
		out = append(out, p)
		return nil
	}
	for _, n := range names {
		p, ok := m.byName[strings.ReplaceAll(n, "-", "_")]
		if !ok {
			return nil, fmt.Errorf("module %q: %w (built in, or not in this kernel?)", n, errdefs.ErrNotFound)
		}
		if err := visit(p, "the module list"); err != nil {
			return nil, err
		}
	}
	return out, nil
}
