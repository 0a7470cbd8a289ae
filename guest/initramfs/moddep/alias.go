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

// The other files depmod writes beside modules.dep, which a modprobe reads to turn the
// name the kernel asks for (request_module: "rtnl-link-bridge", "char-major-10-200",
// "fs-overlay", ...) into modules.
const (
	AliasFileName   = "modules.alias"
	SoftdepFileName = "modules.softdep"
	BuiltinFileName = "modules.builtin"
	DevnameFileName = "modules.devname"
)

// Aliases are the "alias PATTERN MODULE" lines of a modules.alias file.
type Aliases struct {
	exact    map[string][]string // literal patterns: most of them, looked up at once
	patterns []alias             // glob patterns, in file order
}

type alias struct{ pattern, module string }

// ParseAliases reads a modules.alias file.
func ParseAliases(r io.Reader) (*Aliases, error) {
	a := &Aliases{exact: map[string][]string{}}
	err := eachLine(r, AliasFileName, func(line int, f []string) error {
		if f[0] != "alias" {
			return nil
		}
		if len(f) != 3 {
			return fmt.Errorf("%s line %d: want \"alias PATTERN MODULE\": %w", AliasFileName, line, errdefs.ErrInvalidArgument)
		}
		if strings.ContainsAny(f[1], "*?[") {
			a.patterns = append(a.patterns, alias{f[1], underscores(f[2])})
		} else {
			a.exact[f[1]] = append(a.exact[f[1]], underscores(f[2]))
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	return a, nil
}

// Lookup returns the modules whose aliases match name, each once, in file order. Patterns
// are shell globs, as kmod matches them with fnmatch(3); here a '*' does not match a
// '/' (path.Match), which no alias the kernel requests has.
func (a *Aliases) Lookup(name string) []string {
	out := slices.Clone(a.exact[name])
	for _, p := range a.patterns {
		if ok, _ := path.Match(p.pattern, name); ok && !slices.Contains(out, p.module) {
			out = append(out, p.module)
		}
	}
	return out
}

// Softdeps are the "softdep MODULE pre: ... post: ..." lines of a modules.softdep file: the
// modules to load before and after a module, whose failure does not fail it.
type Softdeps map[string]Softdep

// Softdep is one module's soft dependencies.
type Softdep struct{ Pre, Post []string }

// ParseSoftdeps reads a modules.softdep file.
func ParseSoftdeps(r io.Reader) (Softdeps, error) {
	s := Softdeps{}
	err := eachLine(r, SoftdepFileName, func(line int, f []string) error {
		if f[0] != "softdep" {
			return nil
		}
		if len(f) < 2 {
			return fmt.Errorf("%s line %d: no module: %w", SoftdepFileName, line, errdefs.ErrInvalidArgument)
		}
		mod := underscores(f[1])
		d := s[mod]
		var into *[]string
		for _, w := range f[2:] {
			switch w {
			case "pre:":
				into = &d.Pre
			case "post:":
				into = &d.Post
			default:
				// A module before pre: or post: ("softdep cifs gcm", which Debian's
				// 6.1 has) is ignored, as kmod does.
				if into != nil {
					*into = append(*into, w)
				}
			}
		}
		s[mod] = d
		return nil
	})
	if err != nil {
		return nil, err
	}
	return s, nil
}

// ParseBuiltin reads a modules.builtin file (one module path a line) and returns the
// names of the modules built into the kernel.
func ParseBuiltin(r io.Reader) (map[string]bool, error) {
	out := map[string]bool{}
	err := eachLine(r, BuiltinFileName, func(_ int, f []string) error {
		out[Name(f[0])] = true
		return nil
	})
	if err != nil {
		return nil, err
	}
	return out, nil
}

// Devname is a device node that loads its module when opened ("tun net/tun c10:200").
type Devname struct {
	Module string
	// Name is the node's path under /dev.
	Name string
	// Type is 'c' or 'b'.
	Type         byte
	Major, Minor uint32
}

// ParseDevnames reads a modules.devname file.
func ParseDevnames(r io.Reader) ([]Devname, error) {
	var out []Devname
	err := eachLine(r, DevnameFileName, func(line int, f []string) error {
		var d Devname
		if len(f) != 3 || len(f[2]) < 2 {
			return fmt.Errorf("%s line %d: want \"MODULE NAME TYPEMAJOR:MINOR\": %w", DevnameFileName, line, errdefs.ErrInvalidArgument)
		}
		d.Module, d.Name, d.Type = underscores(f[0]), f[1], f[2][0]
		if _, err := fmt.Sscanf(f[2][1:], "%d:%d", &d.Major, &d.Minor); err != nil || (d.Type != 'c' && d.Type != 'b') ||
			path.IsAbs(d.Name) || path.Clean(d.Name) != d.Name || strings.HasPrefix(d.Name, "..") {
			return fmt.Errorf("%s line %d: bad node %q %q: %w", DevnameFileName, line, f[1], f[2], errdefs.ErrInvalidArgument)
		}
		out = append(out, d)
		return nil
	})
	if err != nil {
		return nil, err
	}
	return out, nil
}

// eachLine calls fn with the fields of every line of r that is neither empty nor a comment.
func eachLine(r io.Reader, file string, fn func(line int, fields []string) error) error {
	s := bufio.NewScanner(r)
	s.Buffer(make([]byte, 64*1024), 1024*1024)
	for line := 1; s.Scan(); line++ {
		f := strings.Fields(s.Text())
		if len(f) == 0 || strings.HasPrefix(f[0], "#") {
			continue
		}
		if err := fn(line, f); err != nil {
			return err
		}
	}
	if err := s.Err(); err != nil {
		return fmt.Errorf("%s: %w", file, err)
	}
	return nil
}

func underscores(name string) string { return strings.ReplaceAll(name, "-", "_") }
