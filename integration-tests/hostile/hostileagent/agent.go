// Package hostileagent is a guest agent that a compromised guest could run: it speaks
// the agent's transport (the serial handshake, yamux, the preamble, ttrpc with the
// api/agent/v1 services) and, per Behaviour, answers as the real agent would, or
// misbehaves in one way: it hangs, answers late, floods a process's output, writes
// junk or oversized frames, opens streams to the host, pings without end, reports OOM
// kills and pids it makes up, or exits in the middle of a call.
//
// The fake QEMU of the hostile tests (../fakeqemu) runs it on the agent channel, so that
// the real shim, its pod and task service and its transport meet it as they would meet
// a guest. Every misbehaviour starts with the first container's Start, once the pod is
// up.
package hostileagent

import (
	"context"
	"crypto/rand"
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"os"
	"sync"
	"time"

	"github.com/containerd/errdefs"
	"github.com/containerd/errdefs/pkg/errgrpc"
	"github.com/containerd/ttrpc"
	"github.com/hashicorp/yamux"
	"google.golang.org/protobuf/types/known/emptypb"
	"google.golang.org/protobuf/types/known/timestamppb"

	agent "github.com/caisson-containers/caisson/api/agent/v1"
	"github.com/caisson-containers/caisson/internal/transport"
)

// Behaviour is one way the agent misbehaves.
type Behaviour string

const (
	// Benign answers as the real agent does: the control.
	Benign Behaviour = "benign"
	// Hang answers nothing from the first Start on.
	Hang Behaviour = "hang"
	// Late answers every call from the first Start on LateBy late.
	Late Behaviour = "late"
	// ExitMidCall exits (the VM ends) while the first Start is in progress.
	ExitMidCall Behaviour = "exit-mid-call"
	// FloodStdout writes the container's stdout without end from its Start.
	FloodStdout Behaviour = "flood-stdout"
	// JunkFrames writes random bytes on the port in place of yamux frames.
	JunkFrames Behaviour = "junk-frames"
	// OversizedFrame writes a yamux data frame far larger than any receive window.
	OversizedFrame Behaviour = "oversized-frame"
	// OversizedMessage answers on the ttrpc connection with a message of
	// OversizedMessageBytes, over ttrpc's 4 MiB limit, before the real answer.
	OversizedMessage Behaviour = "oversized-message"
	// ManyStreams opens ManyStreamsCount streams to the host, filling each.
	ManyStreams Behaviour = "many-streams"
	// PingFlood sends PingFloodCount yamux ping requests while it reads nothing.
	PingFlood Behaviour = "ping-flood"
	// BogusOOM reports BogusOOMCount OOM kills of the container.
	BogusOOM Behaviour = "bogus-oom"
	// WrongIDs reports OOM kills of containers that are not the pod's (WrongIDTargets
	// and the ids the kernel command line names), then one of its own.
	WrongIDs Behaviour = "wrong-ids"
	// BogusPids reports pid 1 and the shim's own pid for every process.
	BogusPids Behaviour = "bogus-pids"
)

// Behaviours are every Behaviour.
var Behaviours = []Behaviour{Benign, Hang, Late, ExitMidCall, FloodStdout, JunkFrames, OversizedFrame,
	OversizedMessage, ManyStreams, PingFlood, BogusOOM, WrongIDs, BogusPids}

const (
	// LateBy is how late Late answers: late, but within every deadline of the shim.
	LateBy = time.Second
	// OversizedMessageBytes is the size of OversizedMessage's message.
	OversizedMessageBytes = 64 << 20
	// ManyStreamsCount and ManyStreamsBytes: streams ManyStreams opens, bytes in each.
	ManyStreamsCount = 10_000
	ManyStreamsBytes = 64 << 10
	// PingFloodCount is how many pings PingFlood sends.
	PingFloodCount = 500_000
	// BogusOOMCount is how many OOM events BogusOOM reports.
	BogusOOMCount = 5_000
	// ExitCode is what the fake QEMU exits with for ExitMidCall.
	ExitCode = 3
)

// WrongIDTargets are ids WrongIDs reports OOM kills of, besides the ones it is given.
var WrongIDTargets = []string{"", "victim", "../../../etc/passwd", string(make([]byte, 64<<10))}

// Agent serves one behaviour.
type Agent struct {
	behaviour Behaviour
	// others are container ids WrongIDs names (another runtime's containers).
	others []string

	mu         sync.Mutex
	containers map[string]*proc // by container id, then "id/exec"
	events     agent.Containers_EventsServer
	eventsSet  chan struct{}
	started    bool          // the first Start came: misbehave from now on
	hung       chan struct{} // never closed: what Hang waits on
}

// New returns an agent with behaviour b; others are the ids WrongIDs reports.
func New(b Behaviour, others []string) *Agent {
	return &Agent{behaviour: b, others: others, containers: map[string]*proc{}, eventsSet: make(chan struct{}), hung: make(chan struct{})}
}

// proc is a process the agent pretends to run.
type proc struct {
	exit    chan struct{} // closed by a signal
	code    uint32
	outputs []net.Conn // stdout and stderr connections, closed at exit
	stdout  net.Conn
	started bool
	flood   sync.Once
}

// maybeFlood starts FloodStdout's flood once the process has started and its stdout
// connection has come (in either order); s.Agent.mu is held.
func (s *session) maybeFlood(p *proc) {
	if s.behaviour == FloodStdout && p.started && p.stdout != nil {
		p.flood.Do(func() { go flood(p.stdout) })
	}
}

// Serve runs the agent over port (the guest end of the agent channel) until it ends.
func (a *Agent) Serve(ctx context.Context, port io.ReadWriteCloser) error {
	r, err := transport.GuestHandshake(port)
	if err != nil {
		return err
	}
	w := &framedWriter{w: port}
	gate := &gatedReader{r: r, open: make(chan struct{})}
	close(gate.open)
	cfg := yamux.DefaultConfig()
	cfg.LogOutput = io.Discard
	cfg.StreamOpenTimeout = 0
	ys, err := yamux.Server(&conn{Reader: gate, Writer: w, Closer: port}, cfg)
	if err != nil {
		return err
	}
	defer ys.Close()
	srv, err := ttrpc.NewServer()
	if err != nil {
		return err
	}
	defer srv.Close()
	s := &session{Agent: a, ys: ys, w: w, gate: gate}
	agent.RegisterSandboxService(srv, &sandboxSvc{s})
	agent.RegisterStorageService(srv, &storageSvc{s})
	agent.RegisterContainersService(srv, &containersSvc{s})
	agent.RegisterExecService(srv, &execSvc{s})
	agent.RegisterIOService(srv, &ioSvc{s})
	l := &capturingListener{Listener: transport.Demux(ctx, ys, s.stdio), s: s}
	return srv.Serve(ctx, l)
}

// session is the agent over one host connection.
type session struct {
	*Agent
	ys   *yamux.Session
	w    *framedWriter
	gate *gatedReader

	mu    sync.Mutex
	ttrpc net.Conn // the host's ttrpc connection, guest end
}

// misbehave runs before each answer from the first Start on: Hang and Late happen here.
func (s *session) misbehave(ctx context.Context) {
	s.Agent.mu.Lock()
	started := s.started
	s.Agent.mu.Unlock()
	if !started {
		return
	}
	switch s.behaviour {
	case Hang:
		<-s.hung
	case Late:
		time.Sleep(LateBy)
	}
}

// onFirstStart does what the behaviour does at the first Start, before its answer.
func (s *session) onFirstStart(ctx context.Context, id string) {
	switch s.behaviour {
	case ExitMidCall:
		os.Exit(ExitCode)
	case JunkFrames:
		junk := make([]byte, 1<<20)
		rand.Read(junk)
		junk[0] = 0xff // never a yamux version byte
		s.w.inject(junk)
		<-s.hung // the session is over; nothing to answer
	case OversizedFrame:
		// A data frame on the host's first stream (its ttrpc connection) that declares
		// 2 GiB, far beyond the 256 KiB window, then some of its body.
		hdr := make([]byte, 12)
		binary.BigEndian.PutUint32(hdr[4:8], 1)
		binary.BigEndian.PutUint32(hdr[8:12], 2<<30-1)
		s.w.inject(append(hdr, make([]byte, 64<<10)...))
		<-s.hung
	case OversizedMessage:
		// A ttrpc response header declaring OversizedMessageBytes for a stream the host
		// has no call on, then the whole body, through yamux's flow control.
		s.mu.Lock()
		c := s.ttrpc
		s.mu.Unlock()
		if c != nil {
			hdr := make([]byte, 10)
			binary.BigEndian.PutUint32(hdr[0:4], OversizedMessageBytes)
			binary.BigEndian.PutUint32(hdr[4:8], 0x7ffffff1)
			hdr[8] = 2 // response
			// Nothing else writes to this connection now: the server is in this call.
			c.Write(hdr)
			chunk := make([]byte, 1<<20)
			for range OversizedMessageBytes / len(chunk) {
				if _, err := c.Write(chunk); err != nil {
					break
				}
			}
		}
	case ManyStreams:
		fill := make([]byte, ManyStreamsBytes)
		for range ManyStreamsCount {
			st, err := s.ys.OpenStream()
			if err != nil {
				break
			}
			st.Write(fill) // the host resets it at once: the write may fail
			st.Close()
		}
	case PingFlood:
		// Read nothing while pinging, so that the host's answers would wait.
		s.gate.pause()
		ping := make([]byte, 12)
		ping[1], ping[3] = 2, 1 // type ping, flag SYN
		batch := make([]byte, 0, 12*1000)
		for range 1000 {
			batch = append(batch, ping...)
		}
		for range PingFloodCount / 1000 {
			s.w.inject(batch)
		}
		s.gate.resume()
	case BogusOOM:
		s.sendEvents(ctx, id, BogusOOMCount)
	case WrongIDs:
		for _, other := range append(append([]string(nil), WrongIDTargets...), s.others...) {
			s.sendEvents(ctx, other, 1)
		}
		s.sendEvents(ctx, id, 1) // the marker: the ones before were read
	}
}

// sendEvents reports n OOM kills of container id on the events stream.
func (s *session) sendEvents(ctx context.Context, id string, n int) {
	select {
	case <-s.eventsSet:
	case <-ctx.Done():
		return
	}
	s.Agent.mu.Lock()
	es := s.events
	s.Agent.mu.Unlock()
	for range n {
		if err := es.Send(&agent.Event{ContainerId: id, Timestamp: timestamppb.Now(), Kind: &agent.Event_Oom{Oom: &agent.OOMEvent{}}}); err != nil {
			return
		}
	}
}

// pid is the pid the agent reports: BogusPids' lies, or a plausible guest pid.
func (s *session) pid(first bool) uint32 {
	if s.behaviour != BogusPids {
		return 42
	}
	if first {
		return 1
	}
	return uint32(os.Getppid()) // the shim's: QEMU's parent
}

// stdio takes the host's stdio connections: output is held until the process exits
// (FloodStdout floods it), input is read and dropped.
func (s *session) stdio(st *agent.StdioStream, c net.Conn) {
	key := procKey(st.GetContainerId(), st.GetExecId())
	s.Agent.mu.Lock()
	p, ok := s.containers[key]
	if ok && st.GetStream() != agent.StreamKind_STREAM_KIND_STDIN {
		p.outputs = append(p.outputs, c)
	}
	s.Agent.mu.Unlock()
	if !ok {
		c.Close()
		return
	}
	switch st.GetStream() {
	case agent.StreamKind_STREAM_KIND_STDIN:
		go func() {
			io.Copy(io.Discard, c)
			c.Close()
		}()
	case agent.StreamKind_STREAM_KIND_STDOUT:
		s.Agent.mu.Lock()
		p.stdout = c
		s.maybeFlood(p)
		s.Agent.mu.Unlock()
	}
}

func procKey(id, exec string) string {
	if exec == "" {
		return id
	}
	return id + "/" + exec
}

func (s *session) newProc(key string) {
	s.Agent.mu.Lock()
	defer s.Agent.mu.Unlock()
	s.containers[key] = &proc{exit: make(chan struct{})}
}

func (s *session) proc(key string) (*proc, error) {
	s.Agent.mu.Lock()
	defer s.Agent.mu.Unlock()
	p, ok := s.containers[key]
	if !ok {
		return nil, errgrpc.ToGRPC(fmt.Errorf("process %s: %w", key, errdefs.ErrNotFound))
	}
	return p, nil
}

// exit ends a process: its output connections close, its Wait returns.
func (s *session) exit(p *proc, code uint32) {
	s.Agent.mu.Lock()
	defer s.Agent.mu.Unlock()
	select {
	case <-p.exit:
		return
	default:
	}
	p.code = code
	close(p.exit)
	for _, c := range p.outputs {
		c.Close()
	}
}

// flood writes to c without end, until it fails (the process exited, or the host went).
func flood(c net.Conn) {
	buf := make([]byte, 64<<10)
	for i := range buf {
		buf[i] = 'a' + byte(i%26)
	}
	for {
		if _, err := c.Write(buf); err != nil {
			return
		}
	}
}

type sandboxSvc struct{ s *session }

func (v *sandboxSvc) Create(ctx context.Context, _ *agent.CreateSandboxRequest) (*emptypb.Empty, error) {
	v.s.misbehave(ctx)
	return &emptypb.Empty{}, nil
}

func (v *sandboxSvc) SetNetwork(ctx context.Context, _ *agent.SetNetworkRequest) (*emptypb.Empty, error) {
	v.s.misbehave(ctx)
	return &emptypb.Empty{}, nil
}

func (v *sandboxSvc) SetTime(ctx context.Context, _ *agent.SetTimeRequest) (*emptypb.Empty, error) {
	v.s.misbehave(ctx)
	return &emptypb.Empty{}, nil
}

func (v *sandboxSvc) Check(ctx context.Context, _ *agent.CheckRequest) (*agent.CheckResponse, error) {
	v.s.misbehave(ctx)
	return &agent.CheckResponse{UptimeNs: 1}, nil
}

func (v *sandboxSvc) WarmUp(ctx context.Context, _ *agent.WarmUpRequest) (*agent.WarmUpResponse, error) {
	v.s.misbehave(ctx)
	return &agent.WarmUpResponse{}, nil
}

func (v *sandboxSvc) Version(ctx context.Context, _ *agent.VersionRequest) (*agent.VersionResponse, error) {
	v.s.misbehave(ctx)
	return &agent.VersionResponse{AgentVersion: "hostile-" + string(v.s.behaviour), ApiVersion: agent.APIVersion, KernelRelease: "hostile"}, nil
}

func (v *sandboxSvc) Destroy(ctx context.Context, _ *agent.DestroySandboxRequest) (*emptypb.Empty, error) {
	v.s.misbehave(ctx)
	return &emptypb.Empty{}, nil
}

type storageSvc struct{ s *session }

func (v *storageSvc) Mount(ctx context.Context, r *agent.MountStorageRequest) (*agent.MountStorageResponse, error) {
	v.s.misbehave(ctx)
	return &agent.MountStorageResponse{MountPoint: "/run/storage/" + r.GetStorageId(), DevicePath: "/dev/vda"}, nil
}

func (v *storageSvc) Unmount(ctx context.Context, _ *agent.UnmountStorageRequest) (*emptypb.Empty, error) {
	v.s.misbehave(ctx)
	return &emptypb.Empty{}, nil
}

type containersSvc struct{ s *session }

func (v *containersSvc) Create(ctx context.Context, r *agent.CreateContainerRequest) (*agent.CreateContainerResponse, error) {
	v.s.misbehave(ctx)
	v.s.newProc(r.GetContainerId())
	return &agent.CreateContainerResponse{Pid: v.s.pid(true)}, nil
}

func (v *containersSvc) Start(ctx context.Context, r *agent.StartContainerRequest) (*agent.StartContainerResponse, error) {
	v.s.Agent.mu.Lock()
	first := !v.s.started
	v.s.started = true
	v.s.Agent.mu.Unlock()
	v.s.misbehave(ctx) // from this Start on
	p, err := v.s.proc(r.GetContainerId())
	if err != nil {
		return nil, err
	}
	if first {
		v.s.onFirstStart(ctx, r.GetContainerId())
	}
	v.s.Agent.mu.Lock()
	p.started = true
	v.s.maybeFlood(p)
	v.s.Agent.mu.Unlock()
	return &agent.StartContainerResponse{Pid: v.s.pid(false)}, nil
}

func (v *containersSvc) Signal(ctx context.Context, r *agent.SignalRequest) (*emptypb.Empty, error) {
	v.s.misbehave(ctx)
	p, err := v.s.proc(procKey(r.GetContainerId(), r.GetExecId()))
	if err != nil {
		return nil, err
	}
	if r.GetSignal() == 9 || r.GetSignal() == 15 {
		v.s.exit(p, 128+r.GetSignal())
		if r.GetExecId() == "" {
			// The container's init ends its PID namespace, and its execs with it.
			v.s.Agent.mu.Lock()
			var execs []*proc
			for k, e := range v.s.containers {
				if len(k) > len(r.GetContainerId()) && k[:len(r.GetContainerId())+1] == r.GetContainerId()+"/" {
					execs = append(execs, e)
				}
			}
			v.s.Agent.mu.Unlock()
			for _, e := range execs {
				v.s.exit(e, 137)
			}
		}
	}
	return &emptypb.Empty{}, nil
}

func (v *containersSvc) Wait(ctx context.Context, r *agent.WaitRequest) (*agent.WaitResponse, error) {
	p, err := v.s.proc(procKey(r.GetContainerId(), r.GetExecId()))
	if err != nil {
		return nil, err
	}
	select {
	case <-p.exit:
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	v.s.misbehave(ctx)
	v.s.Agent.mu.Lock()
	code := p.code
	v.s.Agent.mu.Unlock()
	return &agent.WaitResponse{Exit: &agent.ExitStatus{ExitStatus: code, ExitedAt: timestamppb.Now()}}, nil
}

func (v *containersSvc) Delete(ctx context.Context, r *agent.DeleteContainerRequest) (*agent.DeleteContainerResponse, error) {
	v.s.misbehave(ctx)
	v.s.Agent.mu.Lock()
	delete(v.s.containers, r.GetContainerId())
	v.s.Agent.mu.Unlock()
	return &agent.DeleteContainerResponse{}, nil
}

func (v *containersSvc) Update(ctx context.Context, _ *agent.UpdateContainerRequest) (*emptypb.Empty, error) {
	v.s.misbehave(ctx)
	return &emptypb.Empty{}, nil
}

func (v *containersSvc) Stats(ctx context.Context, _ *agent.StatsRequest) (*agent.StatsResponse, error) {
	v.s.misbehave(ctx)
	return &agent.StatsResponse{}, nil
}

func (v *containersSvc) Pids(ctx context.Context, _ *agent.PidsRequest) (*agent.PidsResponse, error) {
	v.s.misbehave(ctx)
	return &agent.PidsResponse{Processes: []*agent.ProcessInfo{{Pid: 1}, {Pid: uint32(os.Getppid())}}}, nil
}

func (v *containersSvc) Pause(ctx context.Context, _ *agent.PauseRequest) (*emptypb.Empty, error) {
	v.s.misbehave(ctx)
	return &emptypb.Empty{}, nil
}

func (v *containersSvc) Resume(ctx context.Context, _ *agent.ResumeRequest) (*emptypb.Empty, error) {
	v.s.misbehave(ctx)
	return &emptypb.Empty{}, nil
}

func (v *containersSvc) Events(ctx context.Context, _ *agent.EventsRequest, es agent.Containers_EventsServer) error {
	v.s.Agent.mu.Lock()
	if v.s.events == nil {
		v.s.events = es
		close(v.s.eventsSet)
	}
	v.s.Agent.mu.Unlock()
	<-ctx.Done()
	return nil
}

func (v *containersSvc) UpdateCopiedMount(ctx context.Context, _ *agent.UpdateCopiedMountRequest) (*emptypb.Empty, error) {
	v.s.misbehave(ctx)
	return &emptypb.Empty{}, nil
}

type execSvc struct{ s *session }

func (v *execSvc) Create(ctx context.Context, r *agent.CreateExecRequest) (*emptypb.Empty, error) {
	v.s.misbehave(ctx)
	v.s.newProc(procKey(r.GetContainerId(), r.GetExecId()))
	return &emptypb.Empty{}, nil
}

func (v *execSvc) Start(ctx context.Context, _ *agent.StartExecRequest) (*agent.StartExecResponse, error) {
	v.s.misbehave(ctx)
	return &agent.StartExecResponse{Pid: v.s.pid(true)}, nil
}

func (v *execSvc) Delete(ctx context.Context, r *agent.DeleteExecRequest) (*agent.DeleteExecResponse, error) {
	v.s.misbehave(ctx)
	v.s.Agent.mu.Lock()
	delete(v.s.containers, procKey(r.GetContainerId(), r.GetExecId()))
	v.s.Agent.mu.Unlock()
	return &agent.DeleteExecResponse{}, nil
}

type ioSvc struct{ s *session }

func (v *ioSvc) ResizePty(ctx context.Context, _ *agent.ResizePtyRequest) (*emptypb.Empty, error) {
	v.s.misbehave(ctx)
	return &emptypb.Empty{}, nil
}

func (v *ioSvc) CloseStdin(ctx context.Context, _ *agent.CloseStdinRequest) (*emptypb.Empty, error) {
	v.s.misbehave(ctx)
	return &emptypb.Empty{}, nil
}

// capturingListener keeps the host's ttrpc connection, for OversizedMessage.
type capturingListener struct {
	net.Listener
	s *session
}

func (l *capturingListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err == nil {
		l.s.mu.Lock()
		if l.s.ttrpc == nil {
			l.s.ttrpc = c
		}
		l.s.mu.Unlock()
	}
	return c, err
}

// conn is what the guest's yamux session runs over.
type conn struct {
	io.Reader
	io.Writer
	io.Closer
}

// framedWriter passes yamux's writes to the port and lets the agent inject raw bytes
// between two of yamux's frames (yamux writes a frame's header, then its body, in two
// writes).
type framedWriter struct {
	w    io.Writer
	mu   sync.Mutex // held from a frame's header to the end of its body
	body uint32     // of the current frame, still to write
}

func (f *framedWriter) Write(b []byte) (int, error) {
	if f.body == 0 {
		f.mu.Lock()
		n, err := f.w.Write(b)
		if len(b) == 12 && b[1] == 0 { // a data frame's header: its body follows
			f.body = binary.BigEndian.Uint32(b[8:12])
		}
		if f.body == 0 || err != nil {
			f.body = 0
			f.mu.Unlock()
		}
		return n, err
	}
	n, err := f.w.Write(b)
	f.body -= min(f.body, uint32(n))
	if f.body == 0 || err != nil {
		f.body = 0
		f.mu.Unlock()
	}
	return n, err
}

// inject writes b between two frames.
func (f *framedWriter) inject(b []byte) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.w.Write(b)
}

// gatedReader is the port as yamux reads it; pause stops the reads (PingFlood).
type gatedReader struct {
	r    io.Reader
	mu   sync.Mutex
	open chan struct{}
}

func (g *gatedReader) Read(b []byte) (int, error) {
	g.mu.Lock()
	open := g.open
	g.mu.Unlock()
	<-open
	return g.r.Read(b)
}

func (g *gatedReader) pause() {
	g.mu.Lock()
	g.open = make(chan struct{})
	g.mu.Unlock()
}

func (g *gatedReader) resume() {
	g.mu.Lock()
	close(g.open)
	g.mu.Unlock()
}
