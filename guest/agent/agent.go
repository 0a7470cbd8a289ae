// Package agent is caisson-agent, the guest's PID 1: it sets the VM up (package boot),
// reaps every process (package reaper), and serves the shim's API (package service) on
// the transport the shim chose on the kernel command line.
package agent

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/signal"
	"time"

	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"github.com/containerd/ttrpc"
	"github.com/sirupsen/logrus"
	"golang.org/x/sys/unix"

	"github.com/caisson-containers/caisson/guest/agent/boot"
	"github.com/caisson-containers/caisson/guest/agent/reaper"
	"github.com/caisson-containers/caisson/guest/agent/service"
	"github.com/caisson-containers/caisson/internal/transport"
)

// channelModules are the modules each transport's channel needs: the agent loads those of
// its transport before it serves, and not those of the others.
var channelModules = map[transport.Kind][]string{
	transport.Serial: {"virtio_pci", "virtio_console"},
	transport.Vsock:  {"virtio_pci", "vmw_vsock_virtio_transport"},
}

// otherChannels are the modules of the transports other than k's.
func otherChannels(k transport.Kind) []string {
	var out []string
	for kind, mods := range channelModules {
		if kind != k {
			out = append(out, mods...)
		}
	}
	return out
}

// portTimeout bounds the wait for the agent's virtio-serial port to appear after its
// driver was loaded.
const portTimeout = 10 * time.Second

// Main runs the agent as the guest's PID 1. It does not return: whatever ends it (the
// shim's Sandbox.Destroy, ctrl-alt-del, a fatal error), it powers the VM off.
//
// Kernel command line parameters: caisson.transport= (see internal/transport),
// caisson.debug (debug logging), caisson.debug_console (a shell on the console; the
// debug image only).
func Main(ctx context.Context) error {
	if os.Getpid() != 1 {
		return fmt.Errorf("caisson-agent is the init of a Caisson VM; it is not meant to run as pid %d: %w", os.Getpid(), errdefs.ErrFailedPrecondition)
	}
	err := run(ctx)
	if err != nil {
		log.G(ctx).WithError(err).Error("agent failed; powering off")
	}
	if err := boot.PowerOff(ctx); err != nil {
		log.G(ctx).WithError(err).Error("power off")
	}
	select {} // PID 1 must not exit: that panics the kernel
}

func run(ctx context.Context) error {
	tl := &boot.Timeline{}
	tl.Mark("main")
	if err := boot.MountBase(ctx); err != nil {
		return fmt.Errorf("base mounts: %w", err)
	}
	tl.Mark("mounts")
	if err := slowSysmon(); err != nil {
		log.G(ctx).WithError(err).Warn("sysmon keeps the default timer slack")
	}
	if err := boot.SetModprobe(); err != nil {
		return err
	}
	if err := boot.AttachConsole(); err != nil {
		return fmt.Errorf("console: %w", err)
	}
	logrus.SetFormatter(&logrus.TextFormatter{DisableColors: true, FullTimestamp: true, TimestampFormat: time.RFC3339Nano})
	cmdline, err := os.ReadFile("/proc/cmdline")
	if err != nil {
		return err
	}
	params := boot.ParseCmdline(string(cmdline))
	if _, debug := params["debug"]; debug {
		_ = log.SetLevel("debug")
		if at, err := boot.InitStarted(); err == nil {
			tl.MarkAt("exec", at) // before main: the Go runtime's start and the packages' init
		}
	}
	dir, err := boot.ModulesDir()
	if err != nil {
		return err
	}
	endpoint, err := transport.EndpointFromCmdline(string(cmdline))
	if err != nil {
		return err
	}
	tl.Mark("console")
	// The channel's drivers first; the cgroup controllers, disks, filesystems and NICs
	// while the agent already answers (the services that need them wait).
	modules, err := boot.LoadModules(ctx, dir, channelModules[endpoint.Kind], otherChannels(endpoint.Kind))
	if err != nil {
		return err
	}
	tl.Mark("channel-modules")
	background := boot.StartBackground(ctx,
		func(ctx context.Context) error { return boot.EnableControllers(ctx, "/sys/fs/cgroup") },
		modules.LoadRest)
	// ctrl-alt-del becomes a SIGINT to the agent (not a reboot): a clean power-off.
	_ = unix.Reboot(unix.LINUX_REBOOT_CMD_CAD_OFF)
	sigc := make(chan os.Signal, 1)
	signal.Notify(sigc, unix.SIGINT, unix.SIGTERM, unix.SIGPWR)

	r := reaper.New()
	go r.Run()
	defer r.Stop()

	if _, ok := params["debug_console"]; ok {
		// The reaper collects the shell; nothing waits for it.
		if _, _, err := r.Start(func() (int, error) {
			cmd, err := boot.StartDebugShell()
			if err != nil {
				return 0, err
			}
			return cmd.Process.Pid, nil
		}); err != nil {
			log.G(ctx).WithError(err).Warn("no debug console")
		}
	}

	powerOff := make(chan struct{})
	a, err := service.New(service.Config{PowerOff: func() { close(powerOff) }, DevicesReady: background.Wait}, r)
	if err != nil {
		return err
	}
	srv, err := a.NewServer()
	if err != nil {
		return err
	}
	tl.Mark("service")
	serveErr := make(chan error, 1)
	go func() { serveErr <- serve(ctx, endpoint, srv, a, tl) }()

	select {
	case <-powerOff:
		return nil
	case s := <-sigc:
		log.G(ctx).WithField("signal", s).Info("shutting down")
		a.Shutdown(ctx)
		return nil
	case err := <-serveErr:
		a.Shutdown(ctx)
		return fmt.Errorf("serve: %w", err)
	}
}

// reconnectDelay paces re-opening the agent's serial port while no shim is connected. The
// transport's handshake waits for a host itself; this only keeps a port that fails at once
// from spinning. Short, because a VM made from a template resumes here.
const reconnectDelay = 10 * time.Millisecond

// serve serves the API until a fatal error. On the serial transport the yamux session
// ends whenever the host end of the port is not connected (before the shim dials, or
// after it went away, e.g. to be restarted): the agent then opens the port again, and
// the containers keep running.
//
// tl, the agent's start so far, is logged once it listens.
func serve(ctx context.Context, e transport.Endpoint, srv *ttrpc.Server, a *service.Agent, tl *boot.Timeline) error {
	ready := false
	for {
		l, err := listen(ctx, e)
		if err != nil {
			return err
		}
		if !ready {
			tl.Mark("listen")
			log.G(ctx).WithFields(log.Fields{"transport": e.String(), "uptime": boot.Uptime(), "timeline": tl.String()}).Info("caisson-agent ready")
			ready = true
		}
		err = srv.Serve(ctx, transport.Demux(ctx, l, a.HandleStdio))
		if e.Kind != transport.Serial || errors.Is(err, ttrpc.ErrServerClosed) {
			return err
		}
		log.G(ctx).WithError(err).Debug("agent channel closed; opening it again")
		time.Sleep(reconnectDelay)
	}
}

func listen(ctx context.Context, e transport.Endpoint) (net.Listener, error) {
	if e.Kind == transport.Vsock {
		return transport.ListenVsock(e.Port)
	}
	deadline := time.Now().Add(portTimeout)
	for {
		port, err := transport.OpenSerialPort(transport.SerialPortName)
		if err == nil {
			return transport.ListenSerial(port)
		}
		if !errdefs.IsNotFound(err) || time.Now().After(deadline) {
			return nil, err
		}
		time.Sleep(10 * time.Millisecond)
	}
}
