// Package pod is one Caisson VM as the shim sees it: the VM, the session to the
// agent inside it, the agent's API clients, and the storages (layer and
// writable images) attached to it, shared by the pod's containers.
//
// The VM comes from the vmm.Hypervisor the caller gives (Options.Hypervisor): the pod
// knows the VMM through package vmm only, and boots the VM and reaches its agent
// through package vmboot. Start attaches the first container's rootfs while the VM
// boots (its disks on the VM's command line); AttachRootfs hot-plugs later ones'.
package pod

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	"github.com/containerd/log"
	"github.com/containerd/ttrpc"

	agent "github.com/caisson-containers/caisson/api/agent/v1"
	"github.com/caisson-containers/caisson/internal/rootfs"
	"github.com/caisson-containers/caisson/internal/transport"
	"github.com/caisson-containers/caisson/shim/config"
	"github.com/caisson-containers/caisson/shim/network"
	"github.com/caisson-containers/caisson/shim/template"
	"github.com/caisson-containers/caisson/shim/virtiofs"
	"github.com/caisson-containers/caisson/shim/vmboot"
	"github.com/caisson-containers/caisson/shim/vmm"
)

// BootTimeout bounds how long the agent may take to answer after the VMM starts:
// a few seconds under TCG on a loaded machine, well under one with KVM.
const BootTimeout = vmboot.DefaultTimeout

// Options describe the pod being started.
type Options struct {
	// ID names the pod (the sandbox id, or the container id of a lone container).
	ID string
	// StateDir is where the VM keeps its sockets and logs; removed by Stop.
	StateDir string
	// Hostname of the pod.
	Hostname string
	// NetNS is the host network namespace CNI set up for the pod: the one the CRI's
	// sandbox container names in its spec, or one the shim made for the hooks of a
	// container that asked for a new one (nerdctl's, see shim/task/hooks.go). Each of its
	// veths is connected to a guest NIC with the veth's MAC, addresses, routes and MTU
	// (see package shim/network). Empty: the guest has loopback only.
	NetNS string
	// Cgroup is the cgroup the pod's QEMU and virtiofsd run in, with the VM's limits
	// (cgroup.go): the one the CRI gave the pod's sandbox container, so that the pod's
	// accounting sees the VM, or a lone container's cgroupsPath. Empty: one of the
	// shim's own.
	Cgroup string
	// NewCgroup makes the cgroup the pod's host processes run in. Nil: HostCgroup;
	// NoCgroup for a pod on a test's fake VMM run without root.
	NewCgroup CgroupFunc
	// DNS and Hosts fill the guest's resolv.conf and /etc/hosts (besides localhost).
	DNS   *agent.DNS
	Hosts []*agent.HostEntry
	// Rootfs is the rootfs of the pod's first container (for a CRI pod, the pause
	// container), if known: the VM boots with its devices attached (no hot-plug), the
	// agent mounts them while it creates the sandbox, and Start returns it attached.
	Rootfs *rootfs.Plan
	// Hypervisor makes the pod's VM (required).
	Hypervisor vmm.Hypervisor
	// BaseSize is the runtime configuration's VM size before the pod's additions (its
	// annotations and CRI resources): a pod from a VM template (hypervisor.template)
	// starts from the template made at this size and grows to cfg's, so that pods of
	// every size share one template. Zero: cfg's size.
	BaseSize vmm.Size
}

// Rootfs is a container's rootfs attached to the pod: the agent's description of it for
// Containers.Create, and Release, which detaches what only it used (call it once the
// container is gone from the guest). The zero Rootfs is none.
type Rootfs struct {
	Agent   *agent.Rootfs
	Release func(context.Context) error
}

// TemplatesDir is where, under the runtime's state dir, the VM templates are kept
// (hypervisor.template).
const TemplatesDir = "templates"

// entropy is what the guest mixes into its random pool at sandbox creation: a VM made
// from a template starts with the template's pool.
func entropy() []byte {
	b := make([]byte, 64)
	rand.Read(b) // never fails (crypto/rand)
	return b
}

// vmConfig is the VM of a pod whose state is in stateDir, without its disks and NICs.
func vmConfig(cfg config.Config, stateDir string) vmm.Config {
	params := []string{transport.CmdlineKey + "=" + transport.Endpoint{Kind: transport.Serial}.String()}
	// Every console line costs the boot time under TCG (an emulated UART): print the
	// kernel's messages only when asked.
	if cfg.Guest.DebugConsole {
		params = append(params, "loglevel=7")
	} else {
		params = append(params, "quiet")
	}
	if cfg.Guest.KernelParams != "" {
		params = append(params, cfg.Guest.KernelParams)
	}
	return vmm.Config{
		Kernel:       cfg.Guest.Kernel,
		Initramfs:    cfg.Guest.Initramfs,
		KernelParams: params,
		VCPUs:        cfg.Hypervisor.VCPUs,
		MemoryMiB:    cfg.Hypervisor.MemoryMiB,
		// Room to grow (Pod.Grow) up to the host's limits, and for PMEM disks, which
		// take their size from the same address space.
		MaxVCPUs:     cfg.Hypervisor.MaxVCPUs,
		MaxMemoryMiB: cfg.Hypervisor.MaxMemoryMiB + 64<<10,
		Accelerator:  cfg.Hypervisor.Accelerator,
		StateDir:     filepath.Join(stateDir, "vm"),
		ConsoleLog:   filepath.Join(stateDir, "console.log"),
		Agent:        vmm.AgentChannel{Transport: vmm.TransportSerial},
		HotplugSlots: cfg.Hypervisor.HotplugSlots,
	}
}

// Template returns the VM template of cfg's pod VMs on hv (hypervisor.template), making
// it if there is none yet.
func Template(ctx context.Context, cfg config.Config, hv vmm.Hypervisor) (string, error) {
	t, err := templateOf(ctx, cfg, hv)
	if err != nil {
		return "", err
	}
	return t.Dir, nil
}

// templateOf is the VM template of cfg's pod VMs on hv, made if there is none yet, as a
// VM restored from it starts with it: with the template's storages' disks (the kernel
// modules image, mounted in the template).
func templateOf(ctx context.Context, cfg config.Config, hv vmm.Hypervisor) (*vmm.Template, error) {
	vcfg := vmConfig(cfg, "")
	vcfg.StateDir, vcfg.ConsoleLog = "", ""
	storages := templateStorages(ctx, cfg)
	dir, err := template.Get(ctx, TemplatesRoot(cfg), hv, vcfg, storages...)
	if err != nil {
		return nil, err
	}
	t := &vmm.Template{Dir: dir, Restore: true}
	for _, st := range storages {
		t.Disks = append(t.Disks, st.Disk)
	}
	return t, nil
}

// TemplatesRoot is where cfg's VM templates are kept.
func TemplatesRoot(cfg config.Config) string { return filepath.Join(cfg.StateDir, TemplatesDir) }

// Pod is a running VM with its agent.
type Pod struct {
	cfg      config.Config
	stateDir string
	// warmDir is the state directory of the warm VM the pod started in (Warm), if it
	// did: the VM's own, apart from the pod's; removed by Stop with the pod's.
	warmDir string
	// modulesIn: the VM came with the kernel modules image mounted (a booted warm VM).
	modulesIn bool
	vm        vmm.VM
	net       *network.Network
	// cgroup holds QEMU and virtiofsd; removed by Stop once they have exited.
	cgroup Cgroup
	// warmCgroup is the cgroup of the warm VM the pod started in, if it could not be
	// removed when the pod moved the VM into its own: Stop tries again.
	warmCgroup Cgroup
	session    transport.Session
	client     *ttrpc.Client
	// calls puts deadlines on the agent's calls and tells whether the guest answers.
	calls *deadlines
	// killed is set by Kill: the VM was ended on purpose, its processes by SIGKILL.
	killed atomic.Bool

	Sandbox    agent.SandboxService
	Containers agent.ContainersClient
	Exec       agent.ExecService
	IO         agent.IOService
	storage    agent.StorageService

	mu       sync.Mutex
	storages map[string]*attached // by host file

	// fs shares host paths with the guest (nil: guest.shared_fs is copy, or a template
	// VM); sharedGuest is where the guest mounts them.
	fs          *virtiofs.Daemon
	sharedGuest string
	stopping    atomic.Bool

	// base is Options.BaseSize; size the VM's size now (resize.go).
	base   vmm.Size
	sizeMu sync.Mutex
	size   vmm.Size
}

// Session is the transport session, for stdio connections.
func (p *Pod) Session() transport.Session { return p.session }

// Done is closed when the VM has ended, for whatever reason.
func (p *Pod) Done() <-chan struct{} { return p.vm.Done() }

// Err says why the VM ended (after Done).
func (p *Pod) Err() error { return p.vm.Wait() }

// Pid is the VMM's process id.
func (p *Pod) Pid() int { return p.vm.Pid() }

// VCPUTime is how long the VM's vCPUs have run on the host so far (vmm.VM.VCPUTime).
func (p *Pod) VCPUTime() (time.Duration, error) { return p.vm.VCPUTime() }

// NetNS is the host network namespace the pod's NICs come from ("" if it has none).
func (p *Pod) NetNS() string {
	if p.net == nil {
		return ""
	}
	return p.net.NetNS
}

// Interfaces are the names of the veths, in NetNS, connected to the pod's NICs.
func (p *Pod) Interfaces() []string {
	if p.net == nil {
		return nil
	}
	var names []string
	for _, i := range p.net.Interfaces {
		names = append(names, i.Name)
	}
	return names
}

// ConsoleLog is the guest console's log file.
func (p *Pod) ConsoleLog() string { return filepath.Join(p.stateDir, "console.log") }

// Stop tears the pod down: asks the agent to destroy the sandbox (best effort),
// stops the VM and removes the state directory. It is safe to call twice, and on a
// pod whose Start failed half-way (Start's own cleanup).
func (p *Pod) Stop(ctx context.Context) error {
	p.stopping.Store(true)
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
	var err error
	if p.vm != nil { // nil: a Start that failed before the VM
		err = p.vm.Stop(ctx)
	}
	if p.net != nil {
		if nerr := p.net.Close(); nerr != nil {
			err = errors.Join(err, fmt.Errorf("pod network: %w", nerr))
		}
	}
	if p.fs != nil {
		if ferr := p.fs.Close(ctx); ferr != nil {
			err = errors.Join(err, fmt.Errorf("shared directory: %w", ferr))
		}
	}
	// After QEMU and virtiofsd have exited.
	if p.cgroup != nil {
		if cerr := p.cgroup.Remove(ctx); cerr != nil {
			err = errors.Join(err, fmt.Errorf("pod cgroup: %w", cerr))
		}
	}
	if p.warmCgroup != nil {
		if cerr := p.warmCgroup.Remove(ctx); cerr != nil {
			err = errors.Join(err, fmt.Errorf("the warm VM's cgroup: %w", cerr))
		}
	}
	// Whatever happened above, nothing shared may be under the state directory when
	// it is removed: a share is a host path (a volume), not the pod's.
	if uerr := virtiofs.Unmount(filepath.Join(p.stateDir, SharedDirName)); uerr != nil {
		return errors.Join(err, uerr)
	}
	for _, dir := range []string{p.warmDir, p.stateDir} {
		if dir == "" {
			continue
		}
		if rerr := os.RemoveAll(dir); rerr != nil {
			err = errors.Join(err, rerr)
		}
	}
	return err
}

// Kill ends the VM at once, without a word to the guest: for a guest that does not answer
// (a SIGKILL it cannot be asked to deliver). Its processes die with it, as if SIGKILLed
// (Killed says so). Calls to the agent in flight, Wait among them, end. Stop is still
// needed to release the rest (network, cgroup, state directory).
func (p *Pod) Kill(ctx context.Context) error {
	p.killed.Store(true)
	// A context already over makes vm.Stop skip its graceful quit (QMP, which a stopped
	// QEMU would not answer) and go straight to SIGKILL, which even a stopped QEMU obeys.
	kctx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	cancel()
	err := p.vm.Stop(kctx)
	// After the VM is gone, so that a Wait that fails with the client finds Done closed.
	if p.client != nil {
		p.client.Close()
	}
	if p.session != nil {
		p.session.Close()
	}
	return err
}

// Killed reports whether Kill ended the VM.
func (p *Pod) Killed() bool { return p.killed.Load() }

// Silent reports whether the guest ran out of the deadline of the last call to it that
// ended: it has not answered since.
func (p *Pod) Silent() bool { return p.calls != nil && p.calls.silent() }
