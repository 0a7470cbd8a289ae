// Package critest runs cri-tools' CRI validation suite (critest, the measure of a
// runtime's parity with what Kubernetes expects of a CRI runtime) against a private
// containerd with Caisson, twice in the same run: with the runc handler, as the
// control, then with the caisson handler. A spec whose result differs between the two
// must be one of the expected differences below, each with its reason, and every
// expected difference must still differ, so the list cannot go stale.
//
// The run needs root, QEMU and the critest binary (`make test-critest` builds it into
// _output/tools). It writes the two ginkgo JSON reports and a Markdown table of every
// spec's results to _output/critest.
package critest

import (
	"cmp"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/caisson-containers/caisson/integration-tests/harness"
	"github.com/caisson-containers/caisson/internal/testutil"
)

// only names the handlers to run, in order (the comparison needs both).
var only = flag.String("critest.handlers", "runc,caisson", "the handlers to run, in order; the comparison needs both")

// FocusEnv, if set, is the ginkgo focus regexp of both runs (hack/test.sh runs a
// subset); an environment variable rather than a flag so that `go test ./...` can
// pass it to this package alone.
const FocusEnv = "CAISSON_CRITEST_FOCUS"

// skipped are the specs neither run attempts, each for a reason of this environment
// rather than of a runtime.
var skipped = []struct{ re, why string }{
	// They pull critest's own images by digest and from two registries
	// (registry.k8s.io, k8s.gcr.io): look-alikes pushed here have other digests.
	{`\[k8s\.io\] Image Manager`, "needs the real images of gcr.io/k8s-staging-cri-tools (pulls by their digests)"},
	// The host has neither SELinux nor AppArmor (no securityfs): these would skip or fail
	// alike for both handlers, measuring the host, not the runtime.
	{`SELinux`, "the host kernel runs no SELinux"},
	{`AppArmor`, "the host kernel runs no AppArmor (no securityfs)"},
}

// expected are the specs whose caisson result is allowed to differ from runc's, with
// the reason docs/cri.md gives. A flaky one may also come out the same.
var expected = []struct {
	re, why string
	flaky   bool
}{
	{re: `NamespaceOption runtime should support (HostPID|HostIpc is true|HostNetwork is true)$`,
		why: "VM: refused with InvalidArgument naming hostPID/hostIPC/hostNetwork; the pod's VM has its own kernel, none of whose namespaces is the node's"},
	{re: `runtime should support portforward in host network$`,
		why: "VM: needs a hostNetwork pod (refused)"},
	{re: `mount with 'rshared' should support propagation from host to container and vice versa$`,
		why: "VM: host to container works (the share's copy of the host path's mounts receives the host's later ones), but a mount the container makes is the guest kernel's, which the host cannot see (docs/volumes.md)"},
	{re: `runtime should support removing stopped container \[Conformance\]$`, flaky: true,
		why: "TCG timing: StopContainer's SIGTERM reaches `top` (PID 1) before it installs its handler, so it is ignored, and critest's 60 s wait ends just as containerd's 60 s timeout sends SIGKILL"},
}

type specResult struct {
	State   string
	Runtime time.Duration
	Failure string
}

func TestCritest(t *testing.T) {
	if testing.Short() {
		t.Skip("critest boots a VM per pod for minutes: not a short test")
	}
	if os.Getuid() != 0 {
		t.Skip("needs root: critest drives a private containerd with QEMU pods")
	}
	bin := filepath.Join(testutil.RepoRoot(t), "_output", "tools", "critest")
	if _, err := os.Stat(bin); err != nil {
		t.Fatalf("needs critest at %s: run `make test-critest`, which builds it from the module proxy (%v)", bin, err)
	}
	out := filepath.Join(testutil.RepoRoot(t), "_output", "critest")
	if err := os.MkdirAll(out, 0o755); err != nil {
		t.Fatal(err)
	}
	reg := harness.StartRegistry(t)
	pushImages(t, reg)
	hosts := mirrorRegistries(t, reg, "registry.k8s.io", "k8s.gcr.io", "gcr.io")
	c := harness.StartCRI(t, harness.Options{ContainerdConfig: func(cfg map[string]any) {
		plugins := cfg["plugins"].(map[string]any)
		images := plugins["io.containerd.cri.v1.images"].(map[string]any)
		images["registry"] = map[string]any{"config_path": hosts}
		images["pinned_images"].(map[string]any)["sandbox"] = reg.Host + "/" + sandboxImage
	}})
	imagesFile := filepath.Join(t.TempDir(), "images.yaml")
	if err := os.WriteFile(imagesFile, []byte(fmt.Sprintf("defaultTestContainerImage: %s/%s\nwebServerTestImage: %s/%s\n",
		reg.Host, defaultImage, reg.Host, webServerImage)), 0o644); err != nil {
		t.Fatal(err)
	}
	var skip []string
	for _, s := range skipped {
		skip = append(skip, s.re)
	}

	handlers := strings.Split(*only, ",")
	results := map[string]map[string]specResult{}
	took := map[string]time.Duration{}
	for _, h := range handlers {
		report := filepath.Join(out, h+".json")
		os.Remove(report)
		args := []string{
			"--runtime-endpoint", "unix://" + c.Address,
			"--image-endpoint", "unix://" + c.Address,
			"--runtime-handler", h,
			"--test-images-file", imagesFile,
			"--ginkgo.skip", strings.Join(skip, "|"),
			"--ginkgo.json-report", report,
			"--ginkgo.no-color",
			"--ginkgo.timeout", "3h",
		}
		if focus := os.Getenv(FocusEnv); focus != "" {
			args = append(args, "--ginkgo.focus", focus)
		}
		logPath := filepath.Join(out, h+".log")
		logf, err := os.Create(logPath)
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Hour)
		cmd := exec.CommandContext(ctx, bin, args...)
		cmd.Stdout, cmd.Stderr = logf, logf
		start := time.Now()
		runErr := cmd.Run()
		took[h] = time.Since(start)
		cancel()
		logf.Close()
		// critest exits 1 when a spec fails; the report says which.
		res, err := readReport(report)
		if err != nil {
			t.Fatalf("critest --runtime-handler %s: %v, report: %v (log: %s)", h, runErr, err, logPath)
		}
		results[h] = res
		t.Logf("critest --runtime-handler %s: %s in %s (log: %s)", h, summary(res), took[h].Round(time.Second), logPath)
	}
	if len(handlers) < 2 {
		return
	}
	control, subject := results[handlers[0]], results[handlers[1]]
	table := compare(t, control, subject)
	md := fmt.Sprintf("critest %s, %s: %s in %s; %s: %s in %s\n\n%s",
		"v1.37.0", handlers[0], summary(control), took[handlers[0]].Round(time.Second),
		handlers[1], summary(subject), took[handlers[1]].Round(time.Second), table)
	if err := os.WriteFile(filepath.Join(out, "report.md"), []byte(md), 0o644); err != nil {
		t.Fatal(err)
	}
	t.Logf("results: %s", filepath.Join(out, "report.md"))
}

// mirrorRegistries writes containerd's registry host configuration (config_path)
// sending pulls from each of the registries to reg, and returns its directory.
func mirrorRegistries(t *testing.T, reg *harness.Registry, registries ...string) string {
	t.Helper()
	dir := t.TempDir()
	for _, r := range registries {
		if err := os.MkdirAll(filepath.Join(dir, r), 0o755); err != nil {
			t.Fatal(err)
		}
		hosts := fmt.Sprintf("server = %q\n\n[host.%q]\n  capabilities = [\"pull\", \"resolve\"]\n", "https://"+r, "http://"+reg.Host)
		if err := os.WriteFile(filepath.Join(dir, r, "hosts.toml"), []byte(hosts), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return dir
}

// compare fails t for every spec whose results differ without being expected, and
// for every expected difference that ran and no longer differs; it returns the
// Markdown table of every spec.
func compare(t *testing.T, control, subject map[string]specResult) string {
	names := slices.Sorted(func(yield func(string) bool) {
		seen := map[string]bool{}
		for _, m := range []map[string]specResult{control, subject} {
			for n := range m {
				if !seen[n] {
					seen[n] = true
					if !yield(n) {
						return
					}
				}
			}
		}
	})
	var b strings.Builder
	b.WriteString("| spec | runc | caisson | why they differ |\n|---|---|---|---|\n")
	for _, n := range names {
		cs, ss := control[n].State, subject[n].State
		why := ""
		exp, flaky := expectedWhy(n)
		switch {
		case cs != ss && exp == "":
			t.Errorf("%q: %s on runc, %s on caisson, not an expected difference; caisson's failure: %s", n, cmp.Or(cs, "absent"), cmp.Or(ss, "absent"), firstLine(subject[n].Failure))
			why = "UNEXPECTED: " + firstLine(subject[n].Failure)
		case cs != ss:
			why = exp
		case exp != "" && cs != "skipped" && !flaky:
			t.Errorf("%q is an expected difference (%s) but is %s on both: remove it from the list", n, exp, cs)
		}
		fmt.Fprintf(&b, "| %s | %s | %s | %s |\n", n, cmp.Or(cs, "absent"), cmp.Or(ss, "absent"), why)
	}
	return b.String()
}

func expectedWhy(name string) (why string, flaky bool) {
	for _, e := range expected {
		if regexp.MustCompile(e.re).MatchString(name) {
			return e.why, e.flaky
		}
	}
	return "", false
}

func firstLine(s string) string {
	s, _, _ = strings.Cut(strings.TrimSpace(s), "\n")
	return strings.ReplaceAll(s, "|", `\|`)
}

func summary(res map[string]specResult) string {
	n := map[string]int{}
	for _, r := range res {
		n[r.State]++
	}
	return fmt.Sprintf("%d passed, %d failed, %d skipped", n["passed"], n["failed"]+n["panicked"]+n["timedout"]+n["interrupted"]+n["aborted"], n["skipped"]+n["pending"])
}

// readReport reads ginkgo's JSON report: the specs (It nodes), each named by its
// containers' texts and its own.
func readReport(path string) (map[string]specResult, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var reports []struct {
		SpecReports []struct {
			ContainerHierarchyTexts []string
			LeafNodeType            string
			LeafNodeText            string
			State                   string
			RunTime                 time.Duration
			Failure                 struct{ Message string }
		}
	}
	if err := json.Unmarshal(b, &reports); err != nil {
		return nil, fmt.Errorf("decode %s: %w", path, err)
	}
	out := map[string]specResult{}
	for _, r := range reports {
		for _, s := range r.SpecReports {
			if s.LeafNodeType != "It" {
				if s.State != "passed" && s.State != "skipped" {
					return nil, fmt.Errorf("%s node %s: %s", s.LeafNodeType, s.State, s.Failure.Message)
				}
				continue
			}
			name := strings.TrimSpace(strings.Join(append(slices.Clone(s.ContainerHierarchyTexts), s.LeafNodeText), " "))
			out[name] = specResult{State: s.State, Runtime: s.RunTime, Failure: s.Failure.Message}
		}
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("%s holds no spec", path)
	}
	return out, nil
}
