// Package harness runs what Caisson's integration tests need for real: a
// private containerd (from `make deps`) configured from contrib/, the
// caisson-snapshotter beside it, Caisson's shim and guest from this checkout,
// and test images built locally. Everything lives under temporary directories,
// touches nothing of the host's containerd, and is checked for leftovers
// (QEMU processes, mounts, loop devices) when the test ends.
package harness

import (
	"bytes"
	"context"
	"fmt"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	containerd "github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/pelletier/go-toml/v2"

	"github.com/caisson-containers/caisson/internal/testutil"
	"github.com/caisson-containers/caisson/shim/config"
	"github.com/caisson-containers/caisson/shim/pod"
	"github.com/caisson-containers/caisson/shim/warm"
)

// Namespace is the containerd namespace the tests use.
const Namespace = "caisson-test"

// Env is a running containerd with Caisson.
type Env struct {
	Client *containerd.Client
	// Dir holds containerd's root and state and the snapshotter's root.
	Dir string
	// StateDir is the runtime's state_dir (pod VMs' sockets and logs).
	StateDir string
	// Address is containerd's socket.
	Address string
	// Config is the runtime configuration the shim uses.
	Config config.Config
	// ConfigPath is its file (CAISSON_CONFIG of containerd, and so of the shim).
	ConfigPath string
	// Containerd is the containerd running.
	Containerd *Containerd
	// hostMounts: the snapshotter runs with mount_mode "host" (containerd < 2.2).
	hostMounts bool
}

// Ctr runs this containerd's own ctr against it, in the test namespace, and returns
// its standard output, its standard error and its exit status.
func (e *Env) Ctr(t testing.TB, args ...string) (stdout, stderr string, code int) {
	t.Helper()
	cmd := exec.Command(filepath.Join(e.Containerd.Bin, "ctr"), append([]string{"--address", e.Address, "--namespace", Namespace}, args...)...)
	var out, errOut bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errOut
	if err := cmd.Run(); err != nil {
		ee, ok := err.(*exec.ExitError)
		if !ok {
			t.Fatalf("ctr %s: %v", strings.Join(args, " "), err)
		}
		code = ee.ExitCode()
	}
	return out.String(), errOut.String(), code
}

// Options adjust the environment.
type Options struct {
	// CRI keeps containerd's CRI plugin enabled.
	CRI bool
	// Runtime adjusts the runtime configuration before it is written.
	Runtime func(*config.Config)
	// ContainerdConfig adjusts containerd's configuration (decoded contrib file).
	ContainerdConfig func(map[string]any)
	// ContribConfig is the file in contrib/containerd to start from (default config.toml).
	ContribConfig string
	// Handlers are more CRI runtime handlers, each the caisson handler with its own
	// runtime configuration: the environment's, adjusted.
	Handlers map[string]func(*config.Config)
	// Containerd is the containerd to run (default: the one `make deps` built, at the
	// version go.mod pins).
	Containerd *Containerd
}

// Containerd is a containerd build: its daemon and its ctr.
type Containerd struct {
	// Version is containerd's version, e.g. "v1.7.29".
	Version string
	// Bin is the directory holding containerd and ctr.
	Bin string
}

// pinnedVersion is the version of the containerd `make deps` built (go.mod's pin),
// from the stamp hack/deps.sh leaves beside it.
func pinnedVersion(bin string) string {
	stamps, _ := filepath.Glob(filepath.Join(bin, ".containerd-v*"))
	if len(stamps) != 1 {
		return "unknown"
	}
	return strings.TrimPrefix(filepath.Base(stamps[0]), ".containerd-")
}

// Older reports whether this containerd's major.minor is below major.minor.
func (c *Containerd) Older(major, minor int) bool {
	var maj, min int
	fmt.Sscanf(c.Version, "v%d.%d", &maj, &min)
	return maj < major || maj == major && min < minor
}

// MatrixContainerd is containerd at version, as hack/build-containerd.sh builds it
// under _output/tools/containerd/VERSION; t is skipped if it is not built.
func MatrixContainerd(t testing.TB, version string) *Containerd {
	t.Helper()
	dir := filepath.Join(testutil.RepoRoot(t), "_output", "tools", "containerd", version, "bin")
	for _, b := range []string{"containerd", "ctr"} {
		if _, err := os.Stat(filepath.Join(dir, b)); err != nil {
			t.Skipf("needs containerd %s (run `hack/build-containerd.sh %s _output/tools/containerd/%s`)", version, version, version)
		}
	}
	return &Containerd{Version: version, Bin: dir}
}

// Start starts containerd and the snapshotter; t.Cleanup stops them and fails
// the test if anything is left behind.
func Start(t testing.TB, o Options) *Env {
	t.Helper()
	testutil.RequireRoot(t)
	if o.Containerd == nil {
		bin := filepath.Dir(testutil.RequireBinary(t, "containerd"))
		o.Containerd = &Containerd{Version: pinnedVersion(bin), Bin: bin}
	}
	containerdBin := filepath.Join(o.Containerd.Bin, "containerd")
	guest := testutil.RequireGuest(t)
	root := testutil.RepoRoot(t)
	bin := filepath.Join(root, "bin")
	for _, b := range []string{"containerd-shim-caisson-v2", "caisson-snapshotter"} {
		if _, err := os.Stat(filepath.Join(bin, b)); err != nil {
			t.Skipf("needs bin/%s (run `make binaries`)", b)
		}
	}

	dir := t.TempDir()
	// Unix socket paths are limited to 107 bytes: VM sockets live in a short directory.
	stateDir, err := os.MkdirTemp("/run", "cit-") // CRI pod ids are 64 characters
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(stateDir) })
	e := &Env{Dir: dir, StateDir: stateDir, Address: filepath.Join(dir, "containerd.sock"), Containerd: o.Containerd}

	// The runtime's configuration.
	e.Config = config.Default(filepath.Dir(guest.Kernel))
	e.Config.StateDir = stateDir
	e.Config.LogLevel = "debug"
	if o.Runtime != nil {
		o.Runtime(&e.Config)
	}
	e.ConfigPath = filepath.Join(dir, "caisson.toml")
	f, err := os.Create(e.ConfigPath)
	if err != nil {
		t.Fatal(err)
	}
	if err := e.Config.Write(f); err != nil {
		t.Fatal(err)
	}
	f.Close()

	// The snapshotter, rooted under containerd's root (see contrib/containerd/config.toml).
	ctrRoot := filepath.Join(dir, "root")
	snapRoot := filepath.Join(ctrRoot, "io.containerd.snapshotter.v1.caisson")
	snapSock := filepath.Join(dir, "snapshotter.sock")
	snapCfg := filepath.Join(dir, "snapshotter.toml")
	snapToml := fmt.Sprintf("root = %q\n", snapRoot)
	if o.Containerd.Older(2, 2) {
		// containerd 1.7–2.1 mount rootfs mounts on the host themselves (docs/mounts.md).
		snapToml += "mount_mode = \"host\"\n"
	}
	if err := os.WriteFile(snapCfg, []byte(snapToml), 0o644); err != nil {
		t.Fatal(err)
	}
	if o.Containerd.Older(2, 2) {
		e.hostMounts = true
		// Registered before the daemon, so it runs after the daemon stopped: the
		// layer mounts it held while it ran must be gone.
		t.Cleanup(func() {
			for _, l := range leftovers(false, snapRoot) {
				t.Errorf("left by caisson-snapshotter (mount_mode host) after it stopped: %s", l)
			}
		})
	}
	snap := startDaemon(t, "caisson-snapshotter", filepath.Join(dir, "snapshotter.log"), nil,
		filepath.Join(bin, "caisson-snapshotter"), "--root", snapRoot, "--address", snapSock, "--config", snapCfg,
		"--containerd-address", e.Address, "--log-level", "debug")
	waitSocket(t, snapSock, snap)

	// containerd, from the shipped contrib config with this test's paths.
	contrib := "config.toml"
	if o.ContribConfig != "" {
		contrib = o.ContribConfig
	}
	cfg := loadContrib(t, filepath.Join(root, "contrib", "containerd", contrib))
	cfg["root"] = ctrRoot
	cfg["state"] = filepath.Join(dir, "state")
	cfg["grpc"] = map[string]any{"address": e.Address}
	cfg["proxy_plugins"].(map[string]any)["caisson"].(map[string]any)["address"] = snapSock
	cfg["proxy_plugins"].(map[string]any)["caisson-diff"].(map[string]any)["address"] = snapSock
	// The CRI handler's runtime options name the runtime configuration file.
	runtimes := CRIRuntimes(cfg)
	caissonHandler := runtimes["caisson"].(map[string]any)
	caissonHandler["options"].(map[string]any)["ConfigPath"] = e.ConfigPath
	for name, adjust := range o.Handlers {
		c := e.Config
		adjust(&c)
		path := filepath.Join(dir, name+".toml")
		var buf bytes.Buffer
		if err := c.Write(&buf); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(path, buf.Bytes(), 0o644); err != nil {
			t.Fatal(err)
		}
		h := maps.Clone(caissonHandler)
		opts := maps.Clone(caissonHandler["options"].(map[string]any))
		opts["ConfigPath"] = path
		h["options"] = opts
		runtimes[name] = h
	}
	if !o.CRI {
		cfg["disabled_plugins"] = []string{"io.containerd.grpc.v1.cri", "io.containerd.cri.v1.runtime", "io.containerd.cri.v1.images",
			"io.containerd.podsandbox.controller.v1.podsandbox", "io.containerd.sandbox.controller.v1.shim"}
	}
	if o.ContainerdConfig != nil {
		o.ContainerdConfig(cfg)
	}
	b, err := toml.Marshal(cfg)
	if err != nil {
		t.Fatal(err)
	}
	ctrCfg := filepath.Join(dir, "containerd.toml")
	os.WriteFile(ctrCfg, b, 0o644)
	env := []string{
		"PATH=" + bin + ":" + filepath.Dir(containerdBin) + ":/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
		config.EnvPath + "=" + e.ConfigPath,
	}
	ctrd := startDaemon(t, "containerd", filepath.Join(dir, "containerd.log"), env, containerdBin, "--config", ctrCfg, "--log-level", "debug")
	waitSocket(t, e.Address, ctrd)

	client, err := containerd.New(e.Address, containerd.WithDefaultNamespace(Namespace))
	if err != nil {
		t.Fatal(err)
	}
	e.Client = client
	t.Cleanup(func() { client.Close() })
	t.Cleanup(func() { checkLeftovers(t, e.hostMounts, dir, stateDir) })
	// Warm VMs (hypervisor.warm_vms) wait for pods past containerd's life, as the pods'
	// shims run past it: end them, as `caisson warm remove` does.
	t.Cleanup(func() {
		if _, err := warm.Drain(stateDir, 10*time.Second, pod.ReleaseWarmSlot); err != nil {
			t.Errorf("warm VMs: %v", err)
		}
	})
	return e
}

// QEMUs are the pids of this environment's pod VMs.
func (e *Env) QEMUs() []string {
	var pids []string
	entries, _ := os.ReadDir("/proc")
	for _, en := range entries {
		b, err := os.ReadFile(filepath.Join("/proc", en.Name(), "cmdline"))
		// QEMU itself: not virtiofsd, which Debian installs under /usr/lib/qemu.
		argv0, _, _ := bytes.Cut(b, []byte{0})
		if err == nil && bytes.HasPrefix([]byte(filepath.Base(string(argv0))), []byte("qemu-system")) && bytes.Contains(b, []byte(e.StateDir)) {
			pids = append(pids, en.Name())
		}
	}
	return pids
}

// Virtiofsds are the pids of this environment's pods' virtiofsd (guest.shared_fs).
func (e *Env) Virtiofsds() []string {
	var pids []string
	entries, _ := os.ReadDir("/proc")
	for _, en := range entries {
		b, err := os.ReadFile(filepath.Join("/proc", en.Name(), "cmdline"))
		argv0, _, _ := bytes.Cut(b, []byte{0})
		if err == nil && filepath.Base(string(argv0)) == "virtiofsd" && bytes.Contains(b, []byte(e.StateDir)) {
			pids = append(pids, en.Name())
		}
	}
	return pids
}

// Context is a context in the test namespace, ending with the test.
func (e *Env) Context(t testing.TB) context.Context {
	ctx, cancel := context.WithTimeout(namespaces.WithNamespace(context.Background(), Namespace), 10*time.Minute)
	t.Cleanup(cancel)
	return ctx
}

func loadContrib(t testing.TB, path string) map[string]any {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var cfg map[string]any
	if err := toml.Unmarshal(b, &cfg); err != nil {
		t.Fatalf("%s: %v", path, err)
	}
	return cfg
}

type daemon struct {
	name string
	cmd  *exec.Cmd
	log  string
	done chan struct{}
}

// startDaemon runs a daemon until the test ends; its log is printed if the test failed.
func startDaemon(t testing.TB, name, logPath string, env []string, bin string, args ...string) *daemon {
	t.Helper()
	lf, err := os.Create(logPath)
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(bin, args...)
	cmd.Stdout, cmd.Stderr = lf, lf
	if env != nil {
		cmd.Env = env
	}
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		t.Fatalf("start %s: %v", name, err)
	}
	d := &daemon{name: name, cmd: cmd, log: logPath, done: make(chan struct{})}
	go func() { cmd.Wait(); lf.Close(); close(d.done) }()
	t.Cleanup(func() {
		cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-d.done:
		case <-time.After(20 * time.Second):
			t.Errorf("%s did not stop on SIGTERM", name)
			syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
			<-d.done
		}
		if t.Failed() {
			b, _ := os.ReadFile(logPath)
			t.Logf("%s log (last 6 KiB):\n%s", name, tail(b, 6<<10))
			keepLog(t, name, b)
		}
	})
	return d
}

func waitSocket(t testing.TB, path string, d *daemon) {
	t.Helper()
	deadline := time.Now().Add(60 * time.Second)
	for time.Now().Before(deadline) {
		if _, err := os.Stat(path); err == nil {
			return
		}
		select {
		case <-d.done:
			b, _ := os.ReadFile(d.log)
			t.Fatalf("%s exited before serving:\n%s", d.name, tail(b, 4<<10))
		case <-time.After(50 * time.Millisecond):
		}
	}
	t.Fatalf("%s did not create %s within a minute", d.name, path)
}

// LeftoverGrace is how long a shim that is still shutting down (containerd asks
// it to after the last delete, and it stops its VM gracefully) may take before
// what it holds counts as left behind.
const LeftoverGrace = 20 * time.Second

// checkLeftovers fails the test if a QEMU process, a mount or a loop device that
// belongs to this environment survived it.
func checkLeftovers(t testing.TB, hostMounts bool, dirs ...string) {
	t.Helper()
	deadline := time.Now().Add(LeftoverGrace)
	for {
		left := leftovers(hostMounts, dirs...)
		if len(left) == 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Errorf("left behind:\n  %s", strings.Join(left, "\n  "))
			return
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// layerMount matches the mountinfo and losetup lines of a layer that caisson-snapshotter
// keeps mounted with mount_mode "host".
var layerMount = regexp.MustCompile(`/snapshots/[0-9]+/(fs |layer\.(erofs|ext4)\))`)

// leftovers lists what of dirs is still running or mounted; with hostMounts, the
// snapshotter's layer mounts are not counted (it holds them while it runs).
func leftovers(hostMounts bool, dirs ...string) []string {
	var left []string
	entries, _ := os.ReadDir("/proc")
	for _, en := range entries {
		b, err := os.ReadFile(filepath.Join("/proc", en.Name(), "cmdline"))
		if err != nil || !bytes.Contains(b, []byte("qemu")) {
			continue
		}
		for _, d := range dirs {
			if bytes.Contains(b, []byte(d)) {
				left = append(left, "qemu process "+en.Name())
			}
		}
	}
	mounts, _ := os.ReadFile("/proc/self/mountinfo")
	for _, line := range strings.Split(string(mounts), "\n") {
		for _, d := range dirs {
			if strings.Contains(line, " "+d) && !(hostMounts && layerMount.MatchString(line)) {
				left = append(left, "mount: "+line)
			}
		}
	}
	loops, _ := exec.Command("losetup", "-a").Output()
	for _, line := range strings.Split(string(loops), "\n") {
		for _, d := range dirs {
			if d != "" && strings.Contains(line, d) && !(hostMounts && layerMount.MatchString(line)) {
				left = append(left, "loop device: "+line)
			}
		}
	}
	return left
}

func tail(b []byte, n int) string {
	if len(b) > n {
		b = b[len(b)-n:]
	}
	return string(b)
}

// CRIRuntimes is the CRI's table of runtime handlers in containerd's configuration cfg
// (version 2 or 3), by name.
func CRIRuntimes(cfg map[string]any) map[string]any {
	criRuntime := "io.containerd.cri.v1.runtime"
	if cfg["version"] == int64(2) {
		criRuntime = "io.containerd.grpc.v1.cri"
	}
	return cfg["plugins"].(map[string]any)[criRuntime].(map[string]any)["containerd"].(map[string]any)["runtimes"].(map[string]any)
}

// keepLogsEnv names a directory where a failed test's daemon logs are kept whole: the
// last 6 KiB in the test's output rarely reach back to a failure's cause on a busy shim.
const keepLogsEnv = "CAISSON_TEST_LOGS"

func keepLog(t testing.TB, name string, b []byte) {
	dir := os.Getenv(keepLogsEnv)
	if dir == "" {
		return
	}
	path := filepath.Join(dir, strings.NewReplacer("/", "_", " ", "_").Replace(t.Name())+"."+name+".log")
	err := os.MkdirAll(dir, 0o755)
	if err == nil {
		err = os.WriteFile(path, b, 0o644)
	}
	if err != nil {
		t.Logf("keep %s's log: %v", name, err)
		return
	}
	t.Logf("%s's whole log: %s", name, path)
}
