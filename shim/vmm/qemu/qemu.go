// Package qemu runs a pod's VM with QEMU (q35): it implements vmm.Hypervisor
// (NewHypervisor, from the shim's configuration) and vmm.VM.
//
// QEMU runs in its own process group with an empty environment, -sandbox on with every
// restriction QEMU offers (obsolete, elevateprivileges, spawn, resourcecontrol: deny), and
// dies with the shim (Pdeathsig). Its own output goes through a pipe to qemu.log in the
// state dir, kept under QEMULogMax bytes, and is quoted when it fails; the guest console
// goes through a pipe to the console log, which the shim keeps under ConsoleLogMax
// bytes (console.go). The shim controls it
// over QMP (qmp.sock); the agent channel is a virtio-serial port whose host end is
// agent.sock, or vhost-vsock.
//
// Every disk on the command line sits alone behind its own PCIe root port (08.0-1b.7 of
// the root bus, eight functions per slot), so it can be hot-unplugged and its guest
// address is the port's, 08.0/00.0 for the first. Hot-plug slots are slots 01-1e of PCI
// bridges at 1c.0-1e.0 (1c.0/01.0 is the first), which cost next to no boot time where
// an empty root port costs tens of milliseconds under TCG. A disk detached frees its
// root port or bridge slot for the next AttachDisk. The agent device is at 02.0.
//
// QEMU cannot hot-unplug virtio-pmem devices (7.2 answers "virtio based memory devices
// cannot be unplugged"; QEMU's virtio-pmem documentation lists it as a limitation):
// DetachDisk of a PMEM disk then fails with ErrNotImplemented and the device stays until
// the VM stops, parked: AttachDisk of the same file (same inode, same read-only mode)
// under any id reuses it and returns the same address.
package qemu

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"sync"
	"syscall"
	"time"

	"github.com/containerd/errdefs"
	"github.com/containerd/log"

	"github.com/caisson-containers/caisson/internal/logtail"
	"github.com/caisson-containers/caisson/shim/vmm"
	"github.com/caisson-containers/caisson/shim/vmm/qemu/accel"
	"github.com/caisson-containers/caisson/shim/vmm/qemu/jail"
	"github.com/caisson-containers/caisson/shim/vmm/qemu/qmp"
)

const (
	// gracefulStop bounds how long Stop waits for QEMU to quit on its own.
	gracefulStop = 3 * time.Second
	// qmpTimeout bounds a QMP command that must not be abandoned half-way.
	qmpTimeout = 30 * time.Second
	// killWait bounds how long Stop waits for QEMU to die after SIGKILL.
	killWait = 10 * time.Second
	// eventDrain bounds how long the exit path waits for QMP's last events (SHUTDOWN)
	// to learn why QEMU exited.
	eventDrain = 500 * time.Millisecond
	// exitGrace is how long a failed Start waits for QEMU to exit on its own before
	// killing it.
	exitGrace = time.Second
	// stderrTail is how much of qemu.log errors quote.
	stderrTail = 2048
	// maxSocketPath is the longest unix socket path Linux accepts.
	maxSocketPath = 107
)

// VM is a QEMU virtual machine.
type VM struct {
	cfg  vmm.Config
	qcfg Config

	qmpSocket, agentSocket, stderrLog string

	// opMu serialises Start, Stop and device changes; mu guards the fields below and is
	// never held while waiting for QEMU.
	opMu sync.Mutex

	mu          sync.Mutex
	cmd         *exec.Cmd
	qmp         *qmp.Client
	startCalled bool
	stopping    bool
	ending      bool // Stop has told QEMU to quit or killed it: its exit is no error
	stopped     bool
	exitErr     error
	shutdown    string // reason of QEMU's SHUTDOWN event
	panicked    bool   // a GUEST_PANICKED event came
	disks       map[string]*disk
	parked      []*disk // PMEM disks QEMU could not unplug, kept for reuse
	slots       []slot  // root ports of the cold-plugged disks, then hot-plug slots
	used        []bool  // per slot
	nextDev     int
	hotNICs     int                      // NICs attached after the start (AttachNIC)
	hotFS       bool                     // a shared file system was attached (AttachSharedFS)
	unplug      map[string]chan struct{} // device id -> closed on DEVICE_DELETED
	ejected     map[string]bool          // devices the guest removed without DetachDisk
	diskErrs    diskErrors
	vcpus       vcpuClock // VCPUTime's

	done        chan struct{}
	eventsDone  chan struct{}
	consoleDone chan struct{} // closed once the console log has QEMU's last output
	stderrDone  chan struct{} // closed once qemu.log has QEMU's last output
	stopCh      chan struct{} // closed when Stop begins: device waits give up
}

var _ vmm.VM = (*VM)(nil)

// disk is an attached disk.
type disk struct {
	vmm.Disk
	file    os.FileInfo // at attach time
	devID   string
	slot    int // index in VM.slots
	addr    vmm.DiskAddress
	backend backend
	// fdset is the QEMU fd set a jailed QEMU opens a Block disk's file from (nil: none).
	fdset *int
	// gone is set once device_del was accepted, and closed by DEVICE_DELETED.
	gone chan struct{}
}

// New checks cfg, applies its defaults and returns a VM that is not started yet.
func New(cfg vmm.Config, qcfg Config) (*VM, error) {
	cfg, err := withDefaults(cfg)
	if err != nil {
		return nil, err
	}
	if qcfg, err = qcfg.withDefaults(); err != nil {
		return nil, err
	}
	if err := checkTemplate(cfg); err != nil {
		return nil, err
	}
	v := &VM{
		cfg:         cfg,
		qcfg:        qcfg,
		qmpSocket:   filepath.Join(cfg.StateDir, qmpSocketName),
		agentSocket: filepath.Join(cfg.StateDir, agentSocketName),
		stderrLog:   filepath.Join(cfg.StateDir, stderrLogName),
		disks:       map[string]*disk{},
		unplug:      map[string]chan struct{}{},
		ejected:     map[string]bool{},
		done:        make(chan struct{}),
		eventsDone:  make(chan struct{}),
		consoleDone: make(chan struct{}),
		stderrDone:  make(chan struct{}),
		stopCh:      make(chan struct{}),
	}
	for i := range v.coldDisks() {
		v.slots = append(v.slots, port(i).place())
	}
	for i := range cfg.HotplugSlots {
		v.slots = append(v.slots, hotSlot(i))
	}
	v.used = make([]bool, len(v.slots))
	if len(v.qmpSocket) > maxSocketPath || len(v.agentSocket) > maxSocketPath {
		return nil, fmt.Errorf("state dir %q too long for a unix socket path: %w", cfg.StateDir, errdefs.ErrInvalidArgument)
	}
	return v, nil
}

// withDefaults checks cfg and fills in its defaults.
func withDefaults(cfg vmm.Config) (vmm.Config, error) {
	if cfg.StateDir == "" {
		return cfg, fmt.Errorf("state dir not set: %w", errdefs.ErrInvalidArgument)
	}
	if cfg.Kernel == "" {
		return cfg, fmt.Errorf("kernel not set: %w", errdefs.ErrInvalidArgument)
	}
	if cfg.VCPUs == 0 {
		cfg.VCPUs = 1
	}
	if cfg.MemoryMiB == 0 {
		cfg.MemoryMiB = 512
	}
	if cfg.MaxVCPUs == 0 {
		cfg.MaxVCPUs = cfg.VCPUs
	}
	if cfg.MaxVCPUs < cfg.VCPUs {
		return cfg, fmt.Errorf("max vcpus %d below vcpus %d: %w", cfg.MaxVCPUs, cfg.VCPUs, errdefs.ErrInvalidArgument)
	}
	if cfg.MaxMemoryMiB == 0 {
		cfg.MaxMemoryMiB = cfg.MemoryMiB + 64<<10
	}
	if cfg.MaxMemoryMiB < cfg.MemoryMiB {
		return cfg, fmt.Errorf("max memory %d MiB below memory %d MiB: %w", cfg.MaxMemoryMiB, cfg.MemoryMiB, errdefs.ErrInvalidArgument)
	}
	if cfg.VCPUs < 0 || cfg.MemoryMiB < 0 || cfg.HotplugSlots < 0 {
		return cfg, fmt.Errorf("negative vcpus, memory or hot-plug slots: %w", errdefs.ErrInvalidArgument)
	}
	switch cfg.Accelerator {
	case "":
		cfg.Accelerator = string(accel.Auto)
	case string(accel.Auto), string(accel.ModeKVM), string(accel.ModeTCG):
	default:
		return cfg, fmt.Errorf("accelerator %q: want auto, kvm or tcg: %w", cfg.Accelerator, errdefs.ErrInvalidArgument)
	}
	if cfg.ConsoleLog == "" {
		cfg.ConsoleLog = filepath.Join(cfg.StateDir, consoleLogName)
	}
	if err := checkAgentChannel(&cfg.Agent); err != nil {
		return cfg, err
	}
	if n := len(cfg.Disks); n > MaxColdDisks {
		return cfg, fmt.Errorf("%d disks at start, at most %d: %w", n, MaxColdDisks, errdefs.ErrInvalidArgument)
	}
	if n := cfg.HotplugSlots; n > MaxHotplugSlots {
		return cfg, fmt.Errorf("%d hot-plug slots, at most %d: %w", n, MaxHotplugSlots, errdefs.ErrInvalidArgument)
	}
	return cfg, nil
}

// checkAgentChannel checks a's transport, serial by default.
func checkAgentChannel(a *vmm.AgentChannel) error {
	switch a.Transport {
	case "":
		a.Transport = vmm.TransportSerial
	case vmm.TransportSerial:
	case vmm.TransportVsock:
		if a.CID < 3 {
			return fmt.Errorf("vsock cid %d: must be 3 or more: %w", a.CID, errdefs.ErrInvalidArgument)
		}
	default:
		return fmt.Errorf("agent transport %q: %w", a.Transport, errdefs.ErrInvalidArgument)
	}
	return nil
}

// withDefaults checks c and fills in its defaults; a jail's user is looked up.
func (c Config) withDefaults() (Config, error) {
	if c.Path == "" {
		c.Path = defaultBinary
	}
	if j := c.Jail; j != nil {
		j := *j // the caller's stays as it was
		if j.User != "" {
			var err error
			if j.UID, j.GID, err = jail.LookupUser(j.User); err != nil {
				return c, err
			}
		}
		if j.UID == 0 || j.GID == 0 {
			return c, fmt.Errorf("jail user %d:%d: QEMU must not run as root: %w", j.UID, j.GID, errdefs.ErrInvalidArgument)
		}
		c.Jail = &j
	}
	if c.TCGTranslationCacheMiB < 0 {
		return c, fmt.Errorf("tcg translation cache %d MiB: %w", c.TCGTranslationCacheMiB, errdefs.ErrInvalidArgument)
	}
	return c, nil
}

// checkTemplate checks a VM's template settings: a template VM has no devices of its
// own, a VM from a template hot-plugs its own.
func checkTemplate(cfg vmm.Config) error {
	t := cfg.Template
	switch {
	case t == nil:
		return nil
	case t.Dir == "":
		return fmt.Errorf("template dir not set: %w", errdefs.ErrInvalidArgument)
	case !t.Restore && (len(cfg.Disks) > 0 || len(cfg.NICs) > 0):
		return fmt.Errorf("a template VM has no disks (but the template's own) or NICs (the VMs made from it get theirs): %w", errdefs.ErrInvalidArgument)
	case len(t.Disks) > MaxColdDisks:
		return fmt.Errorf("%d disks in a template, at most %d: %w", len(t.Disks), MaxColdDisks, errdefs.ErrInvalidArgument)
	case t.Restore && len(cfg.Disks)+len(cfg.NICs) > cfg.HotplugSlots:
		return fmt.Errorf("%d disks and %d NICs for a VM started from a template, which hot-plugs them, but %d hot-plug slots: %w",
			len(cfg.Disks), len(cfg.NICs), cfg.HotplugSlots, errdefs.ErrInvalidArgument)
	}
	// Shared by the template's VMs, unchanged: read-only. A virtio-pmem disk would be
	// guest memory of its own, which the template's state does not carry.
	for _, d := range t.Disks {
		if d.Kind != vmm.Block || !d.ReadOnly {
			return fmt.Errorf("template disk %q: only read-only block disks: %w", d.ID, errdefs.ErrInvalidArgument)
		}
	}
	return nil
}

// Endpoint says how to reach the agent.
func (v *VM) Endpoint() vmm.Endpoint {
	if v.cfg.Agent.Transport == vmm.TransportVsock {
		return vmm.Endpoint{Transport: vmm.TransportVsock, CID: v.cfg.Agent.CID}
	}
	return vmm.Endpoint{Transport: vmm.TransportSerial, Path: v.agentSocket}
}

// Pid is QEMU's process id, 0 before Start.
func (v *VM) Pid() int {
	v.mu.Lock()
	defer v.mu.Unlock()
	if v.cmd == nil || v.cmd.Process == nil {
		return 0
	}
	return v.cmd.Process.Pid
}

// Done is closed when QEMU has exited.
func (v *VM) Done() <-chan struct{} { return v.done }

// Wait waits for QEMU to exit: nil if Stop ended it, a *vmm.ExitError otherwise.
func (v *VM) Wait() error {
	<-v.done
	v.mu.Lock()
	defer v.mu.Unlock()
	return v.exitErr
}

// dialQMP connects to QEMU's monitor socket as soon as QEMU has created it.
func (v *VM) dialQMP(ctx context.Context) (net.Conn, error) {
	for delay := time.Millisecond; ; delay = min(2*delay, 20*time.Millisecond) {
		var d net.Dialer
		conn, err := d.DialContext(ctx, "unix", v.qmpSocket)
		if err == nil {
			return conn, nil
		}
		select {
		case <-v.done:
			return nil, fmt.Errorf("qemu exited before its monitor socket was ready")
		case <-ctx.Done():
			return nil, fmt.Errorf("waiting for qemu's monitor socket: %w", ctx.Err())
		case <-time.After(delay):
		}
	}
}

// run starts QEMU from a thread it keeps locked (see Pdeathsig) until QEMU has exited,
// then kills whatever is left in QEMU's process group, and records why QEMU ended.
func (v *VM) run(cmd *exec.Cmd, started chan<- error) {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	if err := cmd.Start(); err != nil {
		started <- err
		return
	}
	v.mu.Lock()
	v.cmd = cmd
	v.mu.Unlock()
	started <- nil

	err := v.cmd.Wait()
	syscall.Kill(-v.cmd.Process.Pid, syscall.SIGKILL)

	v.mu.Lock()
	hadQMP := v.qmp != nil
	v.mu.Unlock()
	// One deadline for the three waits below (Done is closed, closes, never blocks).
	drain, cancelDrain := context.WithTimeout(context.Background(), eventDrain)
	defer cancelDrain()
	drained := drain.Done()
	if hadQMP {
		// QEMU sends SHUTDOWN before it exits; let the event loop see it.
		select {
		case <-v.eventsDone:
		case <-drained:
		}
	}

	// QEMU's last console output (a panic's trace) is in the log before Done, and its
	// last words in qemu.log, which the exit error quotes: the pipes end with QEMU,
	// whose process group is dead by now.
	for _, ch := range []chan struct{}{v.consoleDone, v.stderrDone} {
		select {
		case <-ch:
		case <-drained:
		}
	}

	v.mu.Lock()
	if !v.ending {
		v.exitErr = &vmm.ExitError{Reason: v.exitReason(err), Log: logtail.Read(v.stderrLog, stderrTail)}
	}
	v.mu.Unlock()
	v.vcpus.close()
	close(v.done)
}

// exitReason words QEMU's wait status and the last SHUTDOWN event; v.mu is held.
func (v *VM) exitReason(err error) string {
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		if ws, ok := ee.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
			return fmt.Sprintf("qemu was killed by signal %d (%s)", int(ws.Signal()), ws.Signal())
		}
		return fmt.Sprintf("qemu exited with status %d", ee.ExitCode())
	}
	if err != nil {
		return "waiting for qemu: " + err.Error()
	}
	if v.panicked {
		return "the guest kernel panicked"
	}
	switch v.shutdown {
	case "guest-shutdown":
		return "the guest powered off"
	case "guest-reset":
		return "the guest rebooted, or its kernel panicked (qemu runs with -no-reboot)"
	case "guest-panic":
		return "the guest kernel panicked"
	case "host-qmp-quit":
		return "qemu was told to quit over QMP"
	case "host-signal":
		return "qemu received a termination signal"
	case "":
		return "qemu exited"
	}
	return fmt.Sprintf("qemu exited (shutdown reason %s)", v.shutdown)
}

// events follows QMP events until the connection ends.
func (v *VM) events(c *qmp.Client) {
	defer close(v.eventsDone)
	for ev := range c.Events() {
		switch ev.Name {
		case "DEVICE_DELETED":
			var d struct {
				Device string `json:"device"`
			}
			if json.Unmarshal(ev.Data, &d) != nil || d.Device == "" {
				continue
			}
			v.mu.Lock()
			if ch, ok := v.unplug[d.Device]; ok {
				close(ch)
				delete(v.unplug, d.Device)
			} else {
				// The guest powered the slot off itself; DetachDisk will only
				// have the backend to remove.
				v.ejected[d.Device] = true
				log.L.WithField("device", d.Device).Warn("the guest removed a disk device on its own")
			}
			v.mu.Unlock()
		case "SHUTDOWN":
			var d struct {
				Reason string `json:"reason"`
			}
			json.Unmarshal(ev.Data, &d)
			v.mu.Lock()
			v.shutdown = d.Reason
			v.mu.Unlock()
		case "GUEST_PANICKED":
			v.mu.Lock()
			v.panicked = true
			v.mu.Unlock()
		case "BLOCK_IO_ERROR":
			v.onBlockIOError(ev)
		case "STOP":
			// Asks QEMU why, and may wait before resuming: not in this loop.
			go v.onStop(c)
		}
	}
	if n := c.Dropped(); n > 0 {
		log.L.WithField("dropped", n).Warn("qemu sent more events than the shim could queue")
	}
}

// Stop quits QEMU (over QMP, then SIGKILL to its process group) and removes its files.
func (v *VM) Stop(ctx context.Context) error {
	v.mu.Lock()
	if !v.stopping {
		v.stopping = true
		close(v.stopCh) // a DetachDisk waiting for the guest gives up the lock
	}
	v.mu.Unlock()
	v.opMu.Lock()
	defer v.opMu.Unlock()
	v.mu.Lock()
	cmd, c := v.cmd, v.qmp
	if v.stopped {
		v.mu.Unlock()
		return nil
	}
	v.mu.Unlock()

	var err error
	if cmd != nil {
		select {
		case <-v.done:
		default:
			v.mu.Lock()
			v.ending = true
			v.mu.Unlock()
			graceful, cancel := context.WithTimeout(ctx, gracefulStop)
			if c != nil {
				// QEMU may exit before it answers; the connection error is expected.
				c.Execute(graceful, "quit", nil, nil)
			}
			select {
			case <-v.done:
			case <-graceful.Done():
				log.G(ctx).WithField("pid", cmd.Process.Pid).Warn("qemu did not quit, killing it")
			}
			cancel()
			v.kill()
			// Even with ctx over: SIGKILL takes effect at once unless QEMU is stuck
			// in the kernel, and the files must not go while it runs.
			select {
			case <-v.done:
			case <-time.After(killWait):
				err = fmt.Errorf("qemu (pid %d) still alive %v after SIGKILL: %w", cmd.Process.Pid, killWait, errdefs.ErrUnavailable)
			}
		}
		if c != nil {
			c.Close()
		}
	}
	if err != nil {
		return err
	}
	v.removeFiles()
	v.mu.Lock()
	v.stopped = true
	v.mu.Unlock()
	return err
}

// kill sends SIGKILL to QEMU's process group, unless QEMU was already reaped (then
// wait has done it).
func (v *VM) kill() {
	select {
	case <-v.done:
		return
	default:
	}
	syscall.Kill(-v.cmd.Process.Pid, syscall.SIGKILL)
}

// removeFiles removes the sockets and logs the VM created in the state dir (not the
// console log, which is the caller's).
func (v *VM) removeFiles() {
	for _, p := range []string{v.qmpSocket, v.agentSocket, v.stderrLog, v.jailRoot()} {
		os.Remove(p) // the jail root is an empty directory on the host
	}
}
