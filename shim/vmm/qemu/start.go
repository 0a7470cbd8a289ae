package qemu

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"syscall"
	"time"

	"github.com/containerd/errdefs"
	"github.com/containerd/log"

	"github.com/caisson-containers/caisson/shim/vmm"
	"github.com/caisson-containers/caisson/shim/vmm/qemu/accel"
	"github.com/caisson-containers/caisson/shim/vmm/qemu/qmp"
	"github.com/caisson-containers/caisson/shim/vmm/qemu/tsc"
)

// Start launches QEMU with the cold-plugged disks and connects to its QMP socket.
//
// It goes in steps: the accelerator, the command line with the descriptors QEMU
// inherits (the cold-plugged disks registered on the way), the state dir and QEMU's
// output pipes, the command (jailed or not), the launch, and the monitor (QMP), over
// which a VM from a template is restored. A failed step undoes the ones before it.
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
	bin, acc, err := v.accelerator(ctx)
	if err != nil {
		return err
	}
	l := &launch{}
	defer l.closePassed() // QEMU has its own copies once started
	defer func() {
		if retErr != nil {
			v.forgetColdDisks()
		}
	}()
	if err := v.prepareLaunch(ctx, l, acc); err != nil {
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
	out, err := v.openOutputs()
	if err != nil {
		return err
	}
	defer out.closeWriteEnds() // QEMU has its own copies once started
	l.extra = append(l.extra, out.consoleW)
	cmd, err := v.command(bin, l, acc)
	if err != nil {
		out.closeReadEnds()
		return err
	}
	log.G(ctx).WithField("args", l.args).Debug("starting qemu")
	if err := v.launch(cmd, out); err != nil {
		return err
	}
	defer func() {
		if retErr != nil {
			retErr = v.failedStart(retErr)
		}
	}()
	return v.connectQMP(ctx, l.cl.restoreFD)
}

// accelerator checks the boot files and chooses the accelerator: QEMU's binary, and kvm
// or tcg.
func (v *VM) accelerator(ctx context.Context) (bin, acc string, _ error) {
	for _, f := range []struct{ what, path string }{{"kernel", v.cfg.Kernel}, {"initramfs", v.cfg.Initramfs}} {
		if f.path == "" {
			continue
		}
		if _, err := os.Stat(f.path); err != nil {
			return "", "", fmt.Errorf("%s: %w: %w", f.what, errdefs.ErrNotFound, err)
		}
	}
	bin, err := v.qcfg.Binary()
	if err != nil {
		return "", "", err
	}
	opts := accel.Options{QEMU: bin, Kernel: v.cfg.Kernel}
	if v.qcfg.AccelCacheDir != "" {
		opts.Cache = &accel.Cache{Dir: v.qcfg.AccelCacheDir}
	}
	a, err := accel.Choose(ctx, accel.Mode(v.cfg.Accelerator), opts)
	if err != nil {
		return "", "", err
	}
	return bin, string(a), nil
}

// guestTSC is the TSC frequency a guest under TCG is given (package tsc): the host's,
// measured once per host boot. 0 if it cannot be measured: the guest then calibrates
// its TSC itself, which is usually right.
func (v *VM) guestTSC(ctx context.Context) uint64 {
	var khz uint64
	var err error
	if v.qcfg.AccelCacheDir != "" {
		khz, err = tsc.CachedKHz(v.qcfg.AccelCacheDir)
	} else {
		khz, err = tsc.MeasureKHz()
	}
	if err != nil {
		log.G(ctx).WithError(err).Warn("the host's TSC frequency is not known: the guest calibrates its own, which under TCG on a busy host can make its clock run many times too fast or slow")
		return 0
	}
	return khz
}

// launch is one start of QEMU: its command line and the descriptors it inherits.
type launch struct {
	cl   cmdline
	args []string
	// extra are the descriptors QEMU inherits, from firstNICFD on.
	extra []*os.File
	// passed are those of extra the shim opened for QEMU: closed once QEMU has its own.
	passed []*os.File
}

// pass has QEMU inherit f and returns its descriptor number in QEMU.
func (l *launch) pass(f *os.File) int {
	l.passed = append(l.passed, f)
	l.extra = append(l.extra, f)
	return firstNICFD + len(l.extra) - 1
}

func (l *launch) closePassed() {
	for _, f := range l.passed {
		f.Close()
	}
}

// prepareLaunch builds QEMU's command line into l with the descriptors it inherits: the
// NICs' taps, a template's state, and for a jailed QEMU, which gets descriptors
// instead of paths (jailed.go), the virtio-fs connection and the disks. The cold-plugged
// disks are registered as attached (forgetColdDisks undoes it).
func (v *VM) prepareLaunch(ctx context.Context, l *launch, acc string) error {
	l.cl = cmdline{vm: v.cfg, accel: acc, qemu: v.qcfg, qmpSocket: v.qmpSocket, agentSock: v.agentSocket,
		bridges: bridgesFor(v.cfg.HotplugSlots), jailed: v.jailed()}
	if acc == "tcg" {
		l.cl.tscKHz = v.guestTSC(ctx)
	}
	l.extra = nicFiles(v.cfg.NICs)
	if v.restoring() {
		state, err := v.openTemplateState()
		if err != nil {
			return err
		}
		l.cl.restoreFD = l.pass(state)
	}
	if fs := v.cfg.SharedFS; fs != nil && v.jailed() {
		f, err := dialSharedFS(fs.Socket)
		if err != nil {
			return err
		}
		l.cl.sharedFSFD = l.pass(f)
	}
	if err := v.addColdDisks(l); err != nil {
		return err
	}
	// The console pipe (openOutputs) is QEMU's last extra descriptor.
	l.cl.consoleFD = firstNICFD + len(l.extra)
	var err error
	l.args, err = l.cl.args()
	return err
}

// addColdDisks puts the cold-plugged disks on l's command line, disk i on root port i
// with device number i, and registers them as attached.
func (v *VM) addColdDisks(l *launch) error {
	l.cl.ports = len(v.coldDisks())
	for i, d := range v.coldDisks() {
		st, err := v.checkDisk(d)
		if err != nil {
			return err
		}
		size := st.Size()
		cd := coldDisk{disk: d, n: i, port: port(i), size: size}
		if v.jailed() {
			f, err := v.openDisk(d)
			if err != nil {
				return err
			}
			cd.fd = l.pass(f)
		}
		l.cl.disks = append(l.cl.disks, cd)
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
	return nil
}

// forgetColdDisks undoes addColdDisks after a failed start.
func (v *VM) forgetColdDisks() {
	v.mu.Lock()
	clear(v.disks)
	clear(v.used)
	v.mu.Unlock()
	v.nextDev = 0
}

// outputs are QEMU's two output pipes, its own (stdout and stderr, into qemu.log) and
// the guest console's, and the logs they are copied into.
type outputs struct {
	stderrR, stderrW   *os.File
	consoleR, consoleW *os.File
	stderrLog          *os.File
	consoleLog         *os.File
}

// openOutputs opens QEMU's output pipes and logs. Both go through a pipe into a bounded
// log (console.go): QEMU writing a file itself would let the guest fill /run, directly
// (the console) or by making QEMU print on every occurrence of some device error.
func (v *VM) openOutputs() (_ *outputs, retErr error) {
	o := &outputs{}
	defer func() {
		if retErr != nil {
			o.closeWriteEnds()
			o.closeReadEnds()
		}
	}()
	var err error
	if o.stderrLog, err = os.OpenFile(v.stderrLog, os.O_CREATE|os.O_RDWR|os.O_TRUNC, 0o600); err != nil {
		return nil, err
	}
	if o.stderrR, o.stderrW, err = os.Pipe(); err != nil {
		return nil, err
	}
	if o.consoleR, o.consoleW, err = os.Pipe(); err != nil {
		return nil, err
	}
	if o.consoleLog, err = os.OpenFile(v.cfg.ConsoleLog, os.O_CREATE|os.O_RDWR|os.O_TRUNC, 0o600); err != nil {
		return nil, err
	}
	return o, nil
}

// closeWriteEnds closes the shim's copies of the pipes' write ends: once QEMU has its
// own, the pipes must end when QEMU does, for the exit path (run) to see its last output
// at once.
func (o *outputs) closeWriteEnds() {
	for _, f := range []*os.File{o.stderrW, o.consoleW} {
		if f != nil {
			f.Close()
		}
	}
}

// closeReadEnds closes the read ends and the logs, when QEMU did not start.
func (o *outputs) closeReadEnds() {
	for _, f := range []*os.File{o.stderrR, o.stderrLog, o.consoleR, o.consoleLog} {
		if f != nil {
			f.Close()
		}
	}
}

// command is QEMU's command: jailed (jailed.go), or run as the shim's user with nothing
// of its environment; in its own process group, killed if the shim dies.
func (v *VM) command(bin string, l *launch, acc string) (*exec.Cmd, error) {
	var cmd *exec.Cmd
	if v.jailed() {
		if err := v.prepareJail(); err != nil {
			return nil, fmt.Errorf("qemu jail: %w", err)
		}
		var err error
		if cmd, err = v.jailCommand(bin, l.args, acc); err != nil {
			return nil, fmt.Errorf("qemu jail: %w", err)
		}
	} else {
		cmd = exec.Command(bin, l.args...)
		cmd.Env = []string{} // not nil: nothing of the shim's environment
		cmd.Dir = v.cfg.StateDir
		cmd.SysProcAttr = &syscall.SysProcAttr{}
	}
	cmd.ExtraFiles = l.extra
	cmd.SysProcAttr.Setpgid = true
	// Kill QEMU if the shim dies. The kernel sends it when the thread that forked
	// QEMU exits, so run keeps that thread until QEMU is reaped.
	cmd.SysProcAttr.Pdeathsig = syscall.SIGKILL
	return cmd, nil
}

// launch starts cmd, its output into out, and the goroutines that copy the output into
// the logs and wait for QEMU's exit (run).
func (v *VM) launch(cmd *exec.Cmd, out *outputs) error {
	cmd.Stdout = out.stderrW
	cmd.Stderr = out.stderrW
	startErr := make(chan error, 1)
	go v.run(cmd, startErr)
	if err := <-startErr; err != nil {
		out.closeReadEnds()
		close(v.stderrDone)
		return fmt.Errorf("starting qemu: %w", err)
	}
	out.closeWriteEnds()
	go copyConsole(out.consoleR, out.consoleLog, v.consoleDone)
	go copyQEMULog(out.stderrR, out.stderrLog, v.stderrDone)
	return nil
}

// failedStart ends a QEMU whose start failed after it was launched, and returns the
// error to report: if QEMU is exiting on its own (the monitor noticed first), its own
// words are the error; how the monitor noticed is noise.
func (v *VM) failedStart(err error) error {
	select {
	case <-v.done:
	case <-time.After(exitGrace):
		v.kill()
		<-v.done
		return err
	}
	if e := v.Wait(); e != nil {
		return fmt.Errorf("starting qemu: %w", e)
	}
	return err
}

// connectQMP connects to QEMU's monitor, follows its events and, for a VM from a
// template, restores the template's state from descriptor restoreFD.
func (v *VM) connectQMP(ctx context.Context, restoreFD int) error {
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
	log.G(ctx).WithField("pid", v.Pid()).Debug("qemu started")
	if v.restoring() {
		return v.restore(ctx, c, restoreFD)
	}
	return nil
}
