// Package fakevm is a VM for the shim's unit tests, without QEMU and without root: a
// vmm.Hypervisor whose VMs serve an in-memory guest agent on their agent endpoint, over
// the real transport (internal/transport's serial handshake, yamux, preambles, ttrpc),
// as QEMU's chardev socket carries the real agent's port.
//
// It models the contract the shim relies on, not a guest: the agent keeps the state the
// API talks about (the sandbox, mounted storages, containers and their processes, stdio
// connections) and refuses what the real agent refuses (an unknown id, a second create, a
// start of a started process, a delete of a running one, a storage mounted twice or
// unmounted while unknown). Processes run nothing: one exits when a test says so (Exit) or
// when it is sent a signal that ends it. Each RPC is recorded (Calls) and can be made to
// fail (Fail). The VM records the disks attached to it and detached from it.
package fakevm

import (
	"context"
	"errors"
	"fmt"
	"net"
	"slices"
	"strconv"
	"sync"
	"time"

	"github.com/containerd/errdefs"
	"github.com/containerd/errdefs/pkg/errgrpc"
	"github.com/containerd/log"
	"github.com/containerd/ttrpc"
	"golang.org/x/sys/unix"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/emptypb"
	"google.golang.org/protobuf/types/known/timestamppb"

	agent "github.com/caisson-containers/caisson/api/agent/v1"
	"github.com/caisson-containers/caisson/internal/transport"
)

// Version is what the fake agent reports as its own version.
const Version = "fakevm"

// Call is one RPC the agent received: its method ("Containers.Create") and the ids it
// was about (container or storage id, and exec id).
type Call struct {
	Method string
	ID     string
	ExecID string
}

func (c Call) String() string {
	s := c.Method
	if c.ID != "" {
		s += " " + c.ID
	}
	if c.ExecID != "" {
		s += "/" + c.ExecID
	}
	return s
}

// Agent is the in-memory guest agent. Its zero value is not usable: see NewAgent.
type Agent struct {
	// APIVersion is what Sandbox.Version reports; agent.APIVersion if empty (a guest
	// image older or newer than the shim reports another).
	APIVersion string

	mu         sync.Mutex
	calls      []Call
	fail       map[string]error
	sandbox    *agent.CreateSandboxRequest
	storages   map[string]*agent.MountStorageRequest
	containers map[string]*container
	oom        chan string
	conns      map[net.Conn]bool // host connections being served
}

type container struct {
	req   *agent.CreateContainerRequest
	procs map[string]*process // by exec id, "" is init
}

type process struct {
	started bool
	stdio   *agent.Stdio
	exit    *agent.ExitStatus // set once exited
	exited  chan struct{}
	streams []net.Conn // stdio connections, closed at exit
}

// NewAgent returns an agent with no sandbox yet.
func NewAgent() *Agent {
	return &Agent{
		fail:       map[string]error{},
		storages:   map[string]*agent.MountStorageRequest{},
		containers: map[string]*container{},
		oom:        make(chan string, 16),
		conns:      map[net.Conn]bool{},
	}
}

// Fail makes every later call of method ("Containers.Create", "Storage.Mount" ...) fail
// with err, until Fail(method, nil). The call is recorded all the same, and changes nothing.
func (a *Agent) Fail(method string, err error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if err == nil {
		delete(a.fail, method)
		return
	}
	a.fail[method] = err
}

// Calls returns the calls received so far, in order.
func (a *Agent) Calls() []Call {
	a.mu.Lock()
	defer a.mu.Unlock()
	return slices.Clone(a.calls)
}

// Methods returns the methods of the calls received so far about id (a container or
// storage id; "" for all), in order.
func (a *Agent) Methods(id string) []string {
	var ms []string
	for _, c := range a.Calls() {
		if id == "" || c.ID == id {
			ms = append(ms, c.String())
		}
	}
	return ms
}

// Count is how many calls of method about id ("" for all) the agent has received.
func (a *Agent) Count(method, id string) int {
	n := 0
	for _, c := range a.Calls() {
		if c.Method == method && (id == "" || c.ID == id) {
			n++
		}
	}
	return n
}

// Sandbox returns the sandbox's creation request (nil: none, or destroyed).
func (a *Agent) Sandbox() *agent.CreateSandboxRequest {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.sandbox
}

// Storages returns the ids of the mounted storages, sorted.
func (a *Agent) Storages() []string {
	a.mu.Lock()
	defer a.mu.Unlock()
	var ids []string
	for id := range a.storages {
		ids = append(ids, id)
	}
	slices.Sort(ids)
	return ids
}

// Storage returns the request storage id was mounted with (nil if it is not mounted).
func (a *Agent) Storage(id string) *agent.MountStorageRequest {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.storages[id]
}

// Containers returns the ids of the containers that exist, sorted.
func (a *Agent) Containers() []string {
	a.mu.Lock()
	defer a.mu.Unlock()
	var ids []string
	for id := range a.containers {
		ids = append(ids, id)
	}
	slices.Sort(ids)
	return ids
}

// Container returns the request container id was created with (nil if it does not exist).
func (a *Agent) Container(id string) *agent.CreateContainerRequest {
	a.mu.Lock()
	defer a.mu.Unlock()
	if c, ok := a.containers[id]; ok {
		return c.req
	}
	return nil
}

// Streams returns how many stdio connections of a process are attached (0 if the
// process does not exist or has exited).
func (a *Agent) Streams(id, execID string) int {
	a.mu.Lock()
	defer a.mu.Unlock()
	p, err := a.process(id, execID)
	if err != nil {
		return 0
	}
	return len(p.streams)
}

// Connections returns how many host connections (one per shim session) the agent serves.
func (a *Agent) Connections() int {
	a.mu.Lock()
	defer a.mu.Unlock()
	return len(a.conns)
}

// Exit ends a started process with code, as if it had exited in the guest: its stdio
// connections close, and Wait answers.
func (a *Agent) Exit(id, execID string, code uint32) error {
	a.mu.Lock()
	defer a.mu.Unlock()
	p, err := a.process(id, execID)
	if err != nil {
		return err
	}
	if !p.started {
		return fmt.Errorf("process %s/%s not started: %w", id, execID, errdefs.ErrFailedPrecondition)
	}
	p.end(code)
	return nil
}

// OOM sends an OOM event for container id to the shim's event stream.
func (a *Agent) OOM(id string) { a.oom <- id }

func (p *process) end(code uint32) {
	if p.exit != nil {
		return
	}
	p.exit = &agent.ExitStatus{ExitStatus: code, ExitedAt: timestamppb.Now()}
	for _, c := range p.streams {
		c.Close()
	}
	p.streams = nil
	close(p.exited)
}

// process returns a process; a.mu is held.
func (a *Agent) process(id, execID string) (*process, error) {
	c, ok := a.containers[id]
	if !ok {
		return nil, fmt.Errorf("container %s: %w", id, errdefs.ErrNotFound)
	}
	p, ok := c.procs[execID]
	if !ok {
		return nil, fmt.Errorf("exec %s of container %s: %w", execID, id, errdefs.ErrNotFound)
	}
	return p, nil
}

// call records a call and returns the failure injected for its method; a.mu is held.
func (a *Agent) call(method, id, execID string) error {
	a.calls = append(a.calls, Call{Method: method, ID: id, ExecID: execID})
	return a.fail[method]
}

// Serve serves one host connection (the guest end of the agent channel) until it ends.
func (a *Agent) Serve(ctx context.Context, conn net.Conn) error {
	a.mu.Lock()
	a.conns[conn] = true
	a.mu.Unlock()
	defer func() {
		a.mu.Lock()
		delete(a.conns, conn)
		a.mu.Unlock()
	}()
	l, err := transport.ListenSerial(conn)
	if err != nil {
		return err
	}
	srv, err := ttrpc.NewServer(ttrpc.WithUnaryServerInterceptor(
		func(ctx context.Context, u ttrpc.Unmarshaler, _ *ttrpc.UnaryServerInfo, m ttrpc.Method) (any, error) {
			resp, err := m(ctx, u)
			return resp, errgrpc.ToGRPC(err)
		}))
	if err != nil {
		l.Close()
		return err
	}
	defer srv.Close()
	agent.RegisterSandboxService(srv, sandboxService{a})
	agent.RegisterStorageService(srv, storageService{a})
	agent.RegisterContainersService(srv, containersService{a})
	agent.RegisterExecService(srv, execService{a})
	agent.RegisterIOService(srv, ioService{a})
	err = srv.Serve(ctx, transport.Demux(ctx, l, a.stdio))
	if errors.Is(err, ttrpc.ErrServerClosed) {
		return nil
	}
	return err
}

// stdio takes a process's stream connection: output streams stay open until the process
// exits (the real agent closes them then, after the last byte); stdin is read and dropped.
func (a *Agent) stdio(s *agent.StdioStream, conn net.Conn) {
	a.mu.Lock()
	defer a.mu.Unlock()
	p, err := a.process(s.GetContainerId(), s.GetExecId())
	if err != nil || p.exit != nil {
		log.L.WithError(err).Warn("fakevm: stdio connection for no running process")
		conn.Close()
		return
	}
	p.streams = append(p.streams, conn)
}

type sandboxService struct{ a *Agent }

func (s sandboxService) Create(ctx context.Context, r *agent.CreateSandboxRequest) (*emptypb.Empty, error) {
	a := s.a
	a.mu.Lock()
	defer a.mu.Unlock()
	if err := a.call("Sandbox.Create", r.GetSandboxId(), ""); err != nil {
		return nil, err
	}
	if a.sandbox != nil {
		return nil, fmt.Errorf("sandbox %s: %w", a.sandbox.GetSandboxId(), errdefs.ErrAlreadyExists)
	}
	a.sandbox = r
	return &emptypb.Empty{}, nil
}

func (s sandboxService) SetNetwork(ctx context.Context, r *agent.SetNetworkRequest) (*emptypb.Empty, error) {
	s.a.mu.Lock()
	defer s.a.mu.Unlock()
	if err := s.a.call("Sandbox.SetNetwork", "", ""); err != nil {
		return nil, err
	}
	return &emptypb.Empty{}, nil
}

func (s sandboxService) SetTime(ctx context.Context, r *agent.SetTimeRequest) (*emptypb.Empty, error) {
	s.a.mu.Lock()
	defer s.a.mu.Unlock()
	if err := s.a.call("Sandbox.SetTime", "", ""); err != nil {
		return nil, err
	}
	return &emptypb.Empty{}, nil
}

func (s sandboxService) Check(ctx context.Context, r *agent.CheckRequest) (*agent.CheckResponse, error) {
	s.a.mu.Lock()
	defer s.a.mu.Unlock()
	if err := s.a.call("Sandbox.Check", "", ""); err != nil {
		return nil, err
	}
	return &agent.CheckResponse{UptimeNs: uint64(time.Second)}, nil
}

func (s sandboxService) WarmUp(ctx context.Context, r *agent.WarmUpRequest) (*agent.WarmUpResponse, error) {
	s.a.mu.Lock()
	defer s.a.mu.Unlock()
	if err := s.a.call("Sandbox.WarmUp", "", ""); err != nil {
		return nil, err
	}
	if s.a.sandbox != nil {
		return nil, fmt.Errorf("warm-up after the sandbox's creation: %w", errdefs.ErrFailedPrecondition)
	}
	return &agent.WarmUpResponse{}, nil
}

func (s sandboxService) Version(ctx context.Context, r *agent.VersionRequest) (*agent.VersionResponse, error) {
	s.a.mu.Lock()
	defer s.a.mu.Unlock()
	if err := s.a.call("Sandbox.Version", "", ""); err != nil {
		return nil, err
	}
	v := s.a.APIVersion
	if v == "" {
		v = agent.APIVersion
	}
	return &agent.VersionResponse{AgentVersion: Version, ApiVersion: v, KernelRelease: "fake"}, nil
}

// Destroy ends every process and forgets the containers and storages, as the real agent
// does before it powers the VM off.
func (s sandboxService) Destroy(ctx context.Context, r *agent.DestroySandboxRequest) (*emptypb.Empty, error) {
	a := s.a
	a.mu.Lock()
	defer a.mu.Unlock()
	if err := a.call("Sandbox.Destroy", "", ""); err != nil {
		return nil, err
	}
	for _, c := range a.containers {
		for _, p := range c.procs {
			p.end(128 + uint32(unix.SIGKILL))
		}
	}
	a.containers = map[string]*container{}
	a.storages = map[string]*agent.MountStorageRequest{}
	a.sandbox = nil
	return &emptypb.Empty{}, nil
}

type storageService struct{ a *Agent }

func (s storageService) Mount(ctx context.Context, r *agent.MountStorageRequest) (*agent.MountStorageResponse, error) {
	a := s.a
	a.mu.Lock()
	defer a.mu.Unlock()
	if err := a.call("Storage.Mount", r.GetStorageId(), ""); err != nil {
		return nil, err
	}
	if r.GetStorageId() == "" {
		return nil, fmt.Errorf("storage without an id: %w", errdefs.ErrInvalidArgument)
	}
	if _, ok := a.storages[r.GetStorageId()]; ok {
		return nil, fmt.Errorf("storage %s: %w", r.GetStorageId(), errdefs.ErrAlreadyExists)
	}
	a.storages[r.GetStorageId()] = r
	return &agent.MountStorageResponse{MountPoint: "/run/caisson/storage/" + r.GetStorageId()}, nil
}

func (s storageService) Unmount(ctx context.Context, r *agent.UnmountStorageRequest) (*emptypb.Empty, error) {
	a := s.a
	a.mu.Lock()
	defer a.mu.Unlock()
	if err := a.call("Storage.Unmount", r.GetStorageId(), ""); err != nil {
		return nil, err
	}
	if _, ok := a.storages[r.GetStorageId()]; !ok {
		return nil, fmt.Errorf("storage %s: %w", r.GetStorageId(), errdefs.ErrNotFound)
	}
	delete(a.storages, r.GetStorageId())
	return &emptypb.Empty{}, nil
}

type containersService struct{ a *Agent }

func newProcess(stdio *agent.Stdio) *process {
	return &process{stdio: stdio, exited: make(chan struct{})}
}

// Create refuses a rootfs that names a storage that is not mounted: the shim must mount
// every storage a container's rootfs uses before it creates the container.
func (s containersService) Create(ctx context.Context, r *agent.CreateContainerRequest) (*agent.CreateContainerResponse, error) {
	a := s.a
	a.mu.Lock()
	defer a.mu.Unlock()
	id := r.GetContainerId()
	if err := a.call("Containers.Create", id, ""); err != nil {
		return nil, err
	}
	if a.sandbox == nil {
		return nil, fmt.Errorf("container %s: no sandbox: %w", id, errdefs.ErrFailedPrecondition)
	}
	if _, ok := a.containers[id]; ok {
		return nil, fmt.Errorf("container %s: %w", id, errdefs.ErrAlreadyExists)
	}
	rfs := r.GetRootfs()
	for _, sp := range append(slices.Clone(rfs.GetLower()), rfs.GetUpper(), rfs.GetWork()) {
		if sp == nil {
			continue
		}
		if _, ok := a.storages[sp.GetStorageId()]; !ok {
			return nil, fmt.Errorf("container %s: rootfs storage %s is not mounted: %w", id, sp.GetStorageId(), errdefs.ErrFailedPrecondition)
		}
	}
	a.containers[id] = &container{req: r, procs: map[string]*process{"": newProcess(r.GetStdio())}}
	return &agent.CreateContainerResponse{Pid: 1}, nil
}

func (s containersService) Start(ctx context.Context, r *agent.StartContainerRequest) (*agent.StartContainerResponse, error) {
	a := s.a
	a.mu.Lock()
	defer a.mu.Unlock()
	if err := a.call("Containers.Start", r.GetContainerId(), ""); err != nil {
		return nil, err
	}
	p, err := a.process(r.GetContainerId(), "")
	if err != nil {
		return nil, err
	}
	if p.started {
		return nil, fmt.Errorf("container %s already started: %w", r.GetContainerId(), errdefs.ErrFailedPrecondition)
	}
	p.started = true
	return &agent.StartContainerResponse{Pid: 1}, nil
}

// Signal ends the process (with 128+signal) for SIGKILL, SIGTERM and SIGINT; others
// are only recorded. All reaches the container's execs too.
func (s containersService) Signal(ctx context.Context, r *agent.SignalRequest) (*emptypb.Empty, error) {
	a := s.a
	a.mu.Lock()
	defer a.mu.Unlock()
	if err := a.call("Containers.Signal", r.GetContainerId(), r.GetExecId()); err != nil {
		return nil, err
	}
	p, err := a.process(r.GetContainerId(), r.GetExecId())
	if err != nil {
		return nil, err
	}
	procs := []*process{p}
	if r.GetAll() && r.GetExecId() == "" {
		for _, e := range a.containers[r.GetContainerId()].procs {
			procs = append(procs, e)
		}
	}
	switch unix.Signal(r.GetSignal()) {
	case unix.SIGKILL, unix.SIGTERM, unix.SIGINT:
		for _, p := range procs {
			if p.started {
				p.end(128 + r.GetSignal())
			}
		}
	}
	return &emptypb.Empty{}, nil
}

func (s containersService) Wait(ctx context.Context, r *agent.WaitRequest) (*agent.WaitResponse, error) {
	a := s.a
	a.mu.Lock()
	if err := a.call("Containers.Wait", r.GetContainerId(), r.GetExecId()); err != nil {
		a.mu.Unlock()
		return nil, err
	}
	p, err := a.process(r.GetContainerId(), r.GetExecId())
	a.mu.Unlock()
	if err != nil {
		return nil, err
	}
	select {
	case <-p.exited:
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	return &agent.WaitResponse{Exit: p.exit}, nil
}

// Delete refuses a container whose init process runs, as the real agent (without force).
func (s containersService) Delete(ctx context.Context, r *agent.DeleteContainerRequest) (*agent.DeleteContainerResponse, error) {
	a := s.a
	a.mu.Lock()
	defer a.mu.Unlock()
	id := r.GetContainerId()
	if err := a.call("Containers.Delete", id, ""); err != nil {
		return nil, err
	}
	p, err := a.process(id, "")
	if err != nil {
		return nil, err
	}
	if p.started && p.exit == nil {
		return nil, fmt.Errorf("container %s is running: %w", id, errdefs.ErrFailedPrecondition)
	}
	for _, e := range a.containers[id].procs {
		e.end(128 + uint32(unix.SIGKILL))
	}
	delete(a.containers, id)
	return &agent.DeleteContainerResponse{Exit: p.exit}, nil
}

func (s containersService) simple(method, id string) error {
	a := s.a
	a.mu.Lock()
	defer a.mu.Unlock()
	if err := a.call(method, id, ""); err != nil {
		return err
	}
	_, err := a.process(id, "")
	return err
}

func (s containersService) Update(ctx context.Context, r *agent.UpdateContainerRequest) (*emptypb.Empty, error) {
	return &emptypb.Empty{}, s.simple("Containers.Update", r.GetContainerId())
}

// StatsTypeURL is the type of the metrics Stats answers with: a stand-in whose value is
// how many Stats calls the agent has had, this one included ("3"), so that a test tells
// a new reply from an earlier one and sees which replies one call gave.
const StatsTypeURL = "fakevm/stats"

// StatsAlso is the method a Stats call is recorded under once more for each container
// it read besides its own (StatsRequest.Also).
const StatsAlso = "Containers.Stats also"

// Stats answers for the container, and for each of r.Also that exists, with the same
// stand-in (StatsTypeURL).
func (s containersService) Stats(ctx context.Context, r *agent.StatsRequest) (*agent.StatsResponse, error) {
	id := r.GetContainerId()
	if err := s.simple("Containers.Stats", id); err != nil {
		return nil, err
	}
	m := &anypb.Any{TypeUrl: StatsTypeURL, Value: []byte(strconv.Itoa(s.a.Count("Containers.Stats", "")))}
	resp := &agent.StatsResponse{Metrics: m}
	s.a.mu.Lock()
	defer s.a.mu.Unlock()
	for _, other := range r.GetAlso() {
		if _, err := s.a.process(other, ""); err != nil || other == id {
			continue
		}
		s.a.call(StatsAlso, other, "")
		if resp.Also == nil {
			resp.Also = map[string]*anypb.Any{}
		}
		resp.Also[other] = m
	}
	return resp, nil
}

func (s containersService) Pids(ctx context.Context, r *agent.PidsRequest) (*agent.PidsResponse, error) {
	return &agent.PidsResponse{Processes: []*agent.ProcessInfo{{Pid: 1}}}, s.simple("Containers.Pids", r.GetContainerId())
}

func (s containersService) Pause(ctx context.Context, r *agent.PauseRequest) (*emptypb.Empty, error) {
	return &emptypb.Empty{}, s.simple("Containers.Pause", r.GetContainerId())
}

func (s containersService) Resume(ctx context.Context, r *agent.ResumeRequest) (*emptypb.Empty, error) {
	return &emptypb.Empty{}, s.simple("Containers.Resume", r.GetContainerId())
}

// Events streams the OOM events OOM sends, until the call ends.
func (s containersService) Events(ctx context.Context, r *agent.EventsRequest, ss agent.Containers_EventsServer) error {
	a := s.a
	a.mu.Lock()
	err := a.call("Containers.Events", "", "")
	a.mu.Unlock()
	if err != nil {
		return errgrpc.ToGRPC(err)
	}
	for {
		select {
		case id := <-a.oom:
			if err := ss.Send(&agent.Event{ContainerId: id, Timestamp: timestamppb.Now(), Kind: &agent.Event_Oom{Oom: &agent.OOMEvent{}}}); err != nil {
				return err
			}
		case <-ctx.Done():
			return nil
		}
	}
}

func (s containersService) UpdateCopiedMount(ctx context.Context, r *agent.UpdateCopiedMountRequest) (*emptypb.Empty, error) {
	s.a.mu.Lock()
	defer s.a.mu.Unlock()
	if err := s.a.call("Containers.UpdateCopiedMount", r.GetKey(), ""); err != nil {
		return nil, err
	}
	return &emptypb.Empty{}, nil
}

type execService struct{ a *Agent }

func (s execService) Create(ctx context.Context, r *agent.CreateExecRequest) (*emptypb.Empty, error) {
	a := s.a
	a.mu.Lock()
	defer a.mu.Unlock()
	if err := a.call("Exec.Create", r.GetContainerId(), r.GetExecId()); err != nil {
		return nil, err
	}
	init, err := a.process(r.GetContainerId(), "")
	if err != nil {
		return nil, err
	}
	if !init.started || init.exit != nil {
		return nil, fmt.Errorf("container %s is not running: %w", r.GetContainerId(), errdefs.ErrFailedPrecondition)
	}
	c := a.containers[r.GetContainerId()]
	if _, ok := c.procs[r.GetExecId()]; ok || r.GetExecId() == "" {
		return nil, fmt.Errorf("exec %q of container %s: %w", r.GetExecId(), r.GetContainerId(), errdefs.ErrAlreadyExists)
	}
	c.procs[r.GetExecId()] = newProcess(r.GetStdio())
	return &emptypb.Empty{}, nil
}

func (s execService) Start(ctx context.Context, r *agent.StartExecRequest) (*agent.StartExecResponse, error) {
	a := s.a
	a.mu.Lock()
	defer a.mu.Unlock()
	if err := a.call("Exec.Start", r.GetContainerId(), r.GetExecId()); err != nil {
		return nil, err
	}
	p, err := a.process(r.GetContainerId(), r.GetExecId())
	if err != nil {
		return nil, err
	}
	if r.GetExecId() == "" || p.started {
		return nil, fmt.Errorf("exec %q of container %s already started: %w", r.GetExecId(), r.GetContainerId(), errdefs.ErrFailedPrecondition)
	}
	p.started = true
	return &agent.StartExecResponse{Pid: 2}, nil
}

func (s execService) Delete(ctx context.Context, r *agent.DeleteExecRequest) (*agent.DeleteExecResponse, error) {
	a := s.a
	a.mu.Lock()
	defer a.mu.Unlock()
	if err := a.call("Exec.Delete", r.GetContainerId(), r.GetExecId()); err != nil {
		return nil, err
	}
	p, err := a.process(r.GetContainerId(), r.GetExecId())
	if err != nil {
		return nil, err
	}
	if r.GetExecId() == "" {
		return nil, fmt.Errorf("exec without an id: %w", errdefs.ErrInvalidArgument)
	}
	if p.started && p.exit == nil {
		return nil, fmt.Errorf("exec %s of container %s is running: %w", r.GetExecId(), r.GetContainerId(), errdefs.ErrFailedPrecondition)
	}
	p.end(128 + uint32(unix.SIGKILL))
	delete(a.containers[r.GetContainerId()].procs, r.GetExecId())
	return &agent.DeleteExecResponse{Exit: p.exit}, nil
}

type ioService struct{ a *Agent }

func (s ioService) ResizePty(ctx context.Context, r *agent.ResizePtyRequest) (*emptypb.Empty, error) {
	a := s.a
	a.mu.Lock()
	defer a.mu.Unlock()
	if err := a.call("IO.ResizePty", r.GetContainerId(), r.GetExecId()); err != nil {
		return nil, err
	}
	_, err := a.process(r.GetContainerId(), r.GetExecId())
	return &emptypb.Empty{}, err
}

func (s ioService) CloseStdin(ctx context.Context, r *agent.CloseStdinRequest) (*emptypb.Empty, error) {
	a := s.a
	a.mu.Lock()
	defer a.mu.Unlock()
	if err := a.call("IO.CloseStdin", r.GetContainerId(), r.GetExecId()); err != nil {
		return nil, err
	}
	_, err := a.process(r.GetContainerId(), r.GetExecId())
	return &emptypb.Empty{}, err
}
