package service

import (
	"context"
	"fmt"
	"time"
	"unsafe"

	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"golang.org/x/sys/unix"
	"google.golang.org/protobuf/types/known/emptypb"

	agent "github.com/caisson-containers/caisson/api/agent/v1"
	"github.com/caisson-containers/caisson/guest/agent/sandbox"
)

type sandboxService struct{ a *Agent }

var _ agent.SandboxService = sandboxService{}

func ifacesOf(in []*agent.Interface) []sandbox.Interface {
	var out []sandbox.Interface
	for _, i := range in {
		out = append(out, sandbox.Interface{Name: i.GetName(), MAC: i.GetMac(), MTU: int(i.GetMtu()), Addresses: i.GetAddresses()})
	}
	return out
}

func routesOf(in []*agent.Route) []sandbox.Route {
	var out []sandbox.Route
	for _, r := range in {
		out = append(out, sandbox.Route{Destination: r.GetDestination(), Gateway: r.GetGateway(), Device: r.GetDevice(), Source: r.GetSource()})
	}
	return out
}

func (s sandboxService) Create(ctx context.Context, req *agent.CreateSandboxRequest) (*emptypb.Empty, error) {
	if err := s.a.devicesReady(ctx); err != nil {
		return nil, err
	}
	if t := req.GetTime(); t != nil {
		if err := sandbox.SetTime(t.AsTime()); err != nil {
			return nil, err
		}
	}
	if err := sandbox.AddEntropy(req.GetEntropy()); err != nil {
		return nil, err
	}
	cfg := sandbox.Config{
		ID:       req.GetSandboxId(),
		Hostname: req.GetHostname(),
		DNS:      sandbox.DNS{Servers: req.GetDns().GetServers(), Searches: req.GetDns().GetSearches(), Options: req.GetDns().GetOptions()},
		Ifaces:   ifacesOf(req.GetInterfaces()),
		Routes:   routesOf(req.GetRoutes()),
		SharePID: req.GetSharePid(),
		Sysctls:  req.GetSysctls(),
	}
	for _, h := range req.GetHosts() {
		cfg.Hosts = append(cfg.Hosts, sandbox.HostEntry{IP: h.GetIp(), Names: h.GetNames()})
	}
	if err := s.a.sandbox.Create(ctx, cfg); err != nil {
		return nil, err
	}
	return &emptypb.Empty{}, nil
}

func (s sandboxService) SetNetwork(ctx context.Context, req *agent.SetNetworkRequest) (*emptypb.Empty, error) {
	if err := s.a.devicesReady(ctx); err != nil {
		return nil, err
	}
	if err := s.a.sandbox.SetNetwork(ctx, ifacesOf(req.GetInterfaces()), routesOf(req.GetRoutes())); err != nil {
		return nil, err
	}
	return &emptypb.Empty{}, nil
}

func (s sandboxService) SetTime(ctx context.Context, req *agent.SetTimeRequest) (*emptypb.Empty, error) {
	if err := sandbox.SetTime(req.GetTime().AsTime()); err != nil {
		return nil, err
	}
	return &emptypb.Empty{}, nil
}

func (s sandboxService) Check(ctx context.Context, req *agent.CheckRequest) (*agent.CheckResponse, error) {
	if req.GetDevicesReady() {
		if err := s.a.devicesReady(ctx); err != nil {
			return nil, err
		}
		// Only the shim's template maker asks for devices_ready: the template is saved
		// after this, so its VMs start with the warm-up's state.
		s.a.checkWarmed.Do(func() { s.a.warmUp(ctx) })
	}
	ts, err := bootTime()
	if err != nil {
		return nil, err
	}
	return &agent.CheckResponse{UptimeNs: uint64(ts.Nano())}, nil
}

// bootTime reads CLOCK_BOOTTIME (the guest's uptime, suspended time included). The Go
// runtime reads only the realtime and monotonic clocks through the vDSO, and a syscall
// made the usual way wakes the runtime's sysmon thread in an idle agent, whose polls an
// idle guest pays for under TCG (internal/transport's rawPort). Check is the call that
// measures the channel and the agent's wake-up alone (BenchmarkGuestStats), so it makes
// no syscall the usual way either.
func bootTime() (unix.Timespec, error) {
	var ts unix.Timespec
	if _, _, errno := unix.RawSyscall(unix.SYS_CLOCK_GETTIME, unix.CLOCK_BOOTTIME, uintptr(unsafe.Pointer(&ts)), 0); errno != 0 {
		return ts, fmt.Errorf("read the boot clock: %w", errno)
	}
	return ts, nil
}

func (s sandboxService) WarmUp(ctx context.Context, req *agent.WarmUpRequest) (*agent.WarmUpResponse, error) {
	if s.a.sandbox.Created() {
		return nil, fmt.Errorf("warm-up after the sandbox's creation: %w", errdefs.ErrFailedPrecondition)
	}
	if err := s.a.devicesReady(ctx); err != nil {
		return nil, err
	}
	start := time.Now()
	s.a.warmUp(ctx)
	return &agent.WarmUpResponse{TookNs: uint64(time.Since(start))}, nil
}

func (s sandboxService) Version(ctx context.Context, req *agent.VersionRequest) (*agent.VersionResponse, error) {
	var u unix.Utsname
	_ = unix.Uname(&u)
	return &agent.VersionResponse{AgentVersion: Version, ApiVersion: agent.APIVersion, KernelRelease: unix.ByteSliceToString(u.Release[:])}, nil
}

// powerOffDelay lets the reply to Destroy leave the VM before it powers off.
const powerOffDelay = 200 * time.Millisecond

func (s sandboxService) Destroy(ctx context.Context, req *agent.DestroySandboxRequest) (*emptypb.Empty, error) {
	s.a.Shutdown(ctx)
	if s.a.cfg.PowerOff != nil {
		go func() {
			time.Sleep(powerOffDelay)
			log.L.Info("sandbox destroyed; powering off")
			s.a.cfg.PowerOff()
		}()
	}
	return &emptypb.Empty{}, nil
}
