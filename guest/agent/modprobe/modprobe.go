// Package modprobe is the guest's modprobe: the kernel runs it (the path in
// /proc/sys/kernel/modprobe, a link to the agent, which answers as modprobe under that
// name) when it needs a module it does not have, as `modprobe -q -- NAME`, with NAME a
// module or one of its aliases ("rtnl-link-bridge", "char-major-10-200", "fs-overlay").
// It reads the module tree kmod's depmod wrote (modules.dep, .alias, .softdep,
// .builtin) and loads the module after its dependencies with finit_module(2).
//
// It runs in the guest's own mount namespace (the kernel's usermode helpers run in
// init's), so no container can replace it or the modules it reads.
package modprobe

import (
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"

	"github.com/containerd/errdefs"
	"golang.org/x/sys/unix"

	"github.com/caisson-containers/caisson/guest/initramfs/moddep"
)

// Path is where the guest's modprobe is (a link to /init in the initramfs), and what the
// agent writes into /proc/sys/kernel/modprobe.
const Path = "/sbin/modprobe"

// Name is the command name under which the agent answers as modprobe.
const Name = "modprobe"

// Dir is the module tree of the running kernel, /lib/modules/$(uname -r).
func Dir() (string, error) {
	var u unix.Utsname
	if err := unix.Uname(&u); err != nil {
		return "", err
	}
	return filepath.Join("/lib/modules", unix.ByteSliceToString(u.Release[:])), nil
}

// Tree is a kernel's module tree as depmod describes it. A file depmod did not write is
// empty (the initramfs has a modules.dep only).
type Tree struct {
	dir     string
	dep     *moddep.Graph
	aliases *moddep.Aliases
	soft    moddep.Softdeps
	builtin map[string]bool
}

// Open reads the tree in dir.
func Open(dir string) (*Tree, error) {
	t := &Tree{dir: dir}
	var err error
	if t.dep, err = parse(dir, moddep.FileName, moddep.Parse); err != nil {
		return nil, err
	}
	if t.aliases, err = parse(dir, moddep.AliasFileName, moddep.ParseAliases); err != nil {
		return nil, err
	}
	if t.soft, err = parse(dir, moddep.SoftdepFileName, moddep.ParseSoftdeps); err != nil {
		return nil, err
	}
	if t.builtin, err = parse(dir, moddep.BuiltinFileName, moddep.ParseBuiltin); err != nil {
		return nil, err
	}
	return t, nil
}

func parse[T any](dir, name string, fn func(io.Reader) (T, error)) (T, error) {
	f, err := os.Open(filepath.Join(dir, name))
	if errors.Is(err, os.ErrNotExist) {
		return fn(strings.NewReader(""))
	}
	if err != nil {
		var zero T
		return zero, err
	}
	defer f.Close()
	v, err := fn(f)
	if err != nil {
		return v, fmt.Errorf("%s: %w", f.Name(), err)
	}
	return v, nil
}

// Resolve returns the modules name stands for: the module of that name, else the modules
// one of whose aliases matches it. A module built into the kernel resolves to nothing,
// and so does an alias only built-in modules have. A name that is neither is NotFound.
func (t *Tree) Resolve(name string) ([]string, error) {
	mod := strings.ReplaceAll(name, "-", "_")
	if t.dep.Has(mod) {
		return []string{mod}, nil
	}
	if t.builtin[mod] {
		return nil, nil
	}
	matches := t.aliases.Lookup(name)
	if len(matches) == 0 {
		return nil, fmt.Errorf("module %s not found in %s: %w", name, t.dir, errdefs.ErrNotFound)
	}
	var out []string
	builtin := false
	for _, m := range matches {
		switch {
		case t.dep.Has(m):
			out = append(out, m)
		case t.builtin[m]:
			builtin = true
		}
	}
	if len(out) == 0 && !builtin {
		return nil, fmt.Errorf("alias %s names %v, none of them in %s: %w", name, matches, t.dir, errdefs.ErrNotFound)
	}
	return out, nil
}

// Load loads module mod (a name Resolve returned) after its dependencies and its soft
// "pre" dependencies, and its soft "post" ones after it, giving it params
// ("key=value ..."). A module already loaded is not an error; a soft dependency that
// fails to load is ignored, as modprobe does.
func (t *Tree) Load(mod, params string) error {
	d := t.soft[mod]
	t.loadSoft(d.Pre)
	paths, err := t.dep.Closure([]string{mod})
	if err != nil {
		return err
	}
	for i, p := range paths {
		opts := ""
		if i == len(paths)-1 {
			opts = params
		}
		if err := Insmod(filepath.Join(t.dir, p), opts); err != nil {
			return err
		}
	}
	t.loadSoft(d.Post)
	return nil
}

func (t *Tree) loadSoft(names []string) {
	for _, n := range names {
		mods, err := t.Resolve(n)
		if err != nil {
			continue
		}
		for _, m := range mods {
			_ = t.Load(m, "")
		}
	}
}

// Insmod loads the module file path with params. A module of that name already loaded
// is not an error.
func Insmod(path, params string) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	if err := unix.FinitModule(int(f.Fd()), params, 0); err != nil && !errors.Is(err, unix.EEXIST) {
		return fmt.Errorf("load module %s: %w", filepath.Base(path), err)
	}
	return nil
}

// usage is what modprobe accepts: the kernel's `-q -- NAME`, and by hand NAME with
// module parameters.
const usage = "usage: modprobe [-q] [-v] [--] MODULE [PARAM=VALUE...]"

// Main runs modprobe with args (without the command name) and returns its exit status.
// Its messages go to stderr and, since a usermode helper's stderr goes nowhere, to the
// kernel log.
func Main(args []string) int {
	quiet, verbose := false, false
	for len(args) > 0 && strings.HasPrefix(args[0], "-") {
		a := args[0]
		args = args[1:]
		if a == "--" {
			break
		}
		switch a {
		case "-q", "--quiet":
			quiet = true
		case "-v", "--verbose":
			verbose = true
		case "-b", "--use-blacklist":
			// no blacklist in the guest
		default:
			report(fmt.Sprintf("option %s is not supported; %s", a, usage))
			return 1
		}
	}
	if len(args) == 0 {
		report(usage)
		return 1
	}
	name, params := args[0], strings.Join(args[1:], " ")
	if err := Probe(name, params); err != nil {
		if !quiet || !errdefs.IsNotFound(err) {
			report(err.Error())
		}
		return 1
	}
	if verbose {
		fmt.Fprintf(os.Stderr, "modprobe: %s loaded\n", name)
	}
	return 0
}

// Probe loads the modules name stands for from the running kernel's tree.
func Probe(name, params string) error {
	dir, err := Dir()
	if err != nil {
		return err
	}
	t, err := Open(dir)
	if err != nil {
		return err
	}
	mods, err := t.Resolve(name)
	if err != nil {
		return err
	}
	var errs []error
	for _, m := range mods {
		errs = append(errs, t.Load(m, params))
	}
	return errors.Join(errs...)
}

func report(msg string) {
	fmt.Fprintln(os.Stderr, "modprobe:", msg)
	if f, err := os.OpenFile("/dev/kmsg", os.O_WRONLY, 0); err == nil {
		fmt.Fprintf(f, "<4>caisson modprobe: %s\n", msg)
		f.Close()
	}
}
