// Package service serves the shim↔agent API (api/agent/v1) over ttrpc, on top of the
// agent's container runtime, storage manager and sandbox. Errors are errdefs errors,
// converted with errgrpc at the server edge (one interceptor, not in every method).
package service

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"sync"

	"github.com/containerd/errdefs"
	"github.com/containerd/errdefs/pkg/errgrpc"
	"github.com/containerd/log"
	"github.com/containerd/ttrpc"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/reflect/protoregistry"

	agent "github.com/caisson-containers/caisson/api/agent/v1"
	"github.com/caisson-containers/caisson/guest/agent/container"
	"github.com/caisson-containers/caisson/guest/agent/copies"
	"github.com/caisson-containers/caisson/guest/agent/hotplug"
	"github.com/caisson-containers/caisson/guest/agent/modprobe"
	"github.com/caisson-containers/caisson/guest/agent/reaper"
	"github.com/caisson-containers/caisson/guest/agent/sandbox"
	"github.com/caisson-containers/caisson/guest/agent/storage"
)

// Version is the agent's version, reported by Sandbox.Version.
var Version = "dev"

// Config places the agent's state.
type Config struct {
	// Root holds everything the agent creates at run time: storage mount points,
	// container rootfs and state, the pod's files. Default /run/caisson.
	Root string
	// CgroupParent is where container cgroups go (default /caisson).
	CgroupParent string
	// Finder locates attached disks (default storage.DefaultFinder).
	Finder *storage.Finder
	// PowerOff is called, after Sandbox.Destroy has answered, to end the VM.
	PowerOff func()
	// DevicesReady, if set, returns once the drivers of disks, filesystems and NICs are
	// loaded; the services that need them wait for it.
	DevicesReady func(context.Context) error
}

// Agent implements every service of the API.
type Agent struct {
	cfg      Config
	runtime  *container.Runtime
	storages *storage.Manager
	sandbox  *sandbox.Sandbox
	copies   *copies.Store // of host bind mount sources
	events   *broker

	// warmMu runs one warm-up at a time: its container takes a fixed id.
	warmMu sync.Mutex
	// checkWarmed: a Check with devices_ready warms up once (Sandbox.WarmUp each time).
	checkWarmed sync.Once

	mu     sync.Mutex
	rootfs map[string]*storage.MountedRootfs // by container id
	stdio  map[stdioKey]bool                 // attached streams
}

// New returns the agent's services; every process it starts is reaped by r.
func New(cfg Config, r *reaper.Reaper) (*Agent, error) {
	if cfg.Root == "" {
		cfg.Root = "/run/caisson"
	}
	if cfg.CgroupParent == "" {
		cfg.CgroupParent = "/caisson"
	}
	finder := storage.DefaultFinder
	if cfg.Finder != nil {
		finder = *cfg.Finder
	}
	rt, err := container.NewRuntime(filepath.Join(cfg.Root, "libcontainer"), cfg.CgroupParent, r)
	if err != nil {
		return nil, err
	}
	st, err := storage.NewManager(filepath.Join(cfg.Root, "storage"), finder)
	if err != nil {
		return nil, err
	}
	if err := os.MkdirAll(filepath.Join(cfg.Root, "containers"), 0o700); err != nil {
		return nil, err
	}
	return &Agent{
		cfg:      cfg,
		runtime:  rt,
		storages: st,
		sandbox:  sandbox.New(filepath.Join(cfg.Root, "sandbox")),
		copies:   copies.New(filepath.Join(cfg.Root, "mounts")),
		events:   newBroker(),
		rootfs:   map[string]*storage.MountedRootfs{},
		stdio:    map[stdioKey]bool{},
	}, nil
}

// NewServer returns a ttrpc server with every service registered.
func (a *Agent) NewServer() (*ttrpc.Server, error) {
	workers := newWorkers(4)
	srv, err := ttrpc.NewServer(
		ttrpc.WithUnaryServerInterceptor(func(ctx context.Context, u ttrpc.Unmarshaler, info *ttrpc.UnaryServerInfo, m ttrpc.Method) (any, error) {
			var (
				resp any
				err  error
			)
			workers.run(func() { resp, err = m(ctx, u) })
			if err != nil {
				log.G(ctx).WithError(err).WithField("method", info.FullMethod).Debug("request failed")
			}
			return resp, errgrpc.ToGRPC(err)
		}),
	)
	if err != nil {
		return nil, err
	}
	agent.RegisterSandboxService(srv, sandboxService{a})
	agent.RegisterStorageService(srv, storageService{a})
	agent.RegisterContainersService(srv, containersService{a})
	agent.RegisterExecService(srv, execService{a})
	agent.RegisterIOService(srv, ioService{a})
	agent.RegisterResourcesService(srv, hotplug.Service{})
	return srv, nil
}

// Shutdown kills every container and releases every rootfs and storage.
func (a *Agent) Shutdown(ctx context.Context) {
	for _, c := range a.runtime.List() {
		if err := a.deleteContainer(ctx, c.ID(), true); err != nil {
			log.G(ctx).WithError(err).WithField("id", c.ID()).Warn("delete container at shutdown")
		}
	}
	a.storages.UnmountAll(ctx)
	a.sandbox.Destroy(ctx)
}

// devicesReady waits for the device drivers.
func (a *Agent) devicesReady(ctx context.Context) error {
	if a.cfg.DevicesReady == nil {
		return nil
	}
	if err := a.cfg.DevicesReady(ctx); err != nil {
		return fmt.Errorf("guest kernel modules: %v: %w", err, errdefs.ErrFailedPrecondition)
	}
	return nil
}

// warmUp builds what the agent otherwise builds for a pod's first requests and its
// first container: the pod's namespaces (sandbox.Prepare), protobuf's coders, and what
// container.Runtime.WarmUp builds. The shim asks for it before it saves a VM template
// (Check with devices_ready), and again in a restored VM that waits for its pod
// (Sandbox.WarmUp): what a template saves is the guest's memory, not the translated code
// of an emulating accelerator. A warm-up that fails costs only speed.
func (a *Agent) warmUp(ctx context.Context) {
	a.warmMu.Lock()
	defer a.warmMu.Unlock()
	if err := a.sandbox.Prepare(ctx); err != nil {
		log.G(ctx).WithError(err).Warn("pod namespaces ahead of the pod")
	}
	warmMessages()
	// The container's process is the agent's binary called as modprobe without
	// arguments: it prints its usage and exits (by its own name, it would take
	// itself for the VM's init).
	exe, err := os.Executable()
	if err == nil {
		_, err = a.runtime.WarmUp(ctx, exe, "/sbin/"+modprobe.Name)
	}
	if err != nil {
		log.G(ctx).WithError(err).Warn("container runtime warm-up")
	}
}

// warmMessages encodes and decodes every message of the agent's API once: protobuf
// builds each message type's coders on its first use.
func warmMessages() {
	protoregistry.GlobalTypes.RangeMessages(func(mt protoreflect.MessageType) bool {
		if mt.Descriptor().ParentFile().Package() != agentPackage {
			return true
		}
		m := mt.New().Interface()
		if b, err := proto.Marshal(m); err == nil {
			_ = proto.Unmarshal(b, mt.New().Interface())
		}
		return true
	})
}

// agentPackage is the protobuf package of the agent's API.
const agentPackage = "caisson.agent.v1"

func (a *Agent) process(containerID, execID string) (*container.Container, *container.Process, error) {
	c, err := a.runtime.Get(containerID)
	if err != nil {
		return nil, nil, err
	}
	p, err := c.Process(execID)
	if err != nil {
		return nil, nil, err
	}
	return c, p, nil
}

func stdioOf(s *agent.Stdio) container.Stdio {
	return container.Stdio{Stdin: s.GetStdin(), Stdout: s.GetStdout(), Stderr: s.GetStderr(), Terminal: s.GetTerminal()}
}

func (a *Agent) rootfsDir(id string) string {
	return filepath.Join(a.cfg.Root, "containers", id, "rootfs")
}
