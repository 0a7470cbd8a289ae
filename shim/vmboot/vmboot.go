// Package vmboot starts a VM through a vmm.Hypervisor and connects to the agent inside
// it: the steps a pod's VM and a template's VM share. Boot makes the VM, starts it, dials
// the agent's channel, opens the ttrpc client (with the caller's interceptors), waits
// for the agent's first answer and checks it speaks this shim's API. The wait ends when
// the agent answers, the VM dies, or the boot timeout passes, whichever comes first; the
// error then quotes the end of the guest's console, where a guest that did not come up
// says why.
//
// Boot knows nothing of pods or templates: what a VM boots with (disks, NICs, a
// template) is its vmm.Config, what the caller does once the VMM runs (cgroups, taps)
// is Options.Started.
package vmboot

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/containerd/errdefs"
	"github.com/containerd/errdefs/pkg/errgrpc"
	"github.com/containerd/log"
	"github.com/containerd/ttrpc"

	agent "github.com/caisson-containers/caisson/api/agent/v1"
	"github.com/caisson-containers/caisson/internal/logtail"
	"github.com/caisson-containers/caisson/internal/transport"
	"github.com/caisson-containers/caisson/shim/vmm"
)

// DefaultTimeout bounds how long the agent may take to answer after the VMM starts: a
// few seconds under TCG on a loaded machine, well under one with KVM.
const DefaultTimeout = 60 * time.Second

// consoleTail is how much of the guest console a boot error quotes.
const consoleTail = 2048

// exitGrace is how long a failed connection waits for the VM's exit to be noticed.
const exitGrace = time.Second

// Options say how to boot.
type Options struct {
	// Timeout bounds the wait for the agent, from the VMM's start (0: DefaultTimeout).
	Timeout time.Duration
	// Started, if set, runs once the VMM runs and before the agent is dialed, e.g. to
	// move the VMM's process into a cgroup while the guest is still small. An error
	// fails the boot.
	Started func(vm vmm.VM) error
	// ClientOpts are the ttrpc client's options (interceptors).
	ClientOpts []ttrpc.ClientOpts
	// DevicesReady makes the agent's first answer wait until its background start
	// (drivers, cgroup controllers) is over: a template is saved only then.
	DevicesReady bool
}

// Guest is a running VM and the connection to its agent.
type Guest struct {
	VM vmm.VM
	// Session carries the ttrpc client and the containers' stdio.
	Session transport.Session
	Client  *ttrpc.Client
	// Agent is the agent's own account of itself (its version, the guest kernel's).
	Agent *agent.VersionResponse
}

// Close hangs up on the agent; the VM runs on.
func (g *Guest) Close() error {
	return errors.Join(g.Client.Close(), g.Session.Close())
}

// Boot makes a VM of cfg on hv, starts it and connects to its agent. On error nothing is
// left: the VM is stopped.
func Boot(ctx context.Context, hv vmm.Hypervisor, cfg vmm.Config, o Options) (_ *Guest, retErr error) {
	vm, err := hv.New(cfg)
	if err != nil {
		return nil, err
	}
	if err := vm.Start(ctx); err != nil {
		return nil, fmt.Errorf("start VM: %w", err)
	}
	defer func() {
		if retErr != nil {
			if err := vm.Stop(context.WithoutCancel(ctx)); err != nil {
				log.G(ctx).WithError(err).Warn("stopping a VM that did not boot")
			}
		}
	}()
	if o.Started != nil {
		if err := o.Started(vm); err != nil {
			return nil, err
		}
	}
	return connect(ctx, vm, consoleLog(cfg), o)
}

// consoleLog is where a VM of cfg writes its console (vmm.Config's default).
func consoleLog(cfg vmm.Config) string {
	if cfg.ConsoleLog != "" {
		return cfg.ConsoleLog
	}
	return filepath.Join(cfg.StateDir, "console.log")
}

// connect connects to the agent of vm, started, whose guest console is in the file
// console, which errors quote. On error the caller still owns vm; the session is closed.
func connect(parent context.Context, vm vmm.VM, console string, o Options) (_ *Guest, retErr error) {
	timeout := o.Timeout
	if timeout == 0 {
		timeout = DefaultTimeout
	}
	ctx, cancel := context.WithTimeout(parent, timeout)
	defer cancel()
	// A VM that dies while booting ends the wait at once.
	go func() {
		select {
		case <-vm.Done():
			cancel()
		case <-ctx.Done():
		}
	}()
	fail := func(err error) error { return bootError(parent, ctx, vm, timeout, console, err) }
	ep := vm.Endpoint()
	if ep.Transport != vmm.TransportSerial {
		return nil, fmt.Errorf("agent channel %q: %w", ep.Transport, errdefs.ErrNotImplemented)
	}
	s, err := transport.DialSerial(ctx, ep.Path)
	if err != nil {
		return nil, fail(err)
	}
	defer func() {
		if retErr != nil {
			s.Close()
		}
	}()
	c, err := transport.OpenTTRPC(ctx, s, o.ClientOpts...)
	if err != nil {
		return nil, fail(err)
	}
	g := &Guest{VM: vm, Session: s, Client: c}
	defer func() {
		if retErr != nil {
			c.Close()
		}
	}()
	// Check and Version go out at once, on the one connection, and the agent answers
	// both as soon as it serves: one round trip to "agent ready" instead of two.
	sandbox := agent.NewSandboxClient(c)
	var versionErr error
	versioned := make(chan struct{})
	go func() {
		defer close(versioned)
		g.Agent, versionErr = sandbox.Version(ctx, &agent.VersionRequest{})
	}()
	check, err := sandbox.Check(ctx, &agent.CheckRequest{DevicesReady: o.DevicesReady})
	if err != nil {
		err = fail(errgrpc.ToNative(err)) // before cancel: it says whether the wait timed out
		cancel()                          // ends Version's wait too
		<-versioned
		return nil, err
	}
	<-versioned
	if versionErr != nil {
		return nil, fmt.Errorf("agent version: %w", errgrpc.ToNative(versionErr))
	}
	if v := g.Agent; v.GetApiVersion() != agent.APIVersion {
		return nil, fmt.Errorf("the guest agent (%s) speaks API %q, this shim %q: rebuild the guest image (make guest): %w",
			v.GetAgentVersion(), v.GetApiVersion(), agent.APIVersion, errdefs.ErrFailedPrecondition)
	}
	log.G(ctx).WithFields(log.Fields{
		"agent": g.Agent.GetAgentVersion(), "kernel": g.Agent.GetKernelRelease(), "guest_uptime": time.Duration(check.GetUptimeNs()),
	}).Debug("agent ready")
	return g, nil
}

// bootError says why the agent did not answer: the VM ended, the caller gave up (parent
// ended), the boot took longer than timeout (ctx ended), or the agent refused; with the
// end of the guest's console, where the guest says why.
func bootError(parent, ctx context.Context, vm vmm.VM, timeout time.Duration, console string, err error) error {
	if ended(ctx, vm) {
		return fmt.Errorf("VM ended while booting: %w%s", vm.Wait(), consoleEnd(console))
	}
	tail := consoleEnd(console)
	switch {
	case parent.Err() != nil:
		if !errors.Is(err, parent.Err()) {
			err = fmt.Errorf("%w: %w", parent.Err(), err)
		}
		return fmt.Errorf("boot abandoned: %w%s", err, tail)
	case ctx.Err() != nil:
		return fmt.Errorf("agent did not answer within %s: %w%s", timeout, err, tail)
	}
	return fmt.Errorf("agent: %w%s", err, tail)
}

// ended reports whether vm has ended. A guest that dies resets the agent's channel a
// moment before the VMM's exit is noticed: unless ctx is over already (the VM's end
// cancels it), wait a little for it, so that the error says why the VM ended.
func ended(ctx context.Context, vm vmm.VM) bool {
	select {
	case <-vm.Done():
		return true
	default:
	}
	if ctx.Err() != nil {
		return false
	}
	select {
	case <-vm.Done():
		return true
	case <-time.After(exitGrace):
		return false
	}
}

// consoleEnd is the last lines of the console log at path, as an error's suffix naming
// the file, or "".
func consoleEnd(path string) string {
	if path == "" {
		return ""
	}
	if _, err := os.Stat(path); err != nil {
		return ""
	}
	b := logtail.Read(path, consoleTail)
	if b == "" {
		return fmt.Sprintf(" (console %s: empty)", path)
	}
	return fmt.Sprintf(" (console %s ends with:\n%s)", path, b)
}
