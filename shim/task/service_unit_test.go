package task

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"

	taskAPI "github.com/containerd/containerd/api/runtime/task/v3"
	"github.com/containerd/containerd/api/types"
	runtimeoptions "github.com/containerd/containerd/api/types/runtimeoptions/v1"
	"github.com/containerd/containerd/api/types/task"
	"github.com/containerd/containerd/v2/core/containers"
	"github.com/containerd/containerd/v2/core/events"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/containerd/v2/pkg/oci"
	"github.com/containerd/containerd/v2/pkg/shutdown"
	"github.com/containerd/errdefs"
	"github.com/containerd/errdefs/pkg/errgrpc"
	"github.com/containerd/typeurl/v2"
	"github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"
	"google.golang.org/protobuf/types/known/anypb"

	"github.com/caisson-containers/caisson/internal/testutil"
	"github.com/caisson-containers/caisson/shim/config"
	"github.com/caisson-containers/caisson/shim/internal/fakevm"
	"github.com/caisson-containers/caisson/shim/pod"
	"github.com/caisson-containers/caisson/shim/podid"
	"github.com/caisson-containers/caisson/shim/vmm"
)

// These tests drive the task service's ttrpc methods against a fake VMM and a fake agent
// (shim/internal/fakevm): no QEMU, no root. They check what the service does to the VM
// (disks attached and detached, the VM started and stopped) and asks of the agent, and
// that a create that fails at any step leaves nothing behind.

const testNS = "test"

// harness is one shim's task service on a fake VMM.
type harness struct {
	t         *testing.T
	ctx       context.Context
	s         *service
	hv        *fakevm.Hypervisor
	sd        shutdown.Service
	pub       *publisher
	dir       string // bundles, layers and images
	stateRoot string // the configuration's state_dir
	options   *anypb.Any
	layer     string // the image's one layer, shared by the containers
}

func newHarness(t *testing.T) *harness { return newHarnessWith(t, "") }

// newHarnessWith is newHarness with more settings of the configuration's [hypervisor]
// table.
func newHarnessWith(t *testing.T, hypervisor string) *harness {
	t.Helper()
	return newHarnessWithTables(t, "", hypervisor)
}

// newHarnessWithTables is newHarness with more settings of the configuration's [guest]
// and [hypervisor] tables.
func newHarnessWithTables(t *testing.T, guest, hypervisor string) *harness {
	t.Helper()
	root := testutil.ShortTempDir(t) // state_dir is bounded (sockets)
	h := &harness{t: t, hv: fakevm.New(), pub: &publisher{published: make(chan struct{}), closed: make(chan struct{})}, dir: t.TempDir(), stateRoot: filepath.Join(root, "state")}
	// No virtiofsd (copied mounts), no template: what a fake VMM runs without root.
	cfgPath := filepath.Join(h.dir, "caisson.toml")
	cfgText := fmt.Sprintf("state_dir = %q\n[guest]\nshared_fs = \"copy\"\n%s\n[hypervisor]\ntemplate = false\n%s\n", h.stateRoot, guest, hypervisor)
	if err := os.WriteFile(cfgPath, []byte(cfgText), 0o600); err != nil {
		t.Fatal(err)
	}
	var err error
	if h.options, err = typeurl.MarshalAnyToProto(&runtimeoptions.Options{ConfigPath: cfgPath}); err != nil {
		t.Fatal(err)
	}
	h.layer = h.file("layer.erofs")

	ctx, cancel := context.WithCancel(namespaces.WithNamespace(context.Background(), testNS))
	ctx, h.sd = shutdown.WithShutdown(ctx)
	h.ctx = ctx
	svc, err := NewTaskService(ctx, h.pub, h.sd)
	if err != nil {
		t.Fatal(err)
	}
	h.s = svc.(*service)
	h.s.hypervisor = func(cfg config.Config) (vmm.Hypervisor, error) {
		if cfg.StateDir != h.stateRoot {
			return nil, fmt.Errorf("the pod's configuration has state_dir %s, not the runtime options' %s", cfg.StateDir, h.stateRoot)
		}
		return h.hv, nil
	}
	h.s.newCgroup = pod.NoCgroup
	t.Cleanup(func() {
		h.stop()
		cancel()
		for i, vm := range h.hv.VMs() {
			if vm.Running() {
				t.Errorf("VM %d still runs after the shim's shutdown", i)
				vm.Stop(context.Background())
			}
		}
	})
	return h
}

// file makes an empty file in the harness's directory.
func (h *harness) file(name string) string {
	h.t.Helper()
	p := filepath.Join(h.dir, name)
	if err := os.WriteFile(p, nil, 0o600); err != nil {
		h.t.Fatal(err)
	}
	return p
}

// createRequest is container id's create, with a bundle whose spec containerd's defaults
// make (oci.GenerateSpec) with annotations, and a rootfs of the shared layer and an
// image of its own (rw), in the snapshotter's template form (docs/mounts.md, shape A).
// The image exists already, as after the mount manager formatted it.
func (h *harness) createRequest(id string, annotations map[string]string) (*taskAPI.CreateTaskRequest, string) {
	h.t.Helper()
	return h.createRequestOn(id, annotations, h.layer)
}

// createRequestOn is createRequest with the rootfs on layer, and opts applied to the spec.
func (h *harness) createRequestOn(id string, annotations map[string]string, layer string, opts ...oci.SpecOpts) (*taskAPI.CreateTaskRequest, string) {
	h.t.Helper()
	bundle := filepath.Join(h.dir, id)
	if err := os.MkdirAll(bundle, 0o700); err != nil {
		h.t.Fatal(err)
	}
	spec, err := oci.GenerateSpec(h.ctx, nil, &containers.Container{ID: id}, append([]oci.SpecOpts{oci.WithAnnotations(annotations)}, opts...)...)
	if err != nil {
		h.t.Fatal(err)
	}
	b, err := json.Marshal(spec)
	if err != nil {
		h.t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(bundle, "config.json"), b, 0o600); err != nil {
		h.t.Fatal(err)
	}
	rw := h.file(id + "-rw.ext4")
	return &taskAPI.CreateTaskRequest{
		ID: id, Bundle: bundle, Options: h.options,
		Rootfs: []*types.Mount{
			{Type: "mkfs/ext4", Source: rw, Options: []string{"X-containerd.mkfs.fs=ext4", "X-containerd.mkfs.size=67108864", "rw", "loop"}},
			{Type: "erofs", Source: layer, Options: []string{"ro", "loop"}},
			{Type: "format/mkdir/overlay", Source: "overlay", Options: []string{
				"X-containerd.mkdir.path={{ mount 0 }}/upper:0755", "X-containerd.mkdir.path={{ mount 0 }}/work:0755",
				"upperdir={{ mount 0 }}/upper", "workdir={{ mount 0 }}/work", "lowerdir={{ mount 1 }}"}},
		},
	}, rw
}

// CRI annotations of a pod's sandbox and of its other containers.
func sandboxAnnotations(pod string) map[string]string {
	return map[string]string{"io.kubernetes.cri.container-type": "sandbox", "io.kubernetes.cri.sandbox-id": pod}
}

func containerAnnotations(pod string) map[string]string {
	return map[string]string{"io.kubernetes.cri.container-type": "container", "io.kubernetes.cri.sandbox-id": pod}
}

// podStateDir is where a pod of the harness's configuration keeps its state.
func (h *harness) podStateDir(podID string) string {
	return podid.StateDir(h.stateRoot, testNS, podID)
}

// vm is the harness's one VM.
func (h *harness) vm() *fakevm.VM {
	h.t.Helper()
	vms := h.hv.VMs()
	if len(vms) != 1 {
		h.t.Fatalf("%d VMs, want 1", len(vms))
	}
	return vms[0]
}

// attached returns the host files of the disks attached to vm.
func attached(vm *fakevm.VM) []string {
	var paths []string
	for _, d := range vm.Disks() {
		paths = append(paths, d.Path)
	}
	slices.Sort(paths)
	return paths
}

func sorted(s ...string) []string {
	s = slices.Clone(s)
	slices.Sort(s)
	return s
}

func (h *harness) mustCreate(r *taskAPI.CreateTaskRequest) *taskAPI.CreateTaskResponse {
	h.t.Helper()
	resp, err := h.s.Create(h.ctx, r)
	if err != nil {
		h.t.Fatalf("Create %s: %v", r.ID, err)
	}
	return resp
}

func (h *harness) mustStart(id, execID string) {
	h.t.Helper()
	if _, err := h.s.Start(h.ctx, &taskAPI.StartRequest{ID: id, ExecID: execID}); err != nil {
		h.t.Fatalf("Start %s %s: %v", id, execID, err)
	}
}

func (h *harness) status(id, execID string) task.Status {
	h.t.Helper()
	st, err := h.s.State(h.ctx, &taskAPI.StateRequest{ID: id, ExecID: execID})
	if err != nil {
		h.t.Fatalf("State %s %s: %v", id, execID, err)
	}
	return st.Status
}

// wait is containerd's Wait: it returns once the process has exited.
func (h *harness) wait(id, execID string) uint32 {
	h.t.Helper()
	r, err := h.s.Wait(h.ctx, &taskAPI.WaitRequest{ID: id, ExecID: execID})
	if err != nil {
		h.t.Fatalf("Wait %s %s: %v", id, execID, err)
	}
	return r.ExitStatus
}

// isGone checks that the service and the agent know nothing of container id.
func (h *harness) isGone(id string) {
	h.t.Helper()
	if _, err := h.s.State(h.ctx, &taskAPI.StateRequest{ID: id}); !errdefs.IsNotFound(errgrpc.ToNative(err)) {
		h.t.Errorf("State of %s: %v, want NotFound", id, err)
	}
	if slices.Contains(h.hv.Agent.Containers(), id) {
		h.t.Errorf("container %s is still in the guest", id)
	}
}

// publisher records the events the service publishes.
type publisher struct {
	mu        sync.Mutex
	events    []any
	published chan struct{} // closed and replaced at each event
	closed    chan struct{} // by Close, once the service has published its last event
}

func (p *publisher) Publish(ctx context.Context, topic string, e events.Event) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.events = append(p.events, e)
	close(p.published)
	p.published = make(chan struct{})
	return nil
}

// waitFor returns once an event of type typ for container id was published.
func (p *publisher) waitFor(id, typ string) {
	for {
		p.mu.Lock()
		next := p.published
		p.mu.Unlock()
		if slices.Contains(p.topics(id), typ) {
			return
		}
		<-next
	}
}

func (p *publisher) Close() error {
	close(p.closed)
	return nil
}

// topics returns the events' types published for container id, in order.
func (p *publisher) topics(id string) []string {
	p.mu.Lock()
	defer p.mu.Unlock()
	var ts []string
	for _, e := range p.events {
		v := any(e)
		if c, ok := v.(interface{ GetContainerID() string }); ok && c.GetContainerID() == id {
			ts = append(ts, fmt.Sprintf("%T", e))
		}
	}
	return ts
}

// The first container starts the pod's VM with its rootfs on the boot disks; start, exec,
// kill, wait and delete go to the agent; deleting it releases its disks; the shim's
// shutdown stops the VM and removes the pod's state.
func TestLifecycleOnFakeVM(t *testing.T) {
	h := newHarness(t)
	r, rw := h.createRequest("c1", nil)
	resp := h.mustCreate(r)

	vm := h.vm()
	if resp.Pid == 0 || int(resp.Pid) != vm.Pid() {
		t.Errorf("Create's pid %d, want the VMM's %d (taskPid)", resp.Pid, vm.Pid())
	}
	var booted []string
	for _, d := range vm.Config().Disks {
		booted = append(booted, d.Path)
	}
	if !slices.Contains(booted, h.layer) || !slices.Contains(booted, rw) {
		t.Errorf("the VM booted with %v, want the container's layer and image", booted)
	}
	if ev := vm.Events(); !slices.Equal(ev, []fakevm.Event{"start"}) {
		t.Errorf("VM events %q, want a start and no hot-plug", ev)
	}
	if sb := h.hv.Agent.Sandbox(); sb.GetSandboxId() != "c1" {
		t.Errorf("sandbox %v, want the lone container's own pod c1", sb)
	}
	if _, err := os.Stat(h.podStateDir("c1")); err != nil {
		t.Errorf("pod state: %v", err)
	}
	if got := h.status("c1", ""); got != task.Status_CREATED {
		t.Errorf("status after Create %s", got)
	}

	h.mustStart("c1", "")
	if got := h.status("c1", ""); got != task.Status_RUNNING {
		t.Errorf("status after Start %s", got)
	}

	// An exec, which exits on its own.
	spec, _ := json.Marshal(specs.Process{Args: []string{"true"}, Cwd: "/"})
	if _, err := h.s.Exec(h.ctx, &taskAPI.ExecProcessRequest{ID: "c1", ExecID: "e1", Spec: &anypb.Any{TypeUrl: "types.containerd.io/opencontainers/runtime-spec/1/Process", Value: spec}}); err != nil {
		t.Fatal(err)
	}
	h.mustStart("c1", "e1")
	if err := h.hv.Agent.Exit("c1", "e1", 7); err != nil {
		t.Fatal(err)
	}
	if code := h.wait("c1", "e1"); code != 7 {
		t.Errorf("exec's exit %d, want 7", code)
	}
	if _, err := h.s.Delete(h.ctx, &taskAPI.DeleteRequest{ID: "c1", ExecID: "e1"}); err != nil {
		t.Fatal(err)
	}

	// A running container is not deleted.
	if _, err := h.s.Delete(h.ctx, &taskAPI.DeleteRequest{ID: "c1"}); !errdefs.IsFailedPrecondition(errgrpc.ToNative(err)) {
		t.Errorf("Delete of a running container: %v, want FailedPrecondition", err)
	}
	if _, err := h.s.Kill(h.ctx, &taskAPI.KillRequest{ID: "c1", Signal: uint32(unix.SIGTERM)}); err != nil {
		t.Fatal(err)
	}
	if code := h.wait("c1", ""); code != 128+uint32(unix.SIGTERM) {
		t.Errorf("exit after SIGTERM %d, want %d", code, 128+unix.SIGTERM)
	}
	del, err := h.s.Delete(h.ctx, &taskAPI.DeleteRequest{ID: "c1"})
	if err != nil {
		t.Fatal(err)
	}
	if del.ExitStatus != 128+uint32(unix.SIGTERM) {
		t.Errorf("Delete's exit status %d", del.ExitStatus)
	}
	h.isGone("c1")

	want := []string{"Sandbox.Create c1", "Containers.Create c1", "Containers.Start c1", "Exec.Create c1/e1", "Exec.Start c1/e1", "Exec.Delete c1/e1",
		"Containers.Signal c1", "Containers.Delete c1"}
	var got []string
	for _, c := range h.hv.Agent.Calls() {
		if c.ID == "c1" && c.Method != "Containers.Wait" {
			got = append(got, c.String())
		}
	}
	if !slices.Equal(got, want) {
		t.Errorf("the agent's calls about c1:\n got %q\nwant %q", got, want)
	}
	// Its disks are released: unmounted in the guest, then detached.
	if st := h.hv.Agent.Storages(); len(st) != 0 {
		t.Errorf("storages still mounted after Delete: %v", st)
	}
	if d := attached(vm); len(d) != 0 {
		t.Errorf("disks still attached after Delete: %v", d)
	}
	wantEvents := []string{"*events.TaskCreate", "*events.TaskStart", "*events.TaskExecAdded", "*events.TaskExecStarted",
		"*events.TaskExit", "*events.TaskExit", "*events.TaskDelete"}
	h.shutdown()
	if got := h.pub.topics("c1"); !slices.Equal(got, wantEvents) {
		t.Errorf("events:\n got %q\nwant %q", got, wantEvents)
	}
	if !vm.Stopped() {
		t.Error("the VM was not stopped at the shim's shutdown")
	}
	if _, err := os.Stat(h.podStateDir("c1")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("pod state after shutdown: %v", err)
	}
}

// shutdown is containerd's Shutdown once the pod's last container is deleted: the shim
// ends (its pod with it), after it has published its events. Call it only once every
// container is deleted: otherwise the shim rightly goes on, and this waits for ever.
func (h *harness) shutdown() {
	h.t.Helper()
	if _, err := h.s.Shutdown(h.ctx, &taskAPI.ShutdownRequest{}); err != nil {
		h.t.Fatal(err)
	}
	<-h.sd.Done()
	<-h.pub.closed
}

// stop ends the shim as containerd does when it kills it, containers or not: the pod
// goes with it, the events are all published.
func (h *harness) stop() {
	h.sd.Shutdown()
	<-h.sd.Done()
	<-h.pub.closed
}

// A pod's later containers join its VM: the layer they share stays attached once, only
// their own images are hot-plugged, and deleting one releases only what it alone used.
// The pause container writes to a tmpfs in the guest: its writable image is not
// attached.
func TestLaterContainersJoinThePod(t *testing.T) {
	h := newHarness(t)
	sbReq, _ := h.createRequest("sb", sandboxAnnotations("pod1"))
	h.mustCreate(sbReq)
	h.mustStart("sb", "")
	vm := h.vm()
	c1Req, c1RW := h.createRequest("c1", containerAnnotations("pod1"))
	h.mustCreate(c1Req)
	c2Req, c2RW := h.createRequest("c2", containerAnnotations("pod1"))
	h.mustCreate(c2Req)

	if n := len(h.hv.VMs()); n != 1 {
		t.Fatalf("%d VMs for one pod", n)
	}
	if sb := h.hv.Agent.Sandbox(); sb.GetSandboxId() != "pod1" {
		t.Errorf("sandbox %v, want pod1", sb)
	}
	if got, want := attached(vm), sorted(h.layer, c1RW, c2RW); !slices.Equal(got, want) {
		t.Errorf("attached %v, want %v", got, want)
	}
	if r := h.hv.Agent.Container("sb").GetRootfs(); !r.GetTmpfsUpper() || r.GetUpper() != nil || r.GetWork() != nil || len(r.GetLower()) != 1 {
		t.Errorf("the pause container's rootfs %v: want its layer under a tmpfs upper", r)
	}
	if r := h.hv.Agent.Container("c1").GetRootfs(); r.GetTmpfsUpper() || r.GetUpper() == nil {
		t.Errorf("c1's rootfs %v: want its writable image as upper", r)
	}
	var hotplugged int
	for _, e := range vm.Events() {
		if len(e) > 7 && e[:7] == "attach " {
			hotplugged++
		}
	}
	if hotplugged != 2 {
		t.Errorf("VM events %q: want the two later containers' images hot-plugged, and only them", vm.Events())
	}
	// Both later containers' rootfs are on the layer the sandbox's is on.
	lower := h.hv.Agent.Container("sb").GetRootfs().GetLower()[0].GetStorageId()
	for _, id := range []string{"c1", "c2"} {
		if l := h.hv.Agent.Container(id).GetRootfs().GetLower()[0].GetStorageId(); l != lower {
			t.Errorf("%s's lower layer is storage %s, want the sandbox's %s", id, l, lower)
		}
	}

	// c1 was created, never started: its delete makes sure nothing of it runs.
	if _, err := h.s.Delete(h.ctx, &taskAPI.DeleteRequest{ID: "c1"}); err != nil {
		t.Fatal(err)
	}
	h.isGone("c1")
	if got := h.hv.Agent.Methods("c1"); !slices.Equal(got, []string{"Containers.Create c1", "Containers.Signal c1", "Containers.Delete c1"}) {
		t.Errorf("the agent's calls about c1: %q", got)
	}
	if got, want := attached(vm), sorted(h.layer, c2RW); !slices.Equal(got, want) {
		t.Errorf("after c1's delete attached %v, want %v", got, want)
	}
	if got := h.status("sb", ""); got != task.Status_RUNNING {
		t.Errorf("the sandbox is %s after another container's delete", got)
	}
	// Nothing stops the shim while containers remain.
	if _, err := h.s.Shutdown(h.ctx, &taskAPI.ShutdownRequest{}); err != nil {
		t.Fatal(err)
	}
	if !vm.Running() {
		t.Fatal("Shutdown with containers left stopped the VM")
	}
}

// A container whose rootfs is read-only and stays so writes to a tmpfs in the guest, as
// the pause container does, if its writable image has not been made yet: the image is
// neither created nor attached. Every other container keeps its image.
func TestReadOnlyRootfsOnTmpfs(t *testing.T) {
	for _, tc := range []struct {
		name  string
		opts  []oci.SpecOpts
		made  bool // the writable image exists before the create
		tmpfs bool
	}{
		{name: "read-only", opts: []oci.SpecOpts{oci.WithRootFSReadonly()}, tmpfs: true},
		{name: "read-only on an image made before", opts: []oci.SpecOpts{oci.WithRootFSReadonly()}, made: true},
		{name: "read-only with CAP_SYS_ADMIN", opts: []oci.SpecOpts{oci.WithRootFSReadonly(), oci.WithAddedCapabilities([]string{"CAP_SYS_ADMIN"})}},
		{name: "privileged read-only", opts: []oci.SpecOpts{oci.WithRootFSReadonly(), oci.WithPrivileged}},
		{name: "read-only without capabilities in the spec", opts: []oci.SpecOpts{oci.WithRootFSReadonly(), func(_ context.Context, _ oci.Client, _ *containers.Container, s *specs.Spec) error {
			s.Process.Capabilities = nil
			return nil
		}}},
		{name: "writable", made: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := newHarness(t)
			sbReq, _ := h.createRequest("sb", sandboxAnnotations("pod1"))
			h.mustCreate(sbReq)
			vm := h.vm()
			req, rw := h.createRequestOn("c1", containerAnnotations("pod1"), h.layer, tc.opts...)
			if !tc.made {
				if err := os.Remove(rw); err != nil {
					t.Fatal(err)
				}
			}
			h.mustCreate(req)
			r := h.hv.Agent.Container("c1").GetRootfs()
			if tc.tmpfs {
				if !r.GetTmpfsUpper() || r.GetUpper() != nil || r.GetWork() != nil || len(r.GetLower()) != 1 {
					t.Errorf("rootfs %v: want the layer under a tmpfs upper", r)
				}
				if got, want := attached(vm), []string{h.layer}; !slices.Equal(got, want) {
					t.Errorf("attached %v, want only the layer %v", got, want)
				}
				if _, err := os.Lstat(rw); !errors.Is(err, os.ErrNotExist) {
					t.Errorf("the writable image %s was made: %v", rw, err)
				}
				return
			}
			if r.GetTmpfsUpper() || r.GetUpper() == nil {
				t.Errorf("rootfs %v: want the writable image as upper", r)
			}
			if got, want := attached(vm), sorted(h.layer, rw); !slices.Equal(got, want) {
				t.Errorf("attached %v, want %v", got, want)
			}
		})
	}
}

var errInjected = errors.New("injected failure")

// A first container's create that fails at any step leaves nothing: no container, the
// VM stopped (or never started), the pod's state removed; the shim's next create starts
// a new pod.
func TestFirstCreateFailureLeavesNothing(t *testing.T) {
	for _, tc := range []struct {
		name   string
		inject func(h *harness, r *taskAPI.CreateTaskRequest)
		vm     bool // whether a VM was made
	}{
		{"VM new", func(h *harness, _ *taskAPI.CreateTaskRequest) { h.hv.Fail(fakevm.OpNew, errInjected) }, false},
		{"VM start", func(h *harness, _ *taskAPI.CreateTaskRequest) { h.hv.Fail(fakevm.OpStart, errInjected) }, true},
		{"agent check", func(h *harness, _ *taskAPI.CreateTaskRequest) { h.hv.Agent.Fail("Sandbox.Check", errInjected) }, true},
		{"boot disk mount", func(h *harness, _ *taskAPI.CreateTaskRequest) { h.hv.Agent.Fail("Storage.Mount", errInjected) }, true},
		{"sandbox create", func(h *harness, _ *taskAPI.CreateTaskRequest) { h.hv.Agent.Fail("Sandbox.Create", errInjected) }, true},
		{"agent create", func(h *harness, _ *taskAPI.CreateTaskRequest) {
			h.hv.Agent.Fail("Containers.Create", errdefs.ErrResourceExhausted)
		}, true},
		{"stdio attach", func(h *harness, r *taskAPI.CreateTaskRequest) { r.Stdout = "file://" + h.layer + "/log" }, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := newHarness(t)
			r, _ := h.createRequest("c1", sandboxAnnotations("pod1"))
			tc.inject(h, r)
			if _, err := h.s.Create(h.ctx, r); err == nil {
				t.Fatal("Create succeeded")
			} else if tc.name == "agent create" && !errdefs.IsResourceExhausted(errgrpc.ToNative(err)) {
				t.Errorf("Create: %v, want the agent's error class (ResourceExhausted)", err)
			}
			h.isGone("c1")
			vms := h.hv.VMs()
			if tc.vm != (len(vms) == 1) {
				t.Fatalf("%d VMs made, want a VM: %v", len(vms), tc.vm)
			}
			for _, vm := range vms {
				if vm.Running() {
					t.Error("the pod's VM still runs")
				}
			}
			if _, err := os.Stat(h.podStateDir("pod1")); !errors.Is(err, os.ErrNotExist) {
				t.Errorf("pod state after a failed create: %v", err)
			}

			// The failure is gone: the next create starts a pod of its own.
			h.hv.Fail(fakevm.OpNew, nil)
			h.hv.Fail(fakevm.OpStart, nil)
			for _, m := range []string{"Sandbox.Check", "Storage.Mount", "Sandbox.Create", "Containers.Create"} {
				h.hv.Agent.Fail(m, nil)
			}
			r, _ = h.createRequest("c1", sandboxAnnotations("pod1"))
			h.mustCreate(r)
			if n := len(h.hv.VMs()); n != len(vms)+1 {
				t.Fatalf("%d VMs after the second create, want a new one", n)
			}
			h.stop()
			if got := h.pub.topics("c1"); !slices.Equal(got, []string{"*events.TaskCreate"}) {
				t.Errorf("events %q, want the second create's only", got)
			}
		})
	}
}

// A later container's create that fails at any step leaves the pod as it was: the VM
// runs, with the disks and storages it had, the first container runs; nothing of the
// failed container remains.
func TestLaterCreateFailureKeepsThePod(t *testing.T) {
	for _, tc := range []struct {
		name   string
		inject func(h *harness, r *taskAPI.CreateTaskRequest)
	}{
		{"disk attach", func(h *harness, _ *taskAPI.CreateTaskRequest) { h.hv.Fail(fakevm.OpAttachDisk, errInjected) }},
		{"storage mount", func(h *harness, _ *taskAPI.CreateTaskRequest) { h.hv.Agent.Fail("Storage.Mount", errInjected) }},
		{"agent create", func(h *harness, _ *taskAPI.CreateTaskRequest) { h.hv.Agent.Fail("Containers.Create", errInjected) }},
		{"stdio attach", func(h *harness, r *taskAPI.CreateTaskRequest) { r.Stdout = "file://" + h.layer + "/log" }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := newHarness(t)
			sbReq, _ := h.createRequest("sb", sandboxAnnotations("pod1"))
			h.mustCreate(sbReq)
			h.mustStart("sb", "")
			vm := h.vm()
			disks, storages := attached(vm), h.hv.Agent.Storages()

			r, rw := h.createRequest("c1", containerAnnotations("pod1"))
			tc.inject(h, r)
			if _, err := h.s.Create(h.ctx, r); err == nil {
				t.Fatal("Create succeeded")
			}
			h.isGone("c1")
			if !vm.Running() {
				t.Fatal("the pod's VM went with a later container's failed create")
			}
			if got := attached(vm); !slices.Equal(got, disks) {
				t.Errorf("attached %v after the failed create, want %v as before", got, disks)
			}
			if got := h.hv.Agent.Storages(); !slices.Equal(got, storages) {
				t.Errorf("storages %v after the failed create, want %v as before", got, storages)
			}
			// What was hot-plugged for it was detached.
			if id := diskID(vm, rw); id != "" {
				if ev := vm.Events(); !slices.Contains(ev, fakevm.Event("detach "+id)) {
					t.Errorf("VM events %q: the failed container's image %s was not detached", ev, id)
				}
			}
			if got := h.status("sb", ""); got != task.Status_RUNNING {
				t.Errorf("the sandbox is %s", got)
			}
			h.stop()
			if got := h.pub.topics("c1"); len(got) != 0 {
				t.Errorf("events of a failed create: %q", got)
			}
		})
	}
}

// diskID is the id of the disk vm got for host file path ("" if none).
func diskID(vm *fakevm.VM, path string) string {
	for _, d := range vm.History() {
		if d.Path == path {
			return d.ID
		}
	}
	return ""
}

// The VM dying under a running pod ends every process with 255; Delete then forgets
// the containers though the guest cannot answer.
func TestVMDeathEndsThePodsProcesses(t *testing.T) {
	h := newHarness(t)
	sbReq, _ := h.createRequest("sb", sandboxAnnotations("pod1"))
	h.mustCreate(sbReq)
	h.mustStart("sb", "")
	c1Req, _ := h.createRequest("c1", containerAnnotations("pod1"))
	h.mustCreate(c1Req)
	h.mustStart("c1", "")

	if err := h.vm().Crash(); err != nil {
		t.Fatal(err)
	}
	for _, id := range []string{"sb", "c1"} {
		if code := h.wait(id, ""); code != vmExitCode {
			t.Errorf("%s exited %d, want %d", id, code, vmExitCode)
		}
		if _, err := h.s.Kill(h.ctx, &taskAPI.KillRequest{ID: id, Signal: uint32(unix.SIGKILL)}); !errdefs.IsNotFound(errgrpc.ToNative(err)) {
			t.Errorf("Kill of %s after the VM's death: %v, want NotFound", id, err)
		}
		if _, err := h.s.Delete(h.ctx, &taskAPI.DeleteRequest{ID: id}); err != nil {
			t.Fatalf("Delete %s: %v", id, err)
		}
		if _, err := h.s.State(h.ctx, &taskAPI.StateRequest{ID: id}); !errdefs.IsNotFound(errgrpc.ToNative(err)) {
			t.Errorf("State of %s after its delete: %v", id, err)
		}
	}
	h.shutdown()
	if _, err := os.Stat(h.podStateDir("pod1")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("pod state after shutdown: %v", err)
	}
}

// Delete goes on when the guest fails to delete the container: the shim forgets it and
// releases its rootfs all the same (containerd could not retry a delete of a task it
// has been told is gone).
func TestDeleteWhenTheGuestFails(t *testing.T) {
	h := newHarness(t)
	sbReq, _ := h.createRequest("sb", sandboxAnnotations("pod1"))
	h.mustCreate(sbReq)
	h.mustStart("sb", "")
	vm := h.vm()
	before := attached(vm)
	c1Req, _ := h.createRequest("c1", containerAnnotations("pod1"))
	h.mustCreate(c1Req)

	h.hv.Agent.Fail("Containers.Delete", errInjected)
	if _, err := h.s.Delete(h.ctx, &taskAPI.DeleteRequest{ID: "c1"}); err != nil {
		t.Fatalf("Delete: %v", err)
	}
	if _, err := h.s.State(h.ctx, &taskAPI.StateRequest{ID: "c1"}); !errdefs.IsNotFound(errgrpc.ToNative(err)) {
		t.Errorf("State of c1 after its delete: %v", err)
	}
	if got := attached(vm); !slices.Equal(got, before) {
		t.Errorf("attached %v after the delete, want %v", got, before)
	}
	h.stop()
	if got := h.pub.topics("c1"); !slices.Equal(got, []string{"*events.TaskCreate", "*events.TaskDelete"}) {
		t.Errorf("events %q", got)
	}
}

// Requests about unknown containers and processes are NotFound; a second create of an
// id is AlreadyExists and changes nothing.
func TestUnknownAndDuplicate(t *testing.T) {
	h := newHarness(t)
	r, _ := h.createRequest("c1", nil)
	h.mustCreate(r)
	vm := h.vm()
	disks := attached(vm)
	if _, err := h.s.Create(h.ctx, r); !errdefs.IsAlreadyExists(errgrpc.ToNative(err)) {
		t.Errorf("second Create: %v, want AlreadyExists", err)
	}
	if got := attached(vm); !slices.Equal(got, disks) || len(h.hv.VMs()) != 1 {
		t.Errorf("a refused create changed the VM: %v", got)
	}
	for name, call := range map[string]func() error{
		"Start":  func() error { _, err := h.s.Start(h.ctx, &taskAPI.StartRequest{ID: "nope"}); return err },
		"Kill":   func() error { _, err := h.s.Kill(h.ctx, &taskAPI.KillRequest{ID: "nope", Signal: 9}); return err },
		"Delete": func() error { _, err := h.s.Delete(h.ctx, &taskAPI.DeleteRequest{ID: "nope"}); return err },
		"Wait":   func() error { _, err := h.s.Wait(h.ctx, &taskAPI.WaitRequest{ID: "nope"}); return err },
		"exec Start": func() error {
			_, err := h.s.Start(h.ctx, &taskAPI.StartRequest{ID: "c1", ExecID: "nope"})
			return err
		},
	} {
		if err := call(); !errdefs.IsNotFound(errgrpc.ToNative(err)) {
			t.Errorf("%s of an unknown process: %v, want NotFound", name, err)
		}
	}
}

// execRequest is exec execID of container id running true.
func execRequest(id, execID string) *taskAPI.ExecProcessRequest {
	spec, _ := json.Marshal(specs.Process{Args: []string{"true"}, Cwd: "/"})
	return &taskAPI.ExecProcessRequest{ID: id, ExecID: execID,
		Spec: &anypb.Any{TypeUrl: "types.containerd.io/opencontainers/runtime-spec/1/Process", Value: spec}}
}

// An exec or a start the guest refuses, or whose stdio cannot be attached, fails with
// the guest's error class and leaves nothing: no exec in the shim or the guest, the
// container as it was.
func TestExecAndStartFailures(t *testing.T) {
	h := newHarness(t)
	r, _ := h.createRequest("c1", nil)
	h.mustCreate(r)

	h.hv.Agent.Fail("Containers.Start", errdefs.ErrFailedPrecondition)
	if _, err := h.s.Start(h.ctx, &taskAPI.StartRequest{ID: "c1"}); !errdefs.IsFailedPrecondition(errgrpc.ToNative(err)) {
		t.Errorf("Start the guest refuses: %v, want its FailedPrecondition", err)
	}
	if got := h.status("c1", ""); got != task.Status_CREATED {
		t.Errorf("status after a failed start %s, want created", got)
	}
	h.hv.Agent.Fail("Containers.Start", nil)
	h.mustStart("c1", "")

	for _, tc := range []struct {
		name   string
		inject func(*taskAPI.ExecProcessRequest)
		class  func(error) bool
	}{
		{"agent create", func(*taskAPI.ExecProcessRequest) { h.hv.Agent.Fail("Exec.Create", errdefs.ErrResourceExhausted) }, errdefs.IsResourceExhausted},
		{"stdio attach", func(r *taskAPI.ExecProcessRequest) { r.Stdout = "file://" + h.layer + "/log" }, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := execRequest("c1", "e-"+tc.name)
			tc.inject(r)
			_, err := h.s.Exec(h.ctx, r)
			h.hv.Agent.Fail("Exec.Create", nil)
			if err == nil {
				t.Fatal("Exec succeeded")
			}
			if tc.class != nil && !tc.class(errgrpc.ToNative(err)) {
				t.Errorf("Exec: %v, want the guest's error class", err)
			}
			if _, err := h.s.State(h.ctx, &taskAPI.StateRequest{ID: "c1", ExecID: r.ExecID}); !errdefs.IsNotFound(errgrpc.ToNative(err)) {
				t.Errorf("State of the failed exec: %v, want NotFound", err)
			}
			if n := h.hv.Agent.Streams("c1", r.ExecID); n != 0 {
				t.Errorf("%d stdio streams of the failed exec in the guest", n)
			}
			if err := h.hv.Agent.Exit("c1", r.ExecID, 0); !errdefs.IsNotFound(err) {
				t.Errorf("the failed exec in the guest: %v, want it gone", err)
			}
		})
	}
	if got := h.status("c1", ""); got != task.Status_RUNNING {
		t.Errorf("the container is %s after failed execs", got)
	}
	// The same exec id is free again.
	if _, err := h.s.Exec(h.ctx, execRequest("c1", "e-stdio attach")); err != nil {
		t.Errorf("Exec with a failed exec's id: %v", err)
	}
}

// OOM events from the guest become TaskOOM for the pod's own containers only: a guest
// may be compromised, and naming another container is dropped.
func TestOOMEventsOfThePodsContainersOnly(t *testing.T) {
	h := newHarness(t)
	r, _ := h.createRequest("c1", nil)
	h.mustCreate(r)
	h.mustStart("c1", "")
	h.hv.Agent.OOM("not-this-pods")
	h.hv.Agent.OOM("c1")
	// The guest's events come in order on one stream: once c1's is published, the other
	// one was handled before it.
	h.pub.waitFor("c1", "*events.TaskOOM")
	h.stop()
	if got := h.pub.topics("not-this-pods"); len(got) != 0 {
		t.Errorf("events for a container of no pod of this shim: %q", got)
	}
	var ooms int
	for _, e := range h.pub.topics("c1") {
		if e == "*events.TaskOOM" {
			ooms++
		}
	}
	if ooms != 1 {
		t.Errorf("events of c1 %q: want one TaskOOM", h.pub.topics("c1"))
	}
}

// A later container whose rootfs needs two new disks while the VM has a hot-plug slot for
// one only: the second attach fails, and the first, attached and mounted for it, is
// unmounted and detached again.
func TestLaterCreateOutOfHotplugSlots(t *testing.T) {
	h := newHarnessWith(t, "hotplug_slots = 1")
	sbReq, _ := h.createRequest("sb", sandboxAnnotations("pod1"))
	h.mustCreate(sbReq)
	vm := h.vm()
	disks, storages := attached(vm), h.hv.Agent.Storages()

	r, _ := h.createRequestOn("c1", containerAnnotations("pod1"), h.file("other-layer.erofs"))
	if _, err := h.s.Create(h.ctx, r); !errdefs.IsResourceExhausted(errgrpc.ToNative(err)) {
		t.Fatalf("Create: %v, want the VM's ResourceExhausted", err)
	}
	h.isGone("c1")
	var attaches, detaches int
	for _, e := range vm.Events() {
		switch {
		case strings.HasPrefix(string(e), "attach "):
			attaches++
		case strings.HasPrefix(string(e), "detach "):
			detaches++
		}
	}
	if attaches != 1 || detaches != 1 {
		t.Errorf("VM events %q: want the one disk attached for c1 detached again", vm.Events())
	}
	if got := attached(vm); !slices.Equal(got, disks) {
		t.Errorf("attached %v, want %v as before", got, disks)
	}
	if got := h.hv.Agent.Storages(); !slices.Equal(got, storages) {
		t.Errorf("storages %v, want %v as before", got, storages)
	}
	// The slot is free again: a container that needs one disk joins.
	r, _ = h.createRequest("c2", containerAnnotations("pod1"))
	h.mustCreate(r)
}
