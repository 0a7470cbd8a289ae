// Package manager is the shim's entry point for containerd: it starts the
// long-running shim for a pod (one shim, and one VM, per pod), cleans up after
// a shim that died, and tells containerd what the runtime handles itself.
package manager

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	bootapi "github.com/containerd/containerd/api/runtime/bootstrap/v1"
	"github.com/containerd/containerd/api/types"
	runtimeoptions "github.com/containerd/containerd/api/types/runtimeoptions/v1"
	"github.com/containerd/containerd/v2/defaults"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/containerd/v2/pkg/shim"
	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"github.com/opencontainers/runtime-spec/specs-go"

	"github.com/caisson-containers/caisson/shim/config"
	"github.com/caisson-containers/caisson/shim/hooks"
	"github.com/caisson-containers/caisson/shim/pod"
	"github.com/caisson-containers/caisson/shim/podid"
	"github.com/caisson-containers/caisson/shim/virtiofs"
	"github.com/caisson-containers/caisson/shim/warm"
	"github.com/caisson-containers/caisson/version"
)

// MountCapabilities are the mount types and transforms the shim performs itself
// (docs/mounts.md), so containerd's mount manager leaves them to it.
var MountCapabilities = &types.MountCapabilities{
	Types:      []string{"erofs", "ext4"},
	Transforms: []string{"mkfs", "mkdir", "format"},
}

// allowMountsAnnotation is the same, for containerd 2.2–2.3 (which read the
// deprecated runtime-allow-mounts annotation of -info).
const allowMountsAnnotation = "containerd.io/runtime-allow-mounts"

func allowMountsValue() string {
	v := append([]string{}, MountCapabilities.Types...)
	for _, t := range MountCapabilities.Transforms {
		v = append(v, t+"/*")
	}
	return strings.Join(v, ",")
}

// New returns the shim manager for the runtime called name.
func New(name string) shim.Shim {
	return &manager{name: name}
}

type manager struct {
	name string
}

func (m *manager) Name() string { return m.name }

type bundleSpec struct {
	Version     string            `json:"ociVersion,omitempty"`
	Hooks       *specs.Hooks      `json:"hooks,omitempty"`
	Annotations map[string]string `json:"annotations,omitempty"`
}

func readBundleSpec(dir string) (*bundleSpec, error) {
	b, err := os.ReadFile(filepath.Join(dir, "config.json"))
	if err != nil {
		return nil, err
	}
	var s bundleSpec
	if err := json.Unmarshal(b, &s); err != nil {
		return nil, fmt.Errorf("decode OCI spec: %w", err)
	}
	return &s, nil
}

// configRecord is the file, in a container's bundle directory, that holds the
// configuration path the container's start named (the ConfigPath runtime option). `shim
// delete` (Stop) gets no runtime options, yet must find the pod's state under the
// state_dir of that configuration: with the default configuration instead, a pod whose
// shim died would leave its state behind whenever state_dir is not the default.
const configRecord = "caisson-config-path"

// recordConfigPath writes the ConfigPath of the runtime options in opts (an extension
// of the bootstrap parameters, as containerd >= 2.3 sends them and shim/launch passes
// the legacy start's) into dir. Without one, nothing is written: Stop then loads the
// configuration from where the task service does without one too.
func recordConfigPath(dir string, opts *bootapi.BootstrapParams) error {
	var o runtimeoptions.Options
	found, err := opts.FindExtension(&o)
	if err != nil {
		return fmt.Errorf("runtime options: %w: %w", errdefs.ErrInvalidArgument, err)
	}
	if !found || o.GetConfigPath() == "" {
		return nil
	}
	if err := os.WriteFile(filepath.Join(dir, configRecord), []byte(o.GetConfigPath()), 0o600); err != nil {
		return fmt.Errorf("record the runtime configuration path: %w", err)
	}
	return nil
}

// recordedConfigPath is the configuration path recordConfigPath wrote in dir, or "".
func recordedConfigPath(dir string) string {
	b, err := os.ReadFile(filepath.Join(dir, configRecord))
	if err != nil {
		return ""
	}
	return string(b)
}

// Start starts the shim that serves the container's pod, or returns the address
// of the one already serving it.
func (m *manager) Start(ctx context.Context, opts *bootapi.BootstrapParams) (_ *bootapi.BootstrapResult, retErr error) {
	result := &bootapi.BootstrapResult{Version: 3, Protocol: "ttrpc"}
	if err := result.AddExtension(MountCapabilities); err != nil {
		return nil, err
	}
	id := opts.GetInstanceID()
	spec, err := readBundleSpec(".")
	if err != nil {
		return nil, err
	}
	if err := recordConfigPath(".", opts); err != nil {
		return nil, err
	}
	// The pod's containers share its shim, and so its VM.
	group := podid.ID(id, spec.Annotations)
	socketDir := opts.GetSocketDir()
	if socketDir == "" {
		socketDir = filepath.Join(defaults.DefaultStateDir, "s")
	}
	address, err := shim.CreateSocketAddress(ctx, socketDir, opts.GetContainerdGrpcAddress(), group, false)
	if err != nil {
		return nil, err
	}
	// Recorded in the bundle (where containerd 1.7 also writes it), for Stop to
	// remove a dead shim's socket.
	if err := os.WriteFile(addressFile, []byte(address), 0o600); err != nil {
		return nil, err
	}
	socket, err := shim.NewSocket(address)
	if err != nil {
		if !shim.SocketEaddrinuse(err) {
			return nil, fmt.Errorf("create shim socket: %w", err)
		}
		if shim.CanConnect(address) {
			// The pod's shim is running: the container joins it.
			result.Address = address
			return result, nil
		}
		if err := shim.RemoveSocket(address); err != nil {
			return nil, fmt.Errorf("remove stale shim socket: %w", err)
		}
		if socket, err = shim.NewSocket(address); err != nil {
			return nil, fmt.Errorf("create shim socket: %w", err)
		}
	}
	defer func() {
		if retErr != nil {
			socket.Close()
			shim.RemoveSocket(address)
		}
	}()
	f, err := socket.File()
	if err != nil {
		return nil, err
	}
	defer f.Close()

	ns, err := namespaces.NamespaceRequired(ctx)
	if err != nil {
		return nil, err
	}
	self, err := os.Executable()
	if err != nil {
		return nil, err
	}
	cwd, err := os.Getwd()
	if err != nil {
		return nil, err
	}
	debug := opts.GetLogLevel() <= bootapi.LogLevel_LOG_LEVEL_DEBUG
	args := []string{"-namespace", ns, "-id", id, "-address", opts.GetContainerdGrpcAddress()}
	if debug {
		args = append(args, "-debug")
	}
	// With warm VMs (hypervisor.warm_vms), a warm shim becomes the pod's shim, and the
	// pool is filled again for the next pod. Nothing here may log: start's output is its
	// answer to containerd.
	if wp := warmPoolOf(self, recordedConfigPath("."), ns, opts.GetContainerdGrpcAddress(), debug); wp != nil {
		claimed := wp.claim(args, cwd, f)
		wp.fill()
		if claimed {
			result.Address = address
			return result, nil
		}
	}
	cmd := exec.Command(self, args...)
	cmd.Dir = cwd
	cmd.Env = append(os.Environ(), "GOMAXPROCS=2")
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	cmd.ExtraFiles = []*os.File{f}
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	defer func() {
		if retErr != nil {
			cmd.Process.Kill()
		}
	}()
	go cmd.Wait()
	if err := shim.AdjustOOMScore(cmd.Process.Pid); err != nil {
		log.G(ctx).WithError(err).Warn("cannot adjust the shim's OOM score")
	}
	result.Address = address
	return result, nil
}

// Stop is `shim delete`: containerd's cleanup for a container whose shim is
// gone (crashed or killed) or whose create failed. A VM left without its shim
// is killed and its state removed; a live shim's VM is left alone.
func (m *manager) Stop(ctx context.Context, id string) (shim.StopStatus, error) {
	status := shim.StopStatus{ExitedAt: time.Now(), ExitStatus: 128 + int(syscall.SIGKILL)}
	cwd, err := os.Getwd()
	if err != nil {
		return status, err
	}
	ns, err := namespaces.NamespaceRequired(ctx)
	if err != nil {
		return status, err
	}
	defer removeDeadSocket(ctx, filepath.Join(cwd, addressFile))
	var annotations map[string]string
	spec, err := readBundleSpec(cwd)
	if err == nil {
		annotations = spec.Annotations
	}
	// The pod under the configuration the container started with: its state_dir is
	// where the pod's state is.
	p, err := podid.Of(ns, id, annotations, recordedConfigPath(cwd))
	if err != nil {
		// Cleanup must not fail on a config that became invalid; use the default state dir.
		log.G(ctx).WithError(err).Warn("cleanup with the default configuration")
		p = podid.WithConfig(ns, id, annotations, config.Default(config.DefaultArtifactsDir()))
	} else {
		log.G(ctx).WithField("config", p.ConfigFile).Debug("cleanup configuration")
	}
	stateDir := p.StateDir
	if _, err := os.Stat(stateDir); err != nil {
		return status, nil
	}
	// A pod that started in a warm VM has the VM's state apart from its own.
	warmDir := ""
	if b, err := os.ReadFile(filepath.Join(stateDir, pod.WarmFile)); err == nil &&
		strings.HasPrefix(string(b), filepath.Join(p.Config.StateDir, warm.Dir)+"/") {
		warmDir = string(b)
	}
	// A live shim still owns its pod (this is cleanup after a failed create): leave it.
	// Whether it lives is read from the processes, not from the shim's socket, which a
	// dead shim's children may still hold open.
	vms := vmProcesses(stateDir)
	if warmDir != "" {
		vms = append(vms, vmProcesses(warmDir)...)
	}
	for _, pid := range vms {
		if parentIsShim(pid) {
			return status, nil
		}
	}
	for _, pid := range vms {
		log.G(ctx).WithField("pid", pid).Warn("killing the VM of a dead shim")
		syscall.Kill(pid, syscall.SIGKILL)
	}
	// The VM's cgroup, whichever it was (its path is recorded in the pod's state), once
	// the VM has gone: its processes must have left it.
	waitGone(vms, 5*time.Second)
	if err := pod.RemoveCgroup(ctx, stateDir); err != nil {
		log.G(ctx).WithError(err).Warn("removing the pod cgroup of a dead shim")
	}
	// A warm VM's own, if its shim died before it moved the VM into the pod's.
	if warmDir != "" {
		if err := pod.RemoveCgroup(ctx, warmDir); err != nil {
			log.G(ctx).WithError(err).Warn("removing the warm VM cgroup of a dead shim")
		}
	}
	// The dead shim's poststop hooks did not run (nerdctl's network teardown, say): run
	// them, as runc's delete does for a container whose runtime died.
	if spec != nil {
		runPoststop(ctx, id, cwd, spec)
	}
	// A share of a host path (a volume) under the state directory must go before the
	// directory: removing through it would delete the volume's data.
	if err := virtiofs.Unmount(filepath.Join(stateDir, pod.SharedDirName)); err != nil {
		return status, fmt.Errorf("pod state %s left in place: %w", stateDir, err)
	}
	if warmDir != "" {
		if err := warm.RemoveSlot(warmDir); err != nil {
			log.G(ctx).WithError(err).Warn("removing the warm VM state of a dead shim")
		}
	}
	if err := os.RemoveAll(stateDir); err != nil {
		return status, fmt.Errorf("remove pod state %s: %w", stateDir, err)
	}
	log.G(ctx).WithField("state", stateDir).Info("cleaned up after a dead shim")
	return status, nil
}

// addressFile, in a container's bundle, holds the address of its pod's shim.
const addressFile = "address"

// removeDeadSocket removes the socket named in file if no shim listens on it any
// more: a shim killed with SIGKILL could not remove it itself.
func removeDeadSocket(ctx context.Context, file string) {
	address, err := shim.ReadAddress(file)
	if err != nil || shim.CanConnect(address) {
		return
	}
	if err := shim.RemoveSocket(address); err != nil {
		log.G(ctx).WithError(err).WithField("address", address).Warn("removing a dead shim's socket")
	}
}

// runPoststop runs the poststop hooks of the container whose bundle is bundle.
func runPoststop(ctx context.Context, id, bundle string, s *bundleSpec) {
	hs := hooks.Of(s.Hooks, hooks.Poststop)
	if len(hs) == 0 {
		return
	}
	st := specs.State{Version: s.Version, ID: id, Status: specs.StateStopped, Bundle: bundle, Annotations: s.Annotations}
	if err := hooks.RunAll(ctx, hooks.Poststop, hs, st); err != nil {
		log.G(ctx).WithError(err).Warn("poststop hook of a dead shim's container failed")
	}
}

// vmProcesses are the QEMU processes whose command line names stateDir.
func vmProcesses(stateDir string) []int {
	var pids []int
	entries, _ := os.ReadDir("/proc")
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		b, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err == nil && strings.Contains(string(b), stateDir+"/") && strings.Contains(string(b), "qemu") {
			pids = append(pids, pid)
		}
	}
	return pids
}

// parentIsShim reports whether pid's parent is a running Caisson shim.
func parentIsShim(pid int) bool {
	stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return false
	}
	// pid (comm) state ppid ...: comm may hold spaces, so parse after the last ')'.
	fields := strings.Fields(string(stat[strings.LastIndexByte(string(stat), ')')+1:]))
	if len(fields) < 2 {
		return false
	}
	exe, err := os.Readlink(fmt.Sprintf("/proc/%s/exe", fields[1]))
	return err == nil && filepath.Base(strings.TrimSuffix(exe, " (deleted)")) == "containerd-shim-caisson-v2"
}

// Info describes the runtime to containerd (`-info`).
func (m *manager) Info(ctx context.Context, optionsR io.Reader) (*types.RuntimeInfo, error) {
	feat, err := marshalFeatures()
	if err != nil {
		return nil, err
	}
	return &types.RuntimeInfo{
		Name:        m.name,
		Version:     &types.RuntimeVersion{Version: version.Version, Revision: version.Revision},
		Annotations: map[string]string{allowMountsAnnotation: allowMountsValue()},
		Features:    feat,
	}, nil
}

// waitGone waits, at most timeout, for the processes to exit.
func waitGone(pids []int, timeout time.Duration) {
	deadline := time.Now().Add(timeout)
	for _, pid := range pids {
		for time.Now().Before(deadline) && syscall.Kill(pid, 0) == nil {
			time.Sleep(20 * time.Millisecond)
		}
	}
}
