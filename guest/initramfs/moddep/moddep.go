// Package moddep is the dependency graph of a kernel's modules, in the modules.dep format
// depmod writes. The image builder takes from the kernel's graph the closure of the modules
// the guest loads and writes that part, in the same format, into the initramfs; the agent
// reads it back to know what to load, and in which order.
package moddep

import (
	"bufio"
	"fmt"
	"io"
	"path"
	"slices"
	"strings"

	"github.com/containerd/errdefs"
)

// FileName is the graph's file in a /lib/modules/RELEASE directory.
const FileName = "modules.dep"

// Graph is the dependency graph of a kernel's modules: each module's path (relative to
// /lib/modules/RELEASE) to the paths of the modules it needs.
type Graph struct {
	deps   map[string][]string // path -> dependency paths
	byName map[string]string   // module name -> path
}

// Parse reads a modules.dep file.
func Parse(r io.Reader) (*Graph, error) {
	g := &Graph{deps: map[string][]string{}, byName: map[string]string{}}
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
		g.deps[mod] = strings.Fields(deps)
		g.byName[Name(mod)] = mod
	}
	if err := s.Err(); err != nil {
		return nil, err
	}
	return g, nil
}

// Name is the kernel's name for the module file p: its base name without the .ko (and
// compression) suffix, dashes as underscores.
func Name(p string) string {
	base := path.Base(p)
	if i := strings.Index(base, ".ko"); i >= 0 {
		base = base[:i]
	}
	return strings.ReplaceAll(base, "-", "_")
}

// Has reports whether the graph has the module called name.
func (g *Graph) Has(name string) bool {
	_, ok := g.byName[strings.ReplaceAll(name, "-", "_")]
	return ok
}

// Closure returns the paths of the named modules and of everything they depend on, in an
// order in which they can be loaded: every module after all of its dependencies. The order
// depends only on the graph and on names, so the same inputs give the same list.
func (g *Graph) Closure(names []string) ([]string, error) {
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
		deps, ok := g.deps[p]
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
		p, ok := g.byName[strings.ReplaceAll(n, "-", "_")]
		if !ok {
			return nil, fmt.Errorf("module %q: %w (built in, or not in this kernel?)", n, errdefs.ErrNotFound)
		}
		if err := visit(p, "the module list"); err != nil {
			return nil, err
		}
	}
	return out, nil
}

// Roots returns the names of the modules no other module of the graph needs, sorted: the
// ones a list of modules to load names (the rest come as their dependencies).
func (g *Graph) Roots() []string {
	needed := map[string]bool{}
	for _, deps := range g.deps {
		for _, d := range deps {
			needed[d] = true
		}
	}
	var out []string
	for p := range g.deps {
		if !needed[p] {
			out = append(out, Name(p))
		}
	}
	slices.Sort(out)
	return out
}

// WriteSubset writes, in modules.dep format, the lines of the modules at paths (each with
// all of its dependencies, as Closure returns them), in that order.
func (g *Graph) WriteSubset(w io.Writer, paths []string) error {
	var b strings.Builder
	for _, p := range paths {
		deps, ok := g.deps[p]
		if !ok {
			return fmt.Errorf("module %s is not in modules.dep: %w", p, errdefs.ErrNotFound)
		}
		b.WriteString(p + ":")
		for _, d := range deps {
			b.WriteString(" " + d)
		}
		b.WriteString("\n")
	}
	_, err := io.WriteString(w, b.String())
	return err
}

// Len is the number of modules in the graph.
func (g *Graph) Len() int { return len(g.deps) }
