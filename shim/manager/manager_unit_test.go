package manager

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	bootapi "github.com/containerd/containerd/api/runtime/bootstrap/v1"
	runtimeoptions "github.com/containerd/containerd/api/types/runtimeoptions/v1"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/containerd/v2/pkg/shim"

	"github.com/caisson-containers/caisson/internal/testutil"
	"github.com/caisson-containers/caisson/shim/config"
)

// These tests drive the manager without spawning a shim: Start only where the pod's shim
// already listens (the container joins it), Stop on pods whose "VM" is a process of the
// test's own.

const runtimeName = "io.containerd.caisson.v2"

// testConfig writes a configuration whose state_dir is the test's, and returns its path
// and the state_dir.
func testConfig(t *testing.T) (path, stateRoot string) {
	t.Helper()
	if os.Getenv(config.EnvPath) != "" {
		t.Skipf("%s is set: the test writes its own configuration", config.EnvPath)
	}
	stateRoot = filepath.Join(testutil.ShortTempDir(t), "state") // state_dir is bounded (sockets)
	path = filepath.Join(t.TempDir(), "caisson.toml")
	if err := os.WriteFile(path, []byte("state_dir = \""+stateRoot+"\"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	return path, stateRoot
}

func bootstrapParams(t *testing.T, id, ns, socketDir, cfgPath string) *bootapi.BootstrapParams {
	t.Helper()
	p := &bootapi.BootstrapParams{InstanceID: id, Namespace: ns, ContainerdGrpcAddress: "/run/containerd/containerd.sock"}
	if socketDir != "" {
		p.SocketDir = &socketDir
	}
	if err := p.AddExtension(&runtimeoptions.Options{ConfigPath: cfgPath}); err != nil {
		t.Fatal(err)
	}
	return p
}

// listen serves a pod's shim socket: the shim of that pod is running.
func listen(t *testing.T, ctx context.Context, socketDir, podID string) string {
	t.Helper()
	address, err := shim.CreateSocketAddress(ctx, socketDir, "/run/containerd/containerd.sock", podID, false)
	if err != nil {
		t.Fatal(err)
	}
	l, err := shim.NewSocket(address)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	return address
}

// The containers of one pod (a group, or a CRI sandbox) go to the shim already serving
// it, whatever their own ids; another pod's container goes to its own. Start records in
// each bundle the shim's address and the configuration path, for Stop.
func TestStartJoinsThePodsShim(t *testing.T) {
	cfgPath, _ := testConfig(t)
	ctx := namespaces.WithNamespace(context.Background(), "k8s.io")
	for _, tc := range []struct {
		name        string
		pod         string
		annotations []string // of two containers of the pod
		other       string   // of a container of another pod
		otherPod    string
	}{
		{
			name: "group", pod: "shop",
			annotations: []string{`"io.caisson.group": "shop"`, `"io.caisson.group": "shop", "io.kubernetes.cri.sandbox-id": "sb9"`},
			other:       `"io.caisson.group": "bank"`, otherPod: "bank",
		},
		{
			name: "CRI sandbox", pod: "sb1",
			annotations: []string{
				`"io.kubernetes.cri.container-type": "sandbox", "io.kubernetes.cri.sandbox-id": "sb1"`,
				`"io.kubernetes.cri.container-type": "container", "io.kubernetes.cri.sandbox-id": "sb1"`,
			},
			other: `"io.kubernetes.cri.sandbox-id": "sb2"`, otherPod: "sb2",
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			socketDir := testutil.ShortTempDir(t)
			address := listen(t, ctx, socketDir, tc.pod)
			for i, a := range tc.annotations {
				id := []string{"c1", "c2"}[i]
				dir := bundle(t, a)
				res, err := New(runtimeName).Start(ctx, bootstrapParams(t, id, "k8s.io", socketDir, cfgPath))
				if err != nil {
					t.Fatalf("Start %s: %v", id, err)
				}
				if res.GetAddress() != address {
					t.Fatalf("Start %s: address %q, want the pod's shim %q", id, res.GetAddress(), address)
				}
				if b, err := os.ReadFile(filepath.Join(dir, "address")); err != nil || string(b) != address {
					t.Errorf("bundle's address file: %q, %v; want %q", b, err, address)
				}
				if p := recordedConfigPath(dir); p != cfgPath {
					t.Errorf("recorded configuration %q, want %q", p, cfgPath)
				}
			}
			otherAddress := listen(t, ctx, socketDir, tc.otherPod)
			bundle(t, tc.other)
			res, err := New(runtimeName).Start(ctx, bootstrapParams(t, "c3", "k8s.io", socketDir, cfgPath))
			if err != nil {
				t.Fatal(err)
			}
			if res.GetAddress() != otherAddress || otherAddress == address {
				t.Fatalf("another pod's container: address %q, want its pod's %q (not %q)", res.GetAddress(), otherAddress, address)
			}
		})
	}
}

// fakeVM starts a process standing for a pod's QEMU (its command line names qemu and the
// pod's state directory), child of parent (nil: of the test), and returns it once it
// runs. It is killed, with its group, at the end of the test.
func fakeVM(t *testing.T, stateDir string, shimBinary string) *exec.Cmd {
	t.Helper()
	// The "VM" is a shell with QEMU's command line that waits on a sleep it started
	// before saying it is up: so that, once it is up, it forks no more.
	var cmd *exec.Cmd
	if shimBinary == "" {
		cmd = exec.Command("sh", "-c", "sleep 1000 & echo up; wait", "qemu-system-x86_64", stateDir+"/vm/qmp.sock")
	} else {
		// The shim runs the VM as its child; its own command line names neither.
		cmd = exec.Command(shimBinary, "-c", `sh -c 'sleep 1000 & echo up; wait' "$VMM" "$SOCK" & wait`)
		cmd.Env = append(os.Environ(), "VMM=qemu-system-x86_64", "SOCK="+stateDir+"/vm/qmp.sock")
	}
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
		cmd.Wait()
	})
	line, err := bufio.NewReader(out).ReadString('\n')
	if err != nil || line != "up\n" {
		t.Fatalf("the fake VM did not start: %q, %v", line, err)
	}
	// Until the sleep execs, the forked child has the fake VM's command line too: wait for
	// that, or it counts as a second VM.
	for deadline := time.Now().Add(10 * time.Second); len(vmProcesses(stateDir)) != 1; time.Sleep(time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("fake VM processes: %v, want one", vmProcesses(stateDir))
		}
	}
	return cmd
}

// podState makes the state directory a pod of the configuration at cfgPath has.
func podState(t *testing.T, stateRoot, ns, pod string) string {
	t.Helper()
	stateDir := filepath.Join(stateRoot, ns+"-"+pod) // shim/podid
	if err := os.MkdirAll(filepath.Join(stateDir, "vm"), 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(stateDir, "console.log"), []byte("boot\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	return stateDir
}

// `shim delete` after a shim died: the pod's VM, which no shim owns any more, is killed,
// and the pod's state (under the state_dir of the configuration Start recorded) removed.
func TestStopKillsTheVMOfADeadShim(t *testing.T) {
	cfgPath, stateRoot := testConfig(t)
	ctx := namespaces.WithNamespace(context.Background(), "k8s.io")
	dir := bundle(t, `"io.kubernetes.cri.sandbox-id": "pod1"`)
	if err := recordConfigPath(dir, bootstrapParams(t, "c1", "k8s.io", "", cfgPath)); err != nil {
		t.Fatal(err)
	}
	stateDir := podState(t, stateRoot, "k8s.io", "pod1")
	vm := fakeVM(t, stateDir, "")
	exited := make(chan error, 1)
	go func() { exited <- vm.Wait() }()

	if _, err := New(runtimeName).Stop(ctx, "c1"); err != nil {
		t.Fatal(err)
	}
	// Killed: gone, or a zombie until the goroutine above reaps it; not sleeping.
	if st, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", vm.Process.Pid)); err == nil {
		if f := strings.Fields(string(st[strings.LastIndexByte(string(st), ')')+1:])); f[0] != "Z" {
			t.Fatalf("the dead shim's VM is still running (state %s) after Stop", f[0])
		}
	}
	var ee *exec.ExitError
	if err := <-exited; !errors.As(err, &ee) || ee.Sys().(syscall.WaitStatus).Signal() != syscall.SIGKILL {
		t.Fatalf("the dead shim's VM: %v, want killed by SIGKILL", err)
	}
	if _, err := os.Stat(stateDir); !os.IsNotExist(err) {
		t.Fatalf("pod state %s still there after Stop (stat: %v)", stateDir, err)
	}
}

// `shim delete` after a failed create, while the pod's shim lives: its VM and state are
// the live shim's, and stay.
func TestStopLeavesALiveShimsVM(t *testing.T) {
	cfgPath, stateRoot := testConfig(t)
	ctx := namespaces.WithNamespace(context.Background(), "k8s.io")
	dir := bundle(t, `"io.kubernetes.cri.sandbox-id": "pod1"`)
	if err := recordConfigPath(dir, bootstrapParams(t, "c2", "k8s.io", "", cfgPath)); err != nil {
		t.Fatal(err)
	}
	stateDir := podState(t, stateRoot, "k8s.io", "pod1")
	// A shell named as the shim binary stands for the live shim.
	shimBinary := filepath.Join(t.TempDir(), "containerd-shim-caisson-v2")
	copyFile(t, "/bin/sh", shimBinary)
	live := fakeVM(t, stateDir, shimBinary)

	if _, err := New(runtimeName).Stop(ctx, "c2"); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(stateDir, "console.log")); err != nil {
		t.Fatalf("the live shim's pod state went: %v", err)
	}
	// Its VM, the shell's child, still runs.
	if vms := vmProcesses(stateDir); len(vms) != 1 {
		t.Fatalf("VM processes of the pod after Stop: %v, want the live shim's one", vms)
	}
	if err := live.Process.Signal(syscall.Signal(0)); err != nil {
		t.Fatalf("the live shim: %v", err)
	}
}

func copyFile(t *testing.T, from, to string) {
	t.Helper()
	src, err := os.Open(from)
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	dst, err := os.OpenFile(to, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o755)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := io.Copy(dst, src); err != nil {
		t.Fatal(err)
	}
	if err := dst.Close(); err != nil {
		t.Fatal(err)
	}
}

// Stop removes the socket recorded in the bundle when no shim listens on it (a shim
// killed with SIGKILL leaves it), and leaves a live shim's.
func TestStopRemovesOnlyADeadShimsSocket(t *testing.T) {
	cfgPath, _ := testConfig(t)
	ctx := namespaces.WithNamespace(context.Background(), "default")
	for _, alive := range []bool{false, true} {
		name := map[bool]string{false: "dead", true: "alive"}[alive]
		t.Run(name, func(t *testing.T) {
			dir := bundle(t, "")
			if err := recordConfigPath(dir, bootstrapParams(t, "c1", "default", "", cfgPath)); err != nil {
				t.Fatal(err)
			}
			path := filepath.Join(testutil.ShortTempDir(t), "shim.sock")
			l, err := net.Listen("unix", path)
			if err != nil {
				t.Fatal(err)
			}
			l.(*net.UnixListener).SetUnlinkOnClose(false)
			t.Cleanup(func() { l.Close() })
			if !alive {
				l.Close()
			}
			if err := os.WriteFile(filepath.Join(dir, "address"), []byte("unix://"+path), 0o600); err != nil {
				t.Fatal(err)
			}
			if _, err := New(runtimeName).Stop(ctx, "c1"); err != nil {
				t.Fatal(err)
			}
			_, err = os.Stat(path)
			if alive && err != nil {
				t.Fatalf("a live shim's socket: %v, want it left", err)
			}
			if !alive && !os.IsNotExist(err) {
				t.Fatalf("a dead shim's socket: %v, want it removed", err)
			}
		})
	}
}

// -info tells containerd (2.2, 2.3) which mounts to pass through to the shim, with the
// runtime's name and features.
func TestInfo(t *testing.T) {
	info, err := New(runtimeName).Info(context.Background(), nil)
	if err != nil {
		t.Fatal(err)
	}
	if info.GetName() != runtimeName {
		t.Errorf("name %q, want %q", info.GetName(), runtimeName)
	}
	allow := strings.Split(info.GetAnnotations()[allowMountsAnnotation], ",")
	for _, want := range []string{"erofs", "ext4", "mkfs/*", "mkdir/*", "format/*"} {
		if !slices.Contains(allow, want) {
			t.Errorf("%s = %q lacks %q", allowMountsAnnotation, allow, want)
		}
	}
	if info.GetFeatures() == nil || len(info.GetFeatures().GetValue()) == 0 {
		t.Error("no features")
	}
}
