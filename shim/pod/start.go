package pod

import (
	"context"
	"fmt"
	"os"
	"slices"
	"time"

	"github.com/containerd/errdefs"
	"github.com/containerd/errdefs/pkg/errgrpc"
	"github.com/containerd/log"
	"github.com/containerd/ttrpc"
	"google.golang.org/protobuf/types/known/timestamppb"

	agent "github.com/caisson-containers/caisson/api/agent/v1"
	"github.com/caisson-containers/caisson/internal/rootfs"
	"github.com/caisson-containers/caisson/shim/config"
	"github.com/caisson-containers/caisson/shim/network"
	"github.com/caisson-containers/caisson/shim/template"
	"github.com/caisson-containers/caisson/shim/vmboot"
	"github.com/caisson-containers/caisson/shim/vmm"
)

// Start boots the VM and waits for its agent, and returns the pod with the rootfs of its
// first container (o.Rootfs) attached; on error nothing is left behind.
//
// A pod starts in four steps, each filling in the parts of the Pod it makes, so that one
// cleanup (Stop) undoes whatever was done when a later step fails: the devices the VM
// boots with (the first container's disks, the network), the host helpers (the cgroup,
// virtiofsd), the VM and the connection to its agent, and the sandbox in the guest.
func Start(ctx context.Context, cfg config.Config, o Options) (_ *Pod, _ Rootfs, retErr error) {
	if err := checkOptions(cfg, o); err != nil {
		return nil, Rootfs{}, err
	}
	if err := os.MkdirAll(o.StateDir, 0o700); err != nil {
		return nil, Rootfs{}, err
	}
	p := &Pod{cfg: cfg, stateDir: o.StateDir, storages: map[string]*attached{}}
	defer func() {
		if retErr != nil {
			if err := p.Stop(context.WithoutCancel(ctx)); err != nil {
				log.G(ctx).WithError(err).Warn("cleanup after a failed pod start")
			}
		}
	}()
	prepared := time.Now()
	devs, err := p.prepareDevices(ctx, o)
	if err != nil {
		return nil, Rootfs{}, err
	}
	log.G(ctx).WithField("took", time.Since(prepared)).Debug("pod devices prepared")
	vcfg := vmConfig(cfg, o.StateDir)
	vcfg.Disks, vcfg.NICs = devs.bootDisks(), devs.nics
	// A pod from a template starts at the template's size, and grows to its own before
	// its sandbox is made; a booted one boots at its own.
	p.base, p.size = baseSize(cfg, o), sizeOf(cfg)
	if cfg.Hypervisor.Template {
		vcfg.MemoryMiB, vcfg.VCPUs, p.size = p.base.MemoryMiB, p.base.VCPUs, p.base
	}
	if vcfg.SharedFS, err = p.startHelpers(ctx, o); err != nil {
		return nil, Rootfs{}, err
	}
	if err := p.boot(ctx, o.Hypervisor, vcfg); err != nil {
		return nil, Rootfs{}, err
	}
	if err := p.Grow(ctx, sizeOf(cfg)); err != nil {
		return nil, Rootfs{}, err
	}
	if err := p.createSandbox(ctx, o, devs); err != nil {
		return nil, Rootfs{}, err
	}
	return p, p.bootRootfs(o.Rootfs), nil
}

// checkOptions refuses what Start cannot do.
func checkOptions(cfg config.Config, o Options) error {
	if o.Hypervisor == nil {
		return fmt.Errorf("pod %s: no hypervisor: %w", o.ID, errdefs.ErrInvalidArgument)
	}
	if cfg.Guest.Transport == "vsock" {
		return fmt.Errorf("guest.transport = vsock is not supported by this shim yet (no vhost-vsock host to test it on): %w", errdefs.ErrNotImplemented)
	}
	return nil
}

// devices are what the pod's VM boots with besides its config: the first container's
// disks, the network's NICs and the kernel modules image.
type devices struct {
	disks   []vmm.Disk      // the first container's, one per file
	devs    []rootfs.Device // the device each of disks came from
	modules *vmm.Disk       // the kernel modules image; nil: none
	nics    []vmm.NIC
	// ifaces and routes are the network as the guest sets it up.
	ifaces []*agent.Interface
	routes []*agent.Route
}

// bootDisks are the disks the VM boots with.
func (d *devices) bootDisks() []vmm.Disk {
	if d.modules == nil {
		return d.disks
	}
	return append(slices.Clip(d.disks), *d.modules)
}

// prepareDevices formats the first container's disks (mkfs of its writable image) and
// sets up the pod's network (p.net) at once.
func (p *Pod) prepareDevices(ctx context.Context, o Options) (*devices, error) {
	d := &devices{}
	var diskErr error
	formed := make(chan struct{})
	go func() {
		defer close(formed)
		d.disks, d.devs, diskErr = bootDisks(ctx, o.Rootfs, p.cfg.Storage.DAX)
	}()
	var netErr error
	if o.NetNS != "" {
		p.net, netErr = network.Setup(o.NetNS)
	}
	<-formed
	if netErr != nil {
		return nil, fmt.Errorf("pod network: %w", netErr)
	}
	if diskErr != nil {
		return nil, diskErr
	}
	if p.net != nil {
		for i, n := range p.net.Interfaces {
			d.nics = append(d.nics, vmm.NIC{ID: fmt.Sprintf("nic%d", i), MAC: n.MAC.String(), Tap: n.Tap})
			d.ifaces = append(d.ifaces, &agent.Interface{Name: n.Name, Mac: n.MAC.String(), Mtu: uint32(n.MTU), Addresses: n.Addresses})
		}
		for _, r := range p.net.Routes {
			d.routes = append(d.routes, &agent.Route{Destination: r.Destination, Gateway: r.Gateway, Device: r.Device, Source: r.Source})
		}
	}
	if m, ok := modulesDisk(ctx, p.cfg, o.Hypervisor.MaxBootDisks(), len(d.disks), len(d.nics)); ok {
		d.modules = &m
	}
	return d, nil
}

// startHelpers makes the pod's cgroup (p.cgroup) and, if the pod shares host paths,
// starts its virtiofsd (p.fs) in it, returning the VM's virtio-fs device.
func (p *Pod) startHelpers(ctx context.Context, o Options) (*vmm.SharedFS, error) {
	cgroupOf := o.NewCgroup
	if cgroupOf == nil {
		cgroupOf = HostCgroup
	}
	cg, err := cgroupOf(p.cfg, o)
	if err != nil {
		return nil, err
	}
	p.cgroup = cg
	if !SharesHostPaths(p.cfg) {
		return nil, nil
	}
	return p.startShared(ctx)
}

// startShared starts the pod's virtiofsd (p.fs) in its cgroup and returns the VM's
// virtio-fs device.
func (p *Pod) startShared(ctx context.Context) (*vmm.SharedFS, error) {
	fs, dev, err := startShared(ctx, p.cfg, p.stateDir)
	if err != nil {
		return nil, fmt.Errorf("shared directory: %w", err)
	}
	p.fs = fs
	// Before QEMU connects: virtiofsd forks its sandboxed child then.
	if err := p.cgroup.Add(fs.Pid()); err != nil {
		return nil, err
	}
	return dev, nil
}

// boot starts the pod's VM (p.vm) and connects to its agent (p.session, p.client and the
// API clients).
func (p *Pod) boot(ctx context.Context, hv vmm.Hypervisor, vcfg vmm.Config) error {
	started := func(vm vmm.VM) error {
		if p.net != nil {
			p.net.CloseTaps() // the VMM holds them now: the taps go when it exits
		}
		// The VMM's allocations before this (its start, the guest's first pages)
		// stay charged where the shim is.
		return p.cgroup.Add(vm.Pid())
	}
	var g *vmboot.Guest
	w := takeHeld()
	if w != nil {
		g = p.adopt(ctx, w, hv, vcfg)
	}
	if g != nil {
		if err := started(g.VM); err != nil {
			if serr := w.Stop(context.WithoutCancel(ctx)); serr != nil {
				log.G(ctx).WithError(serr).Warn("stopping the warm VM")
			}
			return err
		}
		// The warm VM's own cgroup, empty now; one that will not go yet goes at Stop.
		if err := w.releaseCgroup(ctx); err != nil {
			log.G(ctx).WithError(err).Warn("removing the warm VM's cgroup: left to the pod's stop")
			p.warmCgroup = w.cgroup
		}
	} else {
		p.calls = &deadlines{}
		var err error
		g, err = bootVM(ctx, p.cfg, hv, vcfg, vmboot.Options{
			Timeout:    BootTimeout,
			ClientOpts: []ttrpc.ClientOpts{ttrpc.WithUnaryClientInterceptor(p.calls.intercept)},
			Started:    started,
		})
		if err != nil {
			return err
		}
	}
	p.vm, p.session, p.client = g.VM, g.Session, g.Client
	p.Sandbox = agent.NewSandboxClient(g.Client)
	p.Containers = agent.NewContainersClient(g.Client)
	p.Exec = agent.NewExecClient(g.Client)
	p.IO = agent.NewIOClient(g.Client)
	p.storage = agent.NewStorageClient(g.Client)
	if p.fs != nil {
		go p.watchShared(context.WithoutCancel(ctx))
	}
	return nil
}

// bootVM boots the pod's VM: from its template (hypervisor.template), or not. A template
// removed under the start (`caisson template remove`, or a newer guest image's first
// pod) is made again, once, if the VM had not started yet.
func bootVM(ctx context.Context, cfg config.Config, hv vmm.Hypervisor, vcfg vmm.Config, o vmboot.Options) (*vmboot.Guest, error) {
	for attempt := 0; ; attempt++ {
		if cfg.Hypervisor.Template {
			t, err := vmTemplate(ctx, cfg, hv, vcfg)
			if err != nil {
				return nil, err
			}
			vcfg.Template = t
		}
		started := false
		opts := o
		opts.Started = func(vm vmm.VM) error {
			started = true
			return o.Started(vm)
		}
		g, err := vmboot.Boot(ctx, hv, vcfg, opts)
		if err == nil {
			return g, nil
		}
		if vcfg.Template != nil && attempt == 0 && !started && !template.Ready(vcfg.Template.Dir) {
			log.G(ctx).WithError(err).WithField("template", vcfg.Template.Dir).Warn("the VM template went away under the pod's start; making it again")
			continue
		}
		return nil, err
	}
}

// vmTemplate is the template a pod VM of vcfg (and cfg) starts from: the template's size
// is the VM's at its start.
func vmTemplate(ctx context.Context, cfg config.Config, hv vmm.Hypervisor, vcfg vmm.Config) (*vmm.Template, error) {
	cfg.Hypervisor.MemoryMiB, cfg.Hypervisor.VCPUs = vcfg.MemoryMiB, vcfg.VCPUs
	return templateOf(ctx, cfg, hv)
}

// createSandbox has the agent create the sandbox and mount the boot disks, the shared
// directory and the modules image: these do not depend on each other, the agent sets
// them up at once and the round trips overlap.
func (p *Pod) createSandbox(ctx context.Context, o Options, d *devices) error {
	var mountErr error
	mounted := make(chan struct{})
	go func() {
		defer close(mounted)
		mountErr = p.mountBootDisks(ctx, d.disks, d.devs)
		if mountErr == nil && p.fs != nil {
			mountErr = p.mountShared(ctx)
		}
	}()
	modulesMounted := make(chan struct{})
	go func() {
		defer close(modulesMounted)
		if d.modules != nil && !p.modulesIn {
			p.mountModules(ctx, *d.modules)
		}
	}()
	defer func() { <-modulesMounted }()
	created := time.Now()
	_, err := p.Sandbox.Create(ctx, &agent.CreateSandboxRequest{
		SandboxId:  o.ID,
		Hostname:   o.Hostname,
		Interfaces: d.ifaces,
		Routes:     d.routes,
		Dns:        o.DNS,
		Hosts:      o.Hosts,
		Time:       timestamppb.Now(),
		Entropy:    entropy(),
	})
	<-mounted
	if err != nil {
		return fmt.Errorf("create sandbox in the guest: %w", errgrpc.ToNative(err))
	}
	log.G(ctx).WithField("took", time.Since(created)).Debug("sandbox created in the guest")
	return mountErr
}
