package agent

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/caisson-containers/caisson/internal/testutil"
)

// TestCheckProtosCatchesStaleCode edits a .proto in a copy of the tree and
// checks that `hack/protos.sh check` (make check-protos) fails until the code
// is regenerated.
func TestCheckProtosCatchesStaleCode(t *testing.T) {
	testutil.RequireBinary(t, "protoc")
	tree := t.TempDir()
	for _, p := range []string{"go.mod", "go.sum", "hack/protos.sh", "api"} {
		cmd := exec.Command("cp", "-a", "--parents", p, tree)
		cmd.Dir = testutil.RepoRoot(t)
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("copy %s: %v: %s", p, err, out)
		}
	}
	run := func(name string, args ...string) (string, error) {
		cmd := exec.Command(name, args...)
		cmd.Dir = tree
		out, err := cmd.CombinedOutput()
		return string(out), err
	}
	if out, err := run("git", "init", "-q"); err != nil {
		t.Fatal(out)
	}
	if out, err := run("git", "add", "-A"); err != nil {
		t.Fatal(out)
	}
	if out, err := run("hack/protos.sh", "check"); err != nil {
		t.Fatalf("check fails on the committed tree: %v\n%s", err, out)
	}

	proto := filepath.Join(tree, "api/agent/v1/types.proto")
	b, _ := os.ReadFile(proto)
	edited := strings.Replace(string(b), "bool stderr = 4;", "bool stderr = 4;\n  bool stale_field = 5;", 1)
	if edited == string(b) {
		t.Fatal("could not edit types.proto")
	}
	os.WriteFile(proto, []byte(edited), 0o644)
	out, err := run("hack/protos.sh", "check")
	if err == nil {
		t.Fatalf("check passed after an unregenerated .proto edit:\n%s", out)
	}
	if !strings.Contains(out, "stale: api/agent/v1/types.pb.go") {
		t.Fatalf("check did not name the stale file:\n%s", out)
	}
	if out, err := run("hack/protos.sh", "generate"); err != nil {
		t.Fatalf("generate: %v\n%s", err, out)
	}
	if out, err := run("hack/protos.sh", "check"); err != nil {
		t.Fatalf("check fails after regenerating: %v\n%s", err, out)
	}
}
