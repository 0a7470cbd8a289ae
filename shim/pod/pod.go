// Package pod is one Caisson VM as the shim sees it: the VM, the session to the
// agent inside it, the agent's API clients, and the storages (layer and
// writable images) attached to it, shared by the pod's containers.
package pod

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/containerd/errdefs"
	"github.com/containerd/errdefs/pkg/errgrpc"
	"github.com/containerd/log"
	"github.com/containerd/ttrpc"
	"google.golang.org/protobuf/types/known/timestamppb"

	agent "github.com/caisson-containers/caisson/api/agent/v1"
	"github.com/caisson-containers/caisson/internal/rootfs"
	"github.com/caisson-containers/caisson/internal/transport"
	"github.com/caisson-containers/caisson/shim/config"
	"github.com/caisson-containers/caisson/shim/network"
	"github.com/caisson-containers/caisson/shim/template"
	"github.com/caisson-containers/caisson/shim/virtiofs"
	"github.com/caisson-containers/caisson/shim/vmm"
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
	vcfg := vmConfig(cfg, "")
	vcfg.StateDir, vcfg.ConsoleLog = "", ""
	return template.Get(ctx, TemplatesRoot(cfg), hv, vcfg)
}

// startVM starts the pod's VM: booted, or from its template (hypervisor.template). A
// template removed under the start (`caisson template remove`, or a newer guest image's
// first pod) is made again, once.
func startVM(ctx context.Context, cfg config.Config, hv vmm.Hypervisor, vcfg vmm.Config) (vmm.VM, error) {
	for attempt := 0; ; attempt++ {
		if cfg.Hypervisor.Template {
			dir, err := Template(ctx, cfg, hv)
			if err != nil {
				return nil, err
			}
			vcfg.Template = &vmm.Template{Dir: dir, Restore: true}
		}
		vm, err := hv.New(vcfg)
		if err != nil {
			return nil, err
		}
		err = vm.Start(ctx)
		if err == nil {
			return vm, nil
		}
		if vcfg.Template != nil && attempt == 0 && !template.Ready(vcfg.Template.Dir) {
			log.G(ctx).WithError(err).WithField("template", vcfg.Template.Dir).Warn("the VM template went away under the pod's start; making it again")
			continue
		}
		return nil, fmt.Errorf("start VM: %w", err)
	}
}

// TemplatesRoot is where cfg's VM templates are kept.
func TemplatesRoot(cfg config.Config) string { return filepath.Join(cfg.StateDir, TemplatesDir) }

// Pod is a running VM with its agent.
type Pod struct {
	cfg      config.Config
	stateDir string
	vm       vmm.VM
	net      *network.Network
	// cgroup holds QEMU and virtiofsd; removed by Stop once they have exited.
	cgroup  Cgroup
	session transport.Session
	client  *ttrpc.Client
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
}

// Start boots the VM and waits for its agent, and returns the pod with the rootfs of its
// first container (o.Rootfs) attached; on error nothing is left behind.
func Start(ctx context.Context, cfg config.Config, o Options) (_ *Pod, _ Rootfs, retErr error) {
	if o.Hypervisor == nil {
		return nil, Rootfs{}, fmt.Errorf("pod %s: no hypervisor: %w", o.ID, errdefs.ErrInvalidArgument)
	}
	if err := os.MkdirAll(o.StateDir, 0o700); err != nil {
		return nil, Rootfs{}, err
	}
	defer func() {
		if retErr != nil {
			// Never through a share of a host path (see Stop).
			if err := virtiofs.Unmount(filepath.Join(o.StateDir, SharedDirName)); err != nil {
				log.G(ctx).WithError(err).Error("pod state left in place: the shared directory is still mounted")
				return
			}
			os.RemoveAll(o.StateDir)
		}
	}()
	if cfg.Guest.Transport == "vsock" {
		return nil, Rootfs{}, fmt.Errorf("guest.transport = vsock is not supported by this shim yet (no vhost-vsock host to test it on): %w", errdefs.ErrNotImplemented)
	}
	// The boot disks (mkfs of the writable image) and the network are prepared at once.
	var (
		disks   []vmm.Disk
		devs    []rootfs.Device
		diskErr error
		formed  = make(chan struct{})
	)
	go func() {
		defer close(formed)
		disks, devs, diskErr = bootDisks(ctx, o.Rootfs, cfg.Storage.DAX)
	}()
	var net *network.Network
	var netErr error
	if o.NetNS != "" {
		net, netErr = network.Setup(o.NetNS)
	}
	<-formed
	if err := errors.Join(netErr, diskErr); err != nil {
		if net != nil {
			if cerr := net.Close(); cerr != nil {
				log.G(ctx).WithError(cerr).Warn("pod network cleanup")
			}
		}
		if netErr != nil {
			return nil, Rootfs{}, fmt.Errorf("pod network: %w", netErr)
		}
		return nil, Rootfs{}, diskErr
	}
	if net != nil {
		defer func() {
			if retErr != nil && net != nil {
				if err := net.Close(); err != nil {
					log.G(ctx).WithError(err).Warn("pod network cleanup")
				}
			}
		}()
	}
	var nics []vmm.NIC
	var ifaces []*agent.Interface
	var routes []*agent.Route
	if net != nil {
		for i, n := range net.Interfaces {
			nics = append(nics, vmm.NIC{ID: fmt.Sprintf("nic%d", i), MAC: n.MAC.String(), Tap: n.Tap})
			ifaces = append(ifaces, &agent.Interface{Name: n.Name, Mac: n.MAC.String(), Mtu: uint32(n.MTU), Addresses: n.Addresses})
		}
		for _, r := range net.Routes {
			routes = append(routes, &agent.Route{Destination: r.Destination, Gateway: r.Gateway, Device: r.Device, Source: r.Source})
		}
	}
	vcfg := vmConfig(cfg, o.StateDir)
	vcfg.Disks, vcfg.NICs = disks, nics
	modules, withModules := modulesDisk(ctx, cfg, o.Hypervisor.MaxBootDisks(), len(disks), len(nics))
	if withModules {
		vcfg.Disks = append(slices.Clip(disks), modules)
	}
	// Removed after virtiofsd and QEMU have exited (deferred before them).
	cgroupOf := o.NewCgroup
	if cgroupOf == nil {
		cgroupOf = HostCgroup
	}
	cg, err := cgroupOf(cfg, o)
	if err != nil {
		return nil, Rootfs{}, err
	}
	defer func() {
		if cg == nil {
			return
		}
		if err := cg.Remove(context.WithoutCancel(ctx)); err != nil {
			log.G(ctx).WithError(err).Warn("pod cgroup cleanup")
		}
	}()
	var fs *virtiofs.Daemon
	if SharesHostPaths(cfg) {
		if fs, vcfg.SharedFS, err = startShared(ctx, cfg, o.StateDir); err != nil {
			return nil, Rootfs{}, fmt.Errorf("shared directory: %w", err)
		}
		defer func() {
			if fs != nil {
				if err := fs.Close(context.WithoutCancel(ctx)); err != nil {
					log.G(ctx).WithError(err).Warn("shared directory cleanup")
				}
			}
		}()
		// Before QEMU connects: virtiofsd forks its sandboxed child then.
		if err := cg.Add(fs.Pid()); err != nil {
			return nil, Rootfs{}, err
		}
	}
	vm, err := startVM(ctx, cfg, o.Hypervisor, vcfg)
	if err != nil {
		return nil, Rootfs{}, err
	}
	if net != nil {
		net.CloseTaps() // QEMU holds them now: the taps go when it exits
	}
	p := &Pod{cfg: cfg, stateDir: o.StateDir, vm: vm, net: net, fs: fs, cgroup: cg, storages: map[string]*attached{}}
	net, fs, cg = nil, nil, nil // p.Stop cleans them from here on
	if p.fs != nil {
		go p.watchShared(context.WithoutCancel(ctx))
	}
	defer func() {
		if retErr != nil {
			p.Stop(context.WithoutCancel(ctx))
		}
	}()
	// QEMU's allocations before this (its start, the guest's first pages) stay charged
	// where the shim is.
	if err := p.cgroup.Add(vm.Pid()); err != nil {
		return nil, Rootfs{}, err
	}
	if err := p.connect(ctx); err != nil {
		return nil, Rootfs{}, err
	}
	// The sandbox and the boot disks' storages do not depend on each other: the agent
	// sets both up at once, and the round trips overlap.
	var mountErr error
	mounted := make(chan struct{})
	go func() {
		defer close(mounted)
		mountErr = p.mountBootDisks(ctx, disks, devs)
		if mountErr == nil && p.fs != nil {
			mountErr = p.mountShared(ctx)
		}
	}()
	modulesMounted := make(chan struct{})
	go func() {
		defer close(modulesMounted)
		if withModules {
			p.mountModules(ctx, modules)
		}
	}()
	defer func() { <-modulesMounted }()
	created := time.Now()
	_, err = p.Sandbox.Create(ctx, &agent.CreateSandboxRequest{
		SandboxId:  o.ID,
		Hostname:   o.Hostname,
		Interfaces: ifaces,
		Routes:     routes,
		Dns:        o.DNS,
		Hosts:      o.Hosts,
		Time:       timestamppb.Now(),
		Entropy:    entropy(),
	})
	<-mounted
	if err != nil {
		return nil, Rootfs{}, fmt.Errorf("create sandbox in the guest: %w", errgrpc.ToNative(err))
	}
	log.G(ctx).WithField("took", time.Since(created)).Debug("sandbox created in the guest")
	if mountErr != nil {
		return nil, Rootfs{}, mountErr
	}
	return p, p.bootRootfs(o.Rootfs), nil
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
	p.calls = &deadlines{}
	c, err := transport.OpenTTRPC(ctx, s, ttrpc.WithUnaryClientInterceptor(p.calls.intercept))
	if err != nil {
		return p.bootError(err)
	}
	p.client = c
	p.Sandbox = agent.NewSandboxClient(c)
	p.Containers = agent.NewContainersClient(c)
	p.Exec = agent.NewExecClient(c)
	p.IO = agent.NewIOClient(c)
	p.storage = agent.NewStorageClient(c)
	check, err := p.Sandbox.Check(ctx, &agent.CheckRequest{})
	if err != nil {
		return p.bootError(err)
	}
	v, err := p.Sandbox.Version(ctx, &agent.VersionRequest{})
	if err != nil {
		return fmt.Errorf("agent version: %w", errgrpc.ToNative(err))
	}
	if v.GetApiVersion() != agent.APIVersion {
		return fmt.Errorf("the guest agent (%s) speaks API %q, this shim %q: rebuild the guest image (make guest): %w",
			v.GetAgentVersion(), v.GetApiVersion(), agent.APIVersion, errdefs.ErrFailedPrecondition)
	}
	log.G(ctx).WithFields(log.Fields{
		"agent": v.GetAgentVersion(), "kernel": v.GetKernelRelease(), "guest_uptime": time.Duration(check.GetUptimeNs()),
	}).Debug("agent ready")
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
// stops the VM and removes the state directory. It is safe to call twice.
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
	err := p.vm.Stop(ctx)
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
	if cerr := p.cgroup.Remove(ctx); cerr != nil {
		err = errors.Join(err, fmt.Errorf("pod cgroup: %w", cerr))
	}
	// Whatever happened above, nothing shared may be under the state directory when
	// it is removed: a share is a host path (a volume), not the pod's.
	if uerr := virtiofs.Unmount(filepath.Join(p.stateDir, SharedDirName)); uerr != nil {
		return errors.Join(err, uerr)
	}
	if rerr := os.RemoveAll(p.stateDir); rerr != nil {
		err = errors.Join(err, rerr)
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

// StateDir is where the pod id of namespace ns keeps its VM's state under
// root. Unix socket paths are limited to 107 bytes and CRI ids are 64
// characters, so a long id is shortened, keeping a hash of all of it.
func StateDir(root, ns, id string) string {
	name := ns + "-" + id
	if len(name) > 32 {
		h := sha256.Sum256([]byte(ns + "/" + id))
		name = fmt.Sprintf("%.12s-%.12s-%x", ns, id, h[:6])
	}
	return filepath.Join(root, name)
}
