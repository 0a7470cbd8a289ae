// Package qemu runs a pod's VM with QEMU (q35): it implements vmm.VM.
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
	"bytes"
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
	unplug      map[string]chan struct{} // device id -> closed on DEVICE_DELETED
	ejected     map[string]bool          // devices the guest removed without DetachDisk
	diskErrs    diskErrors

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
	if cfg.StateDir == "" {
		return nil, fmt.Errorf("state dir not set: %w", errdefs.ErrInvalidArgument)
	}
	if cfg.Kernel == "" {
		return nil, fmt.Errorf("kernel not set: %w", errdefs.ErrInvalidArgument)
	}
	if cfg.VCPUs == 0 {
		cfg.VCPUs = 1
	}
	if cfg.MemoryMiB == 0 {
		cfg.MemoryMiB = 512
	}
	if cfg.MaxMemoryMiB == 0 {
		cfg.MaxMemoryMiB = cfg.MemoryMiB + 64<<10
	}
	if cfg.MaxMemoryMiB < cfg.MemoryMiB {
		return nil, fmt.Errorf("max memory %d MiB below memory %d MiB: %w", cfg.MaxMemoryMiB, cfg.MemoryMiB, errdefs.ErrInvalidArgument)
	}
	if cfg.VCPUs < 0 || cfg.MemoryMiB < 0 || cfg.HotplugSlots < 0 {
		return nil, fmt.Errorf("negative vcpus, memory or hot-plug slots: %w", errdefs.ErrInvalidArgument)
	}
	switch cfg.Accelerator {
	case "":
		cfg.Accelerator = string(accel.Auto)
	case string(accel.Auto), string(accel.ModeKVM), string(accel.ModeTCG):
	default:
		return nil, fmt.Errorf("accelerator %q: want auto, kvm or tcg: %w", cfg.Accelerator, errdefs.ErrInvalidArgument)
	}
	if cfg.ConsoleLog == "" {
		cfg.ConsoleLog = filepath.Join(cfg.StateDir, consoleLogName)
	}
	switch cfg.Agent.Transport {
	case "":
		cfg.Agent.Transport = vmm.TransportSerial
	case vmm.TransportSerial:
	case vmm.TransportVsock:
		if cfg.Agent.CID < 3 {
			return nil, fmt.Errorf("vsock cid %d: must be 3 or more: %w", cfg.Agent.CID, errdefs.ErrInvalidArgument)
		}
	default:
		return nil, fmt.Errorf("agent transport %q: %w", cfg.Agent.Transport, errdefs.ErrInvalidArgument)
	}
	if n := len(cfg.Disks); n > MaxColdDisks {
		return nil, fmt.Errorf("%d disks at start, at most %d: %w", n, MaxColdDisks, errdefs.ErrInvalidArgument)
	}
	if n := cfg.HotplugSlots; n > MaxHotplugSlots {
		return nil, fmt.Errorf("%d hot-plug slots, at most %d: %w", n, MaxHotplugSlots, errdefs.ErrInvalidArgument)
	}
	if qcfg.Path == "" {
		qcfg.Path = defaultBinary
	}
	if j := qcfg.Jail; j != nil {
		j := *j // the caller's stays as it was
		if j.User != "" {
			var err error
			if j.UID, j.GID, err = jail.LookupUser(j.User); err != nil {
				return nil, err
			}
		}
		if j.UID == 0 || j.GID == 0 {
			return nil, fmt.Errorf("jail user %d:%d: QEMU must not run as root: %w", j.UID, j.GID, errdefs.ErrInvalidArgument)
		}
		qcfg.Jail = &j
	}
	if qcfg.TCGTranslationCacheMiB < 0 {
		return nil, fmt.Errorf("tcg translation cache %d MiB: %w", qcfg.TCGTranslationCacheMiB, errdefs.ErrInvalidArgument)
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
	if t := cfg.Template; t != nil {
		switch {
		case t.Dir == "":
			return nil, fmt.Errorf("template dir not set: %w", errdefs.ErrInvalidArgument)
		case !t.Restore && (len(cfg.Disks) > 0 || len(cfg.NICs) > 0):
			return nil, fmt.Errorf("a template VM has no disks or NICs (the VMs made from it get theirs): %w", errdefs.ErrInvalidArgument)
		case t.Restore && len(cfg.Disks)+len(cfg.NICs) > cfg.HotplugSlots:
			return nil, fmt.Errorf("%d disks and %d NICs for a VM started from a template, which hot-plugs them, but %d hot-plug slots: %w",
				len(cfg.Disks), len(cfg.NICs), cfg.HotplugSlots, errdefs.ErrInvalidArgument)
		}
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

// Start launches QEMU with the cold-plugged disks and connects to its QMP socket.
func (v *VM) Start(ctx context.Context) (retErr error) {
	v.opMu.Lock()
	defer v.opMu.Unlock()
	v.mu.Lock()
	tried := v.startCalled || v.stopping
	v.startCalled = true
	v.mu.Unlock()
	if tried {
		return fmt.Errorf("vm already started or stopped: %w", errdefs.ErrFailedPrecondition)
	}
	defer func() {
		// Start is tried once. If QEMU never ran, nothing else closes Done.
		v.mu.Lock()
		defer v.mu.Unlock()
		if retErr != nil && v.cmd == nil {
			v.exitErr = &vmm.ExitError{Reason: "qemu did not start: " + retErr.Error()}
			close(v.done)
		}
	}()

	for _, f := range []struct{ what, path string }{{"kernel", v.cfg.Kernel}, {"initramfs", v.cfg.Initramfs}} {
		if f.path == "" {
			continue
		}
		if _, err := os.Stat(f.path); err != nil {
			return fmt.Errorf("%s: %w: %w", f.what, errdefs.ErrNotFound, err)
		}
	}
	bin, err := v.qcfg.Binary()
	if err != nil {
		return err
	}

	opts := accel.Options{QEMU: bin, Kernel: v.cfg.Kernel}
	if v.qcfg.AccelCacheDir != "" {
		opts.Cache = &accel.Cache{Dir: v.qcfg.AccelCacheDir}
	}
	acc, err := accel.Choose(ctx, accel.Mode(v.cfg.Accelerator), opts)
	if err != nil {
		return err
	}
	cl := cmdline{vm: v.cfg, accel: string(acc), qemu: v.qcfg, qmpSocket: v.qmpSocket, agentSock: v.agentSocket,
		bridges: bridgesFor(v.cfg.HotplugSlots), jailed: v.jailed()}
	extra := nicFiles(v.cfg.NICs)
	if v.restoring() {
		state, err := v.openTemplateState()
		if err != nil {
			return err
		}
		defer state.Close() // QEMU has its own copy once started
		extra = append(extra, state)
		cl.restoreFD = firstNICFD + len(extra) - 1
	}
	// Cold-plugged disk i gets port i and device number i.
	defer func() {
		if retErr != nil {
			v.mu.Lock()
			clear(v.disks)
			clear(v.used)
			v.mu.Unlock()
			v.nextDev = 0
		}
	}()
	// A jailed QEMU gets descriptors instead of paths (jailed.go); the shim's copies
	// close once QEMU has its own.
	var passed []*os.File
	defer func() {
		for _, f := range passed {
			f.Close()
		}
	}()
	pass := func(f *os.File) int {
		passed = append(passed, f)
		extra = append(extra, f)
		return firstNICFD + len(extra) - 1
	}
	if fs := v.cfg.SharedFS; fs != nil && v.jailed() {
		f, err := dialSharedFS(fs.Socket)
		if err != nil {
			return err
		}
		cl.sharedFSFD = pass(f)
	}
	cl.ports = len(v.coldDisks())
	for i, d := range v.coldDisks() {
		st, err := v.checkDisk(d)
		if err != nil {
			return err
		}
		size := st.Size()
		p := port(i)
		cd := coldDisk{disk: d, n: i, port: p, size: size}
		if v.jailed() {
			f, err := v.openDisk(d)
			if err != nil {
				return err
			}
			cd.fd = pass(f)
		}
		cl.disks = append(cl.disks, cd)
		be, dev, addr := diskDevices(d, i, v.slots[i], size)
		v.mu.Lock()
		v.disks[d.ID] = &disk{Disk: d, file: st, devID: dev["id"].(string), slot: i, addr: addr, backend: be}
		if d.Kind == vmm.Block && cd.fd != 0 {
			fdset := cd.fd // the set is named after the descriptor (cmdline.go)
			v.disks[d.ID].fdset = &fdset
		}
		v.used[i] = true
		v.mu.Unlock()
		v.nextDev = i + 1
	}
	// The console pipe (below) is QEMU's last extra descriptor.
	cl.consoleFD = firstNICFD + len(extra)
	args, err := cl.args()
	if err != nil {
		return err
	}

	if err := os.MkdirAll(v.cfg.StateDir, 0o700); err != nil {
		return err
	}
	v.removeFiles() // leftovers of a crashed shim
	defer func() {
		if retErr != nil {
			v.removeFiles()
		}
	}()
	// QEMU's output goes through a pipe into a bounded log, like the console: a guest
	// may make QEMU print on every occurrence of some device error.
	stderrLog, err := os.OpenFile(v.stderrLog, os.O_CREATE|os.O_RDWR|os.O_TRUNC, 0o600)
	if err != nil {
		return err
	}
	stderrR, stderr, err := os.Pipe()
	if err != nil {
		stderrLog.Close()
		return err
	}
	defer stderr.Close() // QEMU has its own copy once started
	// The guest console goes through a pipe into a bounded log (console.go); QEMU
	// writing the file itself would let the guest fill /run.
	consoleR, consoleW, err := os.Pipe()
	if err != nil {
		stderrR.Close()
		stderrLog.Close()
		return err
	}
	defer consoleW.Close() // QEMU has its own copy once started
	consoleLog, err := os.OpenFile(v.cfg.ConsoleLog, os.O_CREATE|os.O_RDWR|os.O_TRUNC, 0o600)
	if err != nil {
		consoleR.Close()
		stderrR.Close()
		stderrLog.Close()
		return err
	}
	extra = append(extra, consoleW)

	var cmd *exec.Cmd
	if v.jailed() {
		if err := v.prepareJail(); err != nil {
			return fmt.Errorf("qemu jail: %w", err)
		}
		if cmd, err = v.jailCommand(bin, args, string(acc)); err != nil {
			return fmt.Errorf("qemu jail: %w", err)
		}
	} else {
		cmd = exec.Command(bin, args...)
		cmd.Env = []string{} // not nil: nothing of the shim's environment
		cmd.Dir = v.cfg.StateDir
		cmd.SysProcAttr = &syscall.SysProcAttr{}
	}
	cmd.Stdout = stderr
	cmd.Stderr = stderr
	cmd.ExtraFiles = extra
	cmd.SysProcAttr.Setpgid = true
	// Kill QEMU if the shim dies. The kernel sends it when the thread that forked
	// QEMU exits, so run keeps that thread until QEMU is reaped.
	cmd.SysProcAttr.Pdeathsig = syscall.SIGKILL
	log.G(ctx).WithField("args", args).Debug("starting qemu")
	startErr := make(chan error, 1)
	go v.run(cmd, startErr)
	if err := <-startErr; err != nil {
		consoleR.Close()
		consoleLog.Close()
		stderrR.Close()
		stderrLog.Close()
		close(v.stderrDone)
		return fmt.Errorf("starting qemu: %w", err)
	}
	// QEMU has its own copies: the pipes must end when QEMU does, for the exit path
	// (run) to see its last output at once.
	stderr.Close()
	consoleW.Close()
	go copyConsole(consoleR, consoleLog, v.consoleDone)
	go copyQEMULog(stderrR, stderrLog, v.stderrDone)

	defer func() {
		if retErr == nil {
			return
		}
		// If QEMU is exiting on its own (the monitor noticed first), its own words
		// are the error; how the monitor noticed is noise.
		select {
		case <-v.done:
		case <-time.After(exitGrace):
			v.kill()
			<-v.done
			return
		}
		if e := v.Wait(); e != nil {
			retErr = fmt.Errorf("starting qemu: %w", e)
		}
	}()

	conn, err := v.dialQMP(ctx)
	if err != nil {
		return err
	}
	c, err := qmp.New(ctx, conn)
	if err != nil {
		return fmt.Errorf("qemu monitor: %w", err)
	}
	v.mu.Lock()
	v.qmp = c
	v.mu.Unlock()
	go v.events(c)
	log.G(ctx).WithField("pid", cmd.Process.Pid).Debug("qemu started")
	if v.restoring() {
		return v.restore(ctx, c, cl.restoreFD)
	}
	return nil
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
		v.exitErr = &vmm.ExitError{Reason: v.exitReason(err), Log: tail(v.stderrLog)}
	}
	v.mu.Unlock()
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

// tail returns the end of file path, trimmed, or "".
func tail(path string) string {
	f, err := os.Open(path)
	if err != nil {
		return ""
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return ""
	}
	off := max(st.Size()-stderrTail, 0)
	b := make([]byte, st.Size()-off)
	n, _ := f.ReadAt(b, off)
	return string(bytes.TrimSpace(b[:n]))
}
