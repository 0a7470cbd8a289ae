package layering

import (
	"go/ast"
	"go/parser"
	"go/token"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
)

const module = "github.com/caisson-containers/caisson/"

// root is the repository, two directories up from this package.
func root(t *testing.T) string {
	t.Helper()
	r, err := filepath.Abs(filepath.Join("..", ".."))
	if err != nil {
		t.Fatal(err)
	}
	return r
}

// imports returns, for each package directory under dir (relative to the
// repository), the module packages its files import, tests included.
func imports(t *testing.T, repo, dir string) map[string][]string {
	t.Helper()
	out := map[string][]string{}
	err := filepath.WalkDir(filepath.Join(repo, dir), func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() && (d.Name() == "testdata" || strings.HasPrefix(d.Name(), ".")) {
			return filepath.SkipDir
		}
		if d.IsDir() || !strings.HasSuffix(path, ".go") {
			return nil
		}
		f, err := parser.ParseFile(token.NewFileSet(), path, nil, parser.ImportsOnly)
		if err != nil {
			return err
		}
		pkg, _ := filepath.Rel(repo, filepath.Dir(path))
		for _, i := range f.Imports {
			p, _ := strconv.Unquote(i.Path.Value)
			if strings.HasPrefix(p, module) {
				out[pkg] = append(out[pkg], strings.TrimPrefix(p, module))
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

func under(pkg, dir string) bool { return pkg == dir || strings.HasPrefix(pkg, dir+"/") }

func TestImportsPointDown(t *testing.T) {
	repo := root(t)
	for _, tc := range []struct {
		from, forbidden, why string
	}{
		{"internal", "shim", "internal/ holds what both the shim and the snapshotter use"},
		{"snapshotter", "shim", "the snapshotter builds without the shim; the mount contract is internal/rootfs"},
		{"shim/pod", "shim/vmm/qemu", "a pod reaches its VM through vmm.Hypervisor only"},
		{"shim/template", "shim/vmm/qemu", "a template is made through vmm.Hypervisor only"},
	} {
		for pkg, deps := range imports(t, repo, tc.from) {
			for _, d := range deps {
				if under(d, tc.forbidden) {
					t.Errorf("%s imports %s: %s", pkg, d, tc.why)
				}
			}
		}
	}
}

// maxFuncLines bounds the length of a function in the shim's core, counted in
// lines of code: blank lines and lines holding only a comment are not counted.
const maxFuncLines = 80

// codeLines counts the lines of fn, from its func keyword to its closing brace,
// that hold code.
func codeLines(fset *token.FileSet, f *ast.File, src []byte, fn *ast.FuncDecl) int {
	first, last := fset.Position(fn.Pos()).Line, fset.Position(fn.End()).Line
	comment := map[int]bool{}
	for _, g := range f.Comments {
		for _, c := range g.List {
			for l := fset.Position(c.Pos()).Line; l <= fset.Position(c.End()).Line; l++ {
				comment[l] = true
			}
		}
	}
	n := 0
	for i, line := range strings.Split(string(src), "\n") {
		l := i + 1
		if l < first || l > last {
			continue
		}
		t := strings.TrimSpace(line)
		if t == "" || (comment[l] && (strings.HasPrefix(t, "//") || strings.HasPrefix(t, "/*"))) {
			continue
		}
		n++
	}
	return n
}

func TestShimCoreFunctionsAreShort(t *testing.T) {
	repo := root(t)
	for _, dir := range []string{"shim/task", "shim/pod", "shim/vmm/qemu"} {
		entries, err := os.ReadDir(filepath.Join(repo, dir))
		if err != nil {
			t.Fatal(err)
		}
		for _, e := range entries {
			if !strings.HasSuffix(e.Name(), ".go") || strings.HasSuffix(e.Name(), "_test.go") {
				continue
			}
			src, err := os.ReadFile(filepath.Join(repo, dir, e.Name()))
			if err != nil {
				t.Fatal(err)
			}
			fset := token.NewFileSet()
			f, err := parser.ParseFile(fset, e.Name(), src, parser.ParseComments)
			if err != nil {
				t.Fatal(err)
			}
			for _, d := range f.Decls {
				fn, ok := d.(*ast.FuncDecl)
				if !ok || fn.Body == nil {
					continue
				}
				if n := codeLines(fset, f, src, fn); n > maxFuncLines {
					t.Errorf("%s/%s: %s is %d lines of code (at most %d)", dir, e.Name(), fn.Name.Name, n, maxFuncLines)
				}
			}
		}
	}
}
