package harness

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	runtime "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/caisson-containers/caisson/shim/pod"
)

// Handler is the CRI runtime handler of Caisson in contrib/containerd/config.toml.
const Handler = "caisson"

// RuncHandler is containerd's default runc handler, for comparisons.
const RuncHandler = "runc"

// CRI is a containerd with its CRI plugin, talked to as the kubelet does (k8s.io/cri-api
// over gRPC), with pods networked by a CNI bridge and images served by a registry on
// 127.0.0.1 that the test built them into.
type CRI struct {
	*Env
	Runtime  runtime.RuntimeServiceClient
	Images   runtime.ImageServiceClient
	CNI      *CNI
	Registry *Registry
	// PauseRef is the sandbox image named in containerd's config: busybox running sleep.
	PauseRef string
	// BusyboxRef is the test busybox image in the registry (not pulled yet).
	BusyboxRef string
	// LogDir holds the pods' log directories.
	LogDir string
}

// StartCRI starts the registry, the CNI network and containerd with its CRI plugin.
// Cleanup removes every pod still there (so a failing test leaves nothing) before the
// environment's own leftover checks.
func StartCRI(t testing.TB, o Options) *CRI {
	t.Helper()
	reg := StartRegistry(t)
	c := &CRI{Registry: reg}
	c.PauseRef = reg.Push(t, "caisson-test/pause:1", BusyboxImage(t, "sleep", "2147483647"))
	c.BusyboxRef = reg.Push(t, "caisson-test/busybox:1", BusyboxImage(t, "sh"))
	dir := t.TempDir()
	c.CNI = NewCNI(t, dir)
	c.LogDir = filepath.Join(dir, "logs")
	adjust := o.ContainerdConfig
	o.CRI = true
	o.ContainerdConfig = func(cfg map[string]any) {
		plugins := cfg["plugins"].(map[string]any)
		var rt map[string]any
		if cfg["version"] == int64(2) {
			// Configuration schema 2 (containerd 1.7's): one CRI plugin.
			rt = subMap(plugins, "io.containerd.grpc.v1.cri")
			rt["sandbox_image"] = c.PauseRef
		} else {
			images := subMap(plugins, "io.containerd.cri.v1.images")
			subMap(images, "pinned_images")["sandbox"] = c.PauseRef
			rt = subMap(plugins, "io.containerd.cri.v1.runtime")
		}
		// This sandbox lacks CAP_SYS_RESOURCE: runc cannot lower oom_score_adj.
		rt["restrict_oom_score_adj"] = true
		// Network namespaces under containerd's state, where leftover checks look.
		rt["netns_mounts_under_state_dir"] = true
		cni := map[string]any{"conf_dir": c.CNI.ConfDir, "max_conf_num": 1}
		if o.Containerd != nil && o.Containerd.Older(2, 2) {
			cni["bin_dir"] = c.CNI.BinDir // bin_dirs came in 2.2 (and bin_dir went in 2.3)
		} else {
			cni["bin_dirs"] = []string{c.CNI.BinDir}
		}
		rt["cni"] = cni
		if adjust != nil {
			adjust(cfg)
		}
	}
	c.Env = Start(t, o)
	conn, err := grpc.NewClient("unix://"+c.Address, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	c.Runtime = runtime.NewRuntimeServiceClient(conn)
	c.Images = runtime.NewImageServiceClient(conn)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	for {
		st, err := c.Runtime.Status(ctx, &runtime.StatusRequest{})
		if err == nil && networkReady(st) {
			break
		}
		select {
		case <-ctx.Done():
			t.Fatalf("CRI not ready with its network within a minute: %v %v", st, err)
		case <-time.After(100 * time.Millisecond):
		}
	}
	t.Cleanup(func() { c.removeAllPods(t) })
	return c
}

func networkReady(st *runtime.StatusResponse) bool {
	for _, c := range st.GetStatus().GetConditions() {
		if c.Type == runtime.NetworkReady {
			return c.Status
		}
	}
	return false
}

func subMap(m map[string]any, key string) map[string]any {
	if v, ok := m[key].(map[string]any); ok {
		return v
	}
	v := map[string]any{}
	m[key] = v
	return v
}

// Ctx is a context for CRI calls that ends with the test.
func (c *CRI) Ctx(t testing.TB) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	t.Cleanup(cancel)
	return ctx
}

// Pull pulls ref through the CRI for the handler (so into its snapshotter).
func (c *CRI) Pull(t testing.TB, ref, handler string) string {
	t.Helper()
	resp, err := c.Images.PullImage(c.Ctx(t), &runtime.PullImageRequest{
		Image:         &runtime.ImageSpec{Image: ref, RuntimeHandler: handler},
		SandboxConfig: c.PodConfig("pull", nil),
	})
	if err != nil {
		t.Fatalf("pull %s for %s: %v", ref, handler, err)
	}
	return resp.ImageRef
}

// PodConfig is a pod named name, with its own log directory.
func (c *CRI) PodConfig(name string, adjust func(*runtime.PodSandboxConfig)) *runtime.PodSandboxConfig {
	cfg := &runtime.PodSandboxConfig{
		Metadata:     &runtime.PodSandboxMetadata{Name: name, Uid: "uid-" + name, Namespace: "caisson-test"},
		Hostname:     name,
		LogDirectory: filepath.Join(c.LogDir, name),
		Labels:       map[string]string{"caisson-test": "1"},
		Linux:        &runtime.LinuxPodSandboxConfig{},
	}
	if adjust != nil {
		adjust(cfg)
	}
	return cfg
}

// RunPod runs a pod sandbox with the handler.
func (c *CRI) RunPod(t testing.TB, cfg *runtime.PodSandboxConfig, handler string) string {
	t.Helper()
	if err := os.MkdirAll(cfg.LogDirectory, 0o755); err != nil {
		t.Fatal(err)
	}
	resp, err := c.Runtime.RunPodSandbox(c.Ctx(t), &runtime.RunPodSandboxRequest{Config: cfg, RuntimeHandler: handler})
	if err != nil {
		t.Fatalf("RunPodSandbox %s (%s): %v", cfg.Metadata.Name, handler, err)
	}
	return resp.PodSandboxId
}

// ContainerConfig is a container of the image running cmd, logging to name.log.
func ContainerConfig(name, image string, cmd ...string) *runtime.ContainerConfig {
	return &runtime.ContainerConfig{
		Metadata: &runtime.ContainerMetadata{Name: name},
		Image:    &runtime.ImageSpec{Image: image},
		Command:  cmd,
		LogPath:  name + ".log",
		Linux:    &runtime.LinuxContainerConfig{},
	}
}

// CreateContainer creates a container in the pod.
func (c *CRI) CreateContainer(ctx context.Context, pod string, podCfg *runtime.PodSandboxConfig, cfg *runtime.ContainerConfig) (string, error) {
	resp, err := c.Runtime.CreateContainer(ctx, &runtime.CreateContainerRequest{PodSandboxId: pod, Config: cfg, SandboxConfig: podCfg})
	if err != nil {
		return "", err
	}
	return resp.ContainerId, nil
}

// StartContainer creates and starts a container in the pod.
func (c *CRI) StartContainer(t testing.TB, pod string, podCfg *runtime.PodSandboxConfig, cfg *runtime.ContainerConfig) string {
	t.Helper()
	ctx := c.Ctx(t)
	id, err := c.CreateContainer(ctx, pod, podCfg, cfg)
	if err != nil {
		t.Fatalf("CreateContainer %s: %v", cfg.Metadata.Name, err)
	}
	if _, err := c.Runtime.StartContainer(ctx, &runtime.StartContainerRequest{ContainerId: id}); err != nil {
		t.Fatalf("StartContainer %s: %v", cfg.Metadata.Name, err)
	}
	return id
}

// Exec runs cmd in the container and returns its stdout, stderr and exit code.
func (c *CRI) Exec(t testing.TB, id string, cmd ...string) (string, string, int32) {
	t.Helper()
	resp, err := c.Runtime.ExecSync(c.Ctx(t), &runtime.ExecSyncRequest{ContainerId: id, Cmd: cmd, Timeout: 60})
	if err != nil {
		t.Fatalf("ExecSync %v in %s: %v", cmd, id, err)
	}
	return string(resp.Stdout), string(resp.Stderr), resp.ExitCode
}

// PodIP is the pod's IPv4 address as the CRI reports it.
func (c *CRI) PodIP(t testing.TB, pod string) string {
	t.Helper()
	st, err := c.Runtime.PodSandboxStatus(c.Ctx(t), &runtime.PodSandboxStatusRequest{PodSandboxId: pod})
	if err != nil {
		t.Fatal(err)
	}
	ip := st.GetStatus().GetNetwork().GetIp()
	if ip == "" {
		t.Fatalf("pod %s has no IP: %v", pod, st.GetStatus())
	}
	return ip
}

// RemovePod stops and removes the pod, and with it its containers.
func (c *CRI) RemovePod(t testing.TB, pod string) {
	t.Helper()
	ctx := c.Ctx(t)
	if _, err := c.Runtime.StopPodSandbox(ctx, &runtime.StopPodSandboxRequest{PodSandboxId: pod}); err != nil {
		t.Errorf("StopPodSandbox %s: %v", pod, err)
	}
	if _, err := c.Runtime.RemovePodSandbox(ctx, &runtime.RemovePodSandboxRequest{PodSandboxId: pod}); err != nil {
		t.Errorf("RemovePodSandbox %s: %v", pod, err)
	}
}

func (c *CRI) removeAllPods(t testing.TB) {
	if t.Failed() {
		c.keepConsoles(t)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	resp, err := c.Runtime.ListPodSandbox(ctx, &runtime.ListPodSandboxRequest{})
	if err != nil {
		t.Errorf("list pods: %v", err)
		return
	}
	for _, p := range resp.Items {
		c.Runtime.StopPodSandbox(ctx, &runtime.StopPodSandboxRequest{PodSandboxId: p.Id})
		c.Runtime.RemovePodSandbox(ctx, &runtime.RemovePodSandboxRequest{PodSandboxId: p.Id})
	}
}

// keepConsoles keeps the guest console of every pod VM still running in a failed test
// (the agent's log, and the kernel's if the guest boots verbose) with the daemons' logs
// (CAISSON_TEST_LOGS): removing the pods removes them.
func (c *CRI) keepConsoles(t testing.TB) {
	consoles, _ := filepath.Glob(filepath.Join(c.StateDir, "*", "console.log"))
	for _, f := range consoles {
		if b, err := os.ReadFile(f); err == nil {
			keepLog(t, "console-"+filepath.Base(filepath.Dir(f)), b)
		}
	}
}

// Leftovers lists what pods that were removed left on the host: QEMU processes,
// mounts and loop devices of this environment, pod VM state directories, network
// namespaces and veths on the test bridge. A shim still stopping its VM (containerd asks it to shut down
// after RemovePodSandbox returns) has LeftoverGrace to finish.
func (c *CRI) Leftovers() []string {
	deadline := time.Now().Add(LeftoverGrace)
	for {
		left := c.leftovers()
		if len(left) == 0 || time.Now().After(deadline) {
			return left
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func (c *CRI) leftovers() []string {
	// QEMU processes, mounts and loop devices, as the environment's own check finds them.
	left := leftovers(c.hostMounts, c.Dir, c.StateDir)
	dirs, _ := os.ReadDir(c.StateDir)
	for _, d := range dirs {
		// The accelerator probes and the VM templates are caches that outlive pods.
		if d.Name() != "probes" && d.Name() != pod.TemplatesDir {
			left = append(left, "pod state dir "+filepath.Join(c.StateDir, d.Name()))
		}
	}
	ns, _ := os.ReadDir(filepath.Join(c.Dir, "state", "io.containerd.grpc.v1.cri", "netns"))
	for _, n := range ns {
		left = append(left, "network namespace "+n.Name())
	}
	for _, v := range c.CNI.Veths() {
		left = append(left, "veth on the bridge "+v)
	}
	// Warm VMs' own cgroups (cgroup v2's tree, or any v1 hierarchy).
	for _, pattern := range []string{"/sys/fs/cgroup", "/sys/fs/cgroup/*"} {
		cgs, _ := filepath.Glob(filepath.Join(pattern, pod.DefaultCgroupParent, "warm-*"))
		for _, cg := range cgs {
			left = append(left, "warm VM cgroup "+cg)
		}
	}
	return left
}

// String names the environment in failures.
func (c *CRI) String() string { return fmt.Sprintf("containerd at %s", c.Address) }

// CgroupParent creates a pod cgroup on the host, as the kubelet does before
// RunPodSandbox, in every cgroup v1 hierarchy (or the v2 tree), and removes it when
// the test ends. containerd's PodSandboxStats reads it.
func CgroupParent(t testing.TB, name string) string {
	t.Helper()
	parent := "/caisson-test-" + name
	var dirs []string
	if _, err := os.Stat("/sys/fs/cgroup/cgroup.controllers"); err == nil {
		dirs = []string{filepath.Join("/sys/fs/cgroup", parent)}
	} else {
		hs, _ := os.ReadDir("/sys/fs/cgroup")
		for _, h := range hs {
			if h.IsDir() {
				dirs = append(dirs, filepath.Join("/sys/fs/cgroup", h.Name(), parent))
			}
		}
	}
	for _, d := range dirs {
		if err := os.Mkdir(d, 0o755); err != nil && !os.IsExist(err) {
			t.Fatalf("pod cgroup: %v", err)
		}
		t.Cleanup(func() {
			if err := os.Remove(d); err != nil && !os.IsNotExist(err) {
				t.Errorf("remove pod cgroup: %v", err)
			}
		})
	}
	return parent
}
