package fakevm

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"sync"
	"syscall"
	"time"

	"github.com/containerd/errdefs"
	"github.com/containerd/log"

	"github.com/caisson-containers/caisson/shim/vmm"
)

// Operations of the hypervisor and its VMs that Fail can make fail.
const (
	OpNew            = "New"
	OpStart          = "Start"
	OpAttachDisk     = "AttachDisk"
	OpAttachSharedFS = "AttachSharedFS"
	OpDetachDisk     = "DetachDisk"
	OpStop           = "Stop"
	OpVCPUTime       = "VCPUTime"
)

// AgentSocket is the name of a VM's agent socket in its Config.StateDir.
const AgentSocket = "agent.sock"

// maxBootDisks is how many disks a fake VM boots with, as QEMU's MaxColdDisks.
const maxBootDisks = 8

// Hypervisor makes fake VMs, each serving Agent on its endpoint. Its zero value is not
// usable: see New.
type Hypervisor struct {
	// Agent is the guest agent of every VM the hypervisor makes.
	Agent *Agent

	mu   sync.Mutex
	fail map[string]error
	vms  []*VM
}

var _ vmm.Hypervisor = (*Hypervisor)(nil)

// New returns a hypervisor whose VMs run a new Agent.
func New() *Hypervisor {
	return &Hypervisor{Agent: NewAgent(), fail: map[string]error{}}
}

// Fail makes every later op (OpNew, OpStart, ...) of the hypervisor and its VMs fail
// with err, until Fail(op, nil). A failed op changes nothing.
func (h *Hypervisor) Fail(op string, err error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if err == nil {
		delete(h.fail, op)
		return
	}
	h.fail[op] = err
}

func (h *Hypervisor) failure(op string) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.fail[op]
}

// VMs returns the VMs made so far (New that succeeded), in order.
func (h *Hypervisor) VMs() []*VM {
	h.mu.Lock()
	defer h.mu.Unlock()
	return slices.Clone(h.vms)
}

// New returns a VM of cfg, not started.
func (h *Hypervisor) New(cfg vmm.Config) (vmm.VM, error) {
	if err := h.failure(OpNew); err != nil {
		return nil, err
	}
	if cfg.StateDir == "" {
		return nil, fmt.Errorf("fakevm: no state dir: %w", errdefs.ErrInvalidArgument)
	}
	if cfg.Agent.Transport != "" && cfg.Agent.Transport != vmm.TransportSerial {
		return nil, fmt.Errorf("fakevm: agent transport %q: %w", cfg.Agent.Transport, errdefs.ErrNotImplemented)
	}
	if len(cfg.Disks) > maxBootDisks {
		return nil, fmt.Errorf("fakevm: %d boot disks, at most %d: %w", len(cfg.Disks), maxBootDisks, errdefs.ErrInvalidArgument)
	}
	vm := &VM{h: h, cfg: cfg, done: make(chan struct{}), disks: map[string]vmm.Disk{}}
	h.mu.Lock()
	h.vms = append(h.vms, vm)
	h.mu.Unlock()
	return vm, nil
}

// Identity says the VMs are fakevm's.
func (h *Hypervisor) Identity() (vmm.Identity, error) {
	return vmm.Identity{VMM: "fakevm", Binary: os.Args[0]}, nil
}

// MaxBootDisks is how many Config.Disks a VM may boot with.
func (h *Hypervisor) MaxBootDisks() int { return maxBootDisks }

// Event is something that happened to a VM's devices or the VM itself: "start",
// "attach ID", "detach ID", "stop".
type Event string

// VM is a fake VM: a real harmless host process stands for the VMM (so that its pid is a
// process of the test's own, which ends with the VM), and a unix socket in the state
// directory, where the agent is served, for the virtio-serial port's chardev.
type VM struct {
	h   *Hypervisor
	cfg vmm.Config

	mu       sync.Mutex
	started  bool
	stopped  bool // by Stop
	cmd      *exec.Cmd
	listener net.Listener
	cancel   context.CancelFunc
	serving  sync.WaitGroup
	disks    map[string]vmm.Disk // attached now, by id
	hotplug  int                 // how many of them were hot-plugged
	history  []vmm.Disk          // every disk booted with or hot-plugged, in order
	nics     []string            // ids of the hot-plugged NICs
	sharedFS string              // tag of the hot-plugged shared file system
	events   []Event
	vcpuTime time.Duration // VCPUTime's, set by the test
	err      error         // Wait's, once done
	done     chan struct{}
}

// Config is the configuration the VM was made with.
func (vm *VM) Config() vmm.Config { return vm.cfg }

// Events returns what happened to the VM, in order.
func (vm *VM) Events() []Event {
	vm.mu.Lock()
	defer vm.mu.Unlock()
	return slices.Clone(vm.events)
}

// History returns every disk the VM booted with or had hot-plugged, in order.
func (vm *VM) History() []vmm.Disk {
	vm.mu.Lock()
	defer vm.mu.Unlock()
	return slices.Clone(vm.history)
}

// Disks returns the disks attached now (booted with or hot-plugged), sorted by id.
func (vm *VM) Disks() []vmm.Disk {
	vm.mu.Lock()
	defer vm.mu.Unlock()
	var ds []vmm.Disk
	for _, d := range vm.disks {
		ds = append(ds, d)
	}
	slices.SortFunc(ds, func(a, b vmm.Disk) int {
		if a.ID < b.ID {
			return -1
		}
		if a.ID > b.ID {
			return 1
		}
		return 0
	})
	return ds
}

// Running reports whether the VM was started and has not ended.
func (vm *VM) Running() bool {
	vm.mu.Lock()
	defer vm.mu.Unlock()
	if !vm.started {
		return false
	}
	select {
	case <-vm.done:
		return false
	default:
		return true
	}
}

// Stopped reports whether Stop ended the VM.
func (vm *VM) Stopped() bool {
	vm.mu.Lock()
	defer vm.mu.Unlock()
	return vm.stopped
}

// Start starts the stand-in process and serves the agent on the endpoint.
func (vm *VM) Start(ctx context.Context) (retErr error) {
	vm.mu.Lock()
	defer vm.mu.Unlock()
	if vm.started {
		return fmt.Errorf("fakevm: started twice: %w", errdefs.ErrFailedPrecondition)
	}
	vm.started = true
	defer func() {
		if retErr != nil {
			vm.err = &vmm.ExitError{Reason: "start failed: " + retErr.Error()}
			close(vm.done)
		}
	}()
	if err := vm.h.failure(OpStart); err != nil {
		return err
	}
	for _, d := range vm.cfg.Disks {
		if _, err := os.Stat(d.Path); err != nil {
			return fmt.Errorf("fakevm: disk %s: %w", d.ID, err)
		}
	}
	if err := os.MkdirAll(vm.cfg.StateDir, 0o700); err != nil {
		return err
	}
	l, err := net.Listen("unix", vm.Endpoint().Path)
	if err != nil {
		return fmt.Errorf("fakevm: agent socket: %w", err)
	}
	// Sleeps until killed: what a VMM process is to the shim, a pid that lives as long
	// as the VM. A test that dies (a timeout, a panic) takes it along instead of leaving
	// it on the machine.
	cmd := exec.Command("sleep", "infinity")
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		l.Close()
		os.Remove(vm.Endpoint().Path)
		return fmt.Errorf("fakevm: stand-in process: %w", err)
	}
	sctx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	vm.cmd, vm.listener, vm.cancel = cmd, l, cancel
	for _, d := range vm.cfg.Disks {
		vm.disks[d.ID] = d
	}
	vm.history = append(vm.history, vm.cfg.Disks...)
	vm.events = append(vm.events, "start")
	vm.serving.Add(1)
	go vm.serve(sctx, l)
	go vm.reap()
	return nil
}

// serve serves the agent to each host connection, one after the other, as a
// virtio-serial port's chardev takes one client at a time.
func (vm *VM) serve(ctx context.Context, l net.Listener) {
	defer vm.serving.Done()
	for {
		c, err := l.Accept()
		if err != nil {
			return
		}
		stop := context.AfterFunc(ctx, func() { c.Close() })
		if err := vm.h.Agent.Serve(ctx, c); err != nil {
			log.G(ctx).WithError(err).Debug("fakevm: agent connection ended")
		}
		stop()
		c.Close()
	}
}

// reap waits for the stand-in process; its end is the VM's.
func (vm *VM) reap() {
	werr := vm.cmd.Wait()
	vm.mu.Lock()
	defer vm.mu.Unlock()
	vm.shutdown()
	if !vm.stopped {
		vm.err = &vmm.ExitError{Reason: fmt.Sprintf("the VMM ended: %v", werr)}
	}
	close(vm.done)
}

// shutdown stops serving and removes the socket; vm.mu is held.
func (vm *VM) shutdown() {
	vm.cancel()
	vm.listener.Close()
	os.Remove(vm.Endpoint().Path)
}

// Crash kills the stand-in process, as a VMM that dies on its own: Done closes and Wait
// returns an ExitError.
func (vm *VM) Crash() error {
	vm.mu.Lock()
	cmd := vm.cmd
	vm.mu.Unlock()
	if cmd == nil {
		return fmt.Errorf("fakevm: not started: %w", errdefs.ErrFailedPrecondition)
	}
	if err := cmd.Process.Kill(); err != nil {
		return err
	}
	<-vm.done
	return nil
}

// Endpoint is the agent socket in the state directory.
func (vm *VM) Endpoint() vmm.Endpoint {
	return vmm.Endpoint{Transport: vmm.TransportSerial, Path: filepath.Join(vm.cfg.StateDir, AgentSocket)}
}

// AttachDisk hot-plugs d: its file must exist, its id be new, and a hot-plug slot free.
func (vm *VM) AttachDisk(ctx context.Context, d vmm.Disk) (vmm.DiskAddress, error) {
	vm.mu.Lock()
	defer vm.mu.Unlock()
	if err := vm.running(); err != nil {
		return vmm.DiskAddress{}, err
	}
	if err := vm.h.failure(OpAttachDisk); err != nil {
		return vmm.DiskAddress{}, err
	}
	if _, ok := vm.disks[d.ID]; ok || d.ID == "" {
		return vmm.DiskAddress{}, fmt.Errorf("fakevm: disk %q: %w", d.ID, errdefs.ErrAlreadyExists)
	}
	if vm.hotplug >= vm.cfg.HotplugSlots {
		return vmm.DiskAddress{}, fmt.Errorf("fakevm: no free hot-plug slot (%d): %w", vm.cfg.HotplugSlots, errdefs.ErrResourceExhausted)
	}
	if _, err := os.Stat(d.Path); err != nil {
		return vmm.DiskAddress{}, fmt.Errorf("fakevm: disk %s: %w", d.ID, err)
	}
	vm.disks[d.ID] = d
	vm.history = append(vm.history, d)
	vm.hotplug++
	vm.events = append(vm.events, Event("attach "+d.ID))
	return address(d), nil
}

// AttachNIC hot-plugs n: its tap must be open, its id new.
func (vm *VM) AttachNIC(ctx context.Context, n vmm.NIC) error {
	vm.mu.Lock()
	defer vm.mu.Unlock()
	if err := vm.running(); err != nil {
		return err
	}
	if n.Tap == nil {
		return fmt.Errorf("fakevm: NIC %q has no tap: %w", n.ID, errdefs.ErrInvalidArgument)
	}
	for _, have := range vm.nics {
		if have == n.ID {
			return fmt.Errorf("fakevm: NIC %q: %w", n.ID, errdefs.ErrAlreadyExists)
		}
	}
	vm.nics = append(vm.nics, n.ID)
	vm.events = append(vm.events, Event("attach NIC "+n.ID))
	return nil
}

// AttachSharedFS hot-plugs fs into a VM that started with shared memory and has no
// shared file system (as the fake ignores a cold-plugged one's daemon, it does not
// connect to this one's).
func (vm *VM) AttachSharedFS(ctx context.Context, fs vmm.SharedFS) error {
	vm.mu.Lock()
	defer vm.mu.Unlock()
	if err := vm.running(); err != nil {
		return err
	}
	if err := vm.h.failure(OpAttachSharedFS); err != nil {
		return err
	}
	switch {
	case vm.cfg.SharedFS != nil || vm.sharedFS != "":
		return fmt.Errorf("fakevm: shared file system %q: the VM has one: %w", fs.Tag, errdefs.ErrAlreadyExists)
	case !vm.cfg.SharedMemory:
		return fmt.Errorf("fakevm: shared file system %q: the VM's memory is private: %w", fs.Tag, errdefs.ErrFailedPrecondition)
	}
	vm.sharedFS = fs.Tag
	vm.events = append(vm.events, Event("attach shared file system "+fs.Tag))
	return nil
}

func address(d vmm.Disk) vmm.DiskAddress {
	a := vmm.DiskAddress{PCIPath: vmm.PCIPath("01.0/00.0")}
	if d.Kind == vmm.Block {
		a.Serial = d.ID
		if len(a.Serial) > 20 {
			a.Serial = a.Serial[:20]
		}
	}
	return a
}

// Address returns an attached disk's address.
func (vm *VM) Address(id string) (vmm.DiskAddress, error) {
	vm.mu.Lock()
	defer vm.mu.Unlock()
	d, ok := vm.disks[id]
	if !ok {
		return vmm.DiskAddress{}, fmt.Errorf("fakevm: disk %s: %w", id, errdefs.ErrNotFound)
	}
	return address(d), nil
}

// DetachDisk removes an attached disk (booted with or hot-plugged).
func (vm *VM) DetachDisk(ctx context.Context, id string) error {
	vm.mu.Lock()
	defer vm.mu.Unlock()
	if err := vm.running(); err != nil {
		return err
	}
	if err := vm.h.failure(OpDetachDisk); err != nil {
		return err
	}
	if _, ok := vm.disks[id]; !ok {
		return fmt.Errorf("fakevm: disk %s: %w", id, errdefs.ErrNotFound)
	}
	if !slices.ContainsFunc(vm.cfg.Disks, func(d vmm.Disk) bool { return d.ID == id }) {
		vm.hotplug--
	}
	delete(vm.disks, id)
	vm.events = append(vm.events, Event("detach "+id))
	return nil
}

// running fails unless the VM runs; vm.mu is held.
func (vm *VM) running() error {
	if !vm.started {
		return fmt.Errorf("fakevm: not started: %w", errdefs.ErrFailedPrecondition)
	}
	select {
	case <-vm.done:
		return fmt.Errorf("fakevm: the VM has ended: %w", errdefs.ErrFailedPrecondition)
	default:
		return nil
	}
}

// Stop ends the VM: the agent stops serving, the stand-in process is killed, the socket
// removed. It may be called again, and after the VM ended on its own.
func (vm *VM) Stop(ctx context.Context) error {
	vm.mu.Lock()
	if !vm.started {
		vm.mu.Unlock()
		return nil
	}
	if err := vm.h.failure(OpStop); err != nil {
		vm.mu.Unlock()
		return err
	}
	select {
	case <-vm.done:
		vm.mu.Unlock()
		vm.serving.Wait()
		return nil
	default:
	}
	vm.stopped = true
	vm.events = append(vm.events, "stop")
	cmd := vm.cmd
	vm.mu.Unlock()
	if err := cmd.Process.Kill(); err != nil && !errors.Is(err, os.ErrProcessDone) {
		return err
	}
	<-vm.done
	vm.serving.Wait()
	return nil
}

// Done is closed when the VM has ended.
func (vm *VM) Done() <-chan struct{} { return vm.done }

// Wait says why the VM ended: nil after Stop.
func (vm *VM) Wait() error {
	<-vm.done
	vm.mu.Lock()
	defer vm.mu.Unlock()
	return vm.err
}

// Pid is the stand-in process's pid (0 before Start).
func (vm *VM) Pid() int {
	vm.mu.Lock()
	defer vm.mu.Unlock()
	if vm.cmd == nil || vm.cmd.Process == nil {
		return 0
	}
	return vm.cmd.Process.Pid
}

// VCPUTime is what SetVCPUTime last set (0 at first), while the VM runs.
func (vm *VM) VCPUTime() (time.Duration, error) {
	if !vm.Running() {
		return 0, fmt.Errorf("fakevm: vCPU time: %w: the VM is not running", errdefs.ErrFailedPrecondition)
	}
	if err := vm.h.failure(OpVCPUTime); err != nil {
		return 0, err
	}
	vm.mu.Lock()
	defer vm.mu.Unlock()
	return vm.vcpuTime, nil
}

// SetVCPUTime sets what VCPUTime returns, as a guest that ran for d in all.
func (vm *VM) SetVCPUTime(d time.Duration) {
	vm.mu.Lock()
	defer vm.mu.Unlock()
	vm.vcpuTime = d
}

// SaveTemplate is not modelled: pods of these tests boot.
func (vm *VM) SaveTemplate(ctx context.Context) error {
	return fmt.Errorf("fakevm: templates: %w", errdefs.ErrNotImplemented)
}

// Resize is not modelled: pods of these tests keep the size they boot with.
func (vm *VM) Resize(ctx context.Context, want vmm.Size) (vmm.Size, error) {
	return vmm.Size{}, fmt.Errorf("fakevm: resize: %w", errdefs.ErrNotImplemented)
}
