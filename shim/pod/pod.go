// Package pod is one Caisson VM as the shim sees it: the VM, the session to the
// agent inside it, the agent's API clients, and the storages (layer and
// writable images) attached to it, shared by the pod's containers.
package pod

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/containerd/errdefs"
	"github.com/containerd/errdefs/pkg/errgrpc"
	"github.com/containerd/log"
	"github.com/containerd/ttrpc"
	"google.golang.org/protobuf/types/known/timestamppb"

	agent "github.com/caisson-containers/caisson/api/agent/v1"
	"github.com/caisson-containers/caisson/internal/transport"
	"github.com/caisson-containers/caisson/shim/config"
	"github.com/caisson-containers/caisson/shim/vmm"
	"github.com/caisson-containers/caisson/shim/vmm/qemu"
)

// BootTimeout bounds how long the agent may take to answer after QEMU starts:
// a few seconds under TCG on a loaded machine, well under one with KVM.
const BootTimeout = 60 * time.Second

// Options describe the pod being started.
type Options struct {
	// ID names the pod (the sandbox id, or the container id of a lone container).
	ID string
	// StateDir is where the VM keeps its sockets and logs; removed by Stop.
	StateDir string
	// Hostname of the pod.
	Hostname string
	// SharePID gives all containers one PID namespace.
	SharePID bool
}

// Pod is a running VM with its agent.
type Pod struct {
	id       string
	cfg      config.Config
	stateDir string
	vm       vmm.VM
	session  transport.Session
	client   *ttrpc.Client

	Sandbox    agent.SandboxService
	Containers agent.ContainersClient
	Exec       agent.ExecService
	IO         agent.IOService
	storage    agent.StorageService

	mu       sync.Mutex
	storages map[string]*attached // by host file
}

// Start boots the VM and waits for its agent; on error nothing is left behind.
func Start(ctx context.Context, cfg config.Config, o Options) (_ *Pod, retErr error) {
	if err := os.MkdirAll(o.StateDir, 0o700); err != nil {
		return nil, err
	}
	defer func() {
		if retErr != nil {
			os.RemoveAll(o.StateDir)
		}
	}()
	if cfg.Guest.Transport == "vsock" {
		return nil, fmt.Errorf("guest.transport = vsock is not supported by this shim yet (no vhost-vsock host to test it on): %w", errdefs.ErrNotImplemented)
	}
	params := []string{transport.CmdlineKey + "=" + transport.Endpoint{Kind: transport.Serial}.String()}
	if cfg.Guest.KernelParams != "" {
		params = append(params, cfg.Guest.KernelParams)
	}
	vm, err := qemu.New(vmm.Config{
		Kernel:       cfg.Guest.Kernel,
		Initramfs:    cfg.Guest.Initramfs,
		KernelParams: params,
		VCPUs:        cfg.Hypervisor.VCPUs,
		MemoryMiB:    cfg.Hypervisor.MemoryMiB,
		Accelerator:  cfg.Hypervisor.Accelerator,
		StateDir:     filepath.Join(o.StateDir, "vm"),
		ConsoleLog:   filepath.Join(o.StateDir, "console.log"),
		Agent:        vmm.AgentChannel{Transport: vmm.TransportSerial},
		HotplugSlots: cfg.Hypervisor.HotplugSlots,
	}, qemu.Config{
		Path:                   cfg.Hypervisor.Path,
		TCGTranslationCacheMiB: cfg.Hypervisor.TCGTranslationCacheMiB,
		AccelCacheDir:          filepath.Join(cfg.StateDir, "probes"),
	})
	if err != nil {
		return nil, err
	}
	if err := vm.Start(ctx); err != nil {
		return nil, fmt.Errorf("start VM: %w", err)
	}
	p := &Pod{id: o.ID, cfg: cfg, stateDir: o.StateDir, vm: vm, storages: map[string]*attached{}}
	defer func() {
		if retErr != nil {
			p.Stop(context.WithoutCancel(ctx))
		}
	}()
	if err := p.connect(ctx); err != nil {
		return nil, err
	}
	_, err = p.Sandbox.Create(ctx, &agent.CreateSandboxRequest{
		SandboxId: o.ID,
		Hostname:  o.Hostname,
		SharePid:  o.SharePID,
		Time:      timestamppb.Now(),
	})
	if err != nil {
		return nil, fmt.Errorf("create sandbox in the guest: %w", errgrpc.ToNative(err))
	}
	return p, nil
}

// connect dials the agent and waits until it serves, or the VM dies, or the boot timeout.
func (p *Pod) connect(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, BootTimeout)
	defer cancel()
	go func() {
		select {
		case <-p.vm.Done():
			cancel()
		case <-ctx.Done():
		}
	}()
	ep := p.vm.Endpoint()
	s, err := transport.DialSerial(ctx, ep.Path)
	if err != nil {
		return err
	}
	p.session = s
	c, err := transport.OpenTTRPC(ctx, s)
	if err != nil {
		return p.bootError(err)
	}
	p.client = c
	p.Sandbox = agent.NewSandboxClient(c)
	p.Containers = agent.NewContainersClient(c)
	p.Exec = agent.NewExecClient(c)
	p.IO = agent.NewIOClient(c)
	p.storage = agent.NewStorageClient(c)
	if _, err := p.Sandbox.Check(ctx, &agent.CheckRequest{}); err != nil {
		return p.bootError(err)
	}
	return nil
}

func (p *Pod) bootError(err error) error {
	select {
	case <-p.vm.Done():
		return fmt.Errorf("VM ended while booting: %w (console: %s)", p.vm.Wait(), p.ConsoleLog())
	default:
	}
	return fmt.Errorf("agent did not answer within %s: %w (console: %s)", BootTimeout, err, p.ConsoleLog())
}

// Session is the transport session, for stdio connections.
func (p *Pod) Session() transport.Session { return p.session }

// Done is closed when the VM has ended, for whatever reason.
func (p *Pod) Done() <-chan struct{} { return p.vm.Done() }

// Err says why the VM ended (after Done).
func (p *Pod) Err() error { return p.vm.Wait() }

// Pid is QEMU's pid.
func (p *Pod) Pid() int { return p.vm.Pid() }

// ConsoleLog is the guest console's log file.
func (p *Pod) ConsoleLog() string { return filepath.Join(p.stateDir, "console.log") }

// Stop tears the pod down: asks the agent to destroy the sandbox (best effort),
// stops the VM and removes the state directory. It is safe to call twice.
func (p *Pod) Stop(ctx context.Context) error {
	if p.client != nil {
		dctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		if _, err := p.Sandbox.Destroy(dctx, &agent.DestroySandboxRequest{}); err != nil {
			log.G(ctx).WithError(err).Debug("sandbox destroy")
		}
		cancel()
		p.client.Close()
	}
	if p.session != nil {
		p.session.Close()
	}
	err := p.vm.Stop(ctx)
	if rerr := os.RemoveAll(p.stateDir); rerr != nil {
		err = errors.Join(err, rerr)
	}
	return err
}
