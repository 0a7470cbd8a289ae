package manager

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/containerd/containerd/v2/pkg/shim"
	"github.com/containerd/log"
	"github.com/sirupsen/logrus"
	"golang.org/x/sys/unix"

	"github.com/caisson-containers/caisson/shim/config"
	"github.com/caisson-containers/caisson/shim/pod"
	"github.com/caisson-containers/caisson/shim/vmm/hypervisor"
	"github.com/caisson-containers/caisson/shim/warm"
)

// WarmAction is the shim binary's first argument when it runs as a warm shim (`start`
// runs it so): a shim ahead of its pod, holding a warm VM (shim/warm, pod.Warm).
const WarmAction = "warm"

// Descriptors of a warm shim: pkg/shim serves the listening socket at shimSocketFD, which
// a claim puts there; until then it holds a placeholder. The slot's lock is at
// slotLockFD, inherited from the `start` that made the slot, and held for the shim's life.
const (
	shimSocketFD = 3
	slotLockFD   = 4
)

// slotLock keeps the slot's lock open (an unreferenced *os.File would be closed by its
// finalizer, releasing the lock).
var slotLock *os.File

// RunWarm is a warm shim's life before its pod: it restores and warms a VM, waits in
// its pool slot for a pod, and returns once a pod claimed it, with the process set up as
// that pod's shim would have been by `start` (arguments, environment, working directory,
// listening socket); the caller then runs the shim as usual, and its pod starts in the
// warm VM. Without a claim (idle timeout, SIGTERM, a VM that ended) it exits, and leaves
// nothing: QEMU dies with it and its slot goes.
func RunWarm(ctx context.Context, args []string) {
	if err := runWarm(ctx, args); err != nil {
		log.G(ctx).WithError(err).Error("warm VM")
		os.Exit(1)
	}
}

func runWarm(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet(WarmAction, flag.ContinueOnError)
	configPath := fs.String("config", "", "the runtime configuration's file")
	slot := fs.String("slot", "", "the pool slot")
	debug := fs.Bool("debug", false, "log at debug level")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *slot == "" || !filepath.IsAbs(*slot) {
		return fmt.Errorf("warm shim: -slot %q: want the pool slot's absolute path", *slot)
	}
	slotLock = os.NewFile(slotLockFD, "slot lock")
	if err := unix.Flock(slotLockFD, unix.LOCK_EX|unix.LOCK_NB); err != nil {
		return fmt.Errorf("warm shim: the slot's lock (descriptor %d): %w", slotLockFD, err)
	}
	// From here on the slot is ours: whatever ends this, it goes.
	logf, err := os.OpenFile(filepath.Join(*slot, "warm.log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		os.RemoveAll(*slot)
		return err
	}
	logrus.SetOutput(logf)
	if *debug {
		logrus.SetLevel(logrus.DebugLevel)
	}
	ctx = log.WithLogger(ctx, log.G(ctx).WithField("warm_vm", *slot))
	c, listener, w, err := waitForPod(ctx, *configPath, *slot)
	if err != nil {
		logf.Close()
		os.RemoveAll(*slot)
		if errors.Is(err, warm.ErrIdle) || errors.Is(err, context.Canceled) {
			os.Exit(0)
		}
		return err
	}
	// The pod's shim from here: what `start` would have started.
	err = unix.Dup3(int(listener.Fd()), shimSocketFD, 0)
	listener.Close()
	if err == nil {
		err = os.Chdir(c.Bundle)
	}
	if err != nil {
		w.Discard(context.WithoutCancel(ctx))
		return fmt.Errorf("take the pod's shim socket: %w", err)
	}
	os.Clearenv()
	for _, kv := range c.Env {
		if k, v, ok := strings.Cut(kv, "="); ok {
			os.Setenv(k, v)
		}
	}
	os.Args = append([]string{os.Args[0]}, c.Args...)
	pod.Hold(w)
	log.G(ctx).WithField("bundle", c.Bundle).Info("claimed by a pod")
	logrus.SetOutput(os.Stderr) // pkg/shim sets the pod shim's log up
	logf.Close()
	return nil
}

// waitForPod makes the warm VM and waits for a claim.
func waitForPod(ctx context.Context, configPath, slot string) (warm.Claim, *os.File, *pod.Warm, error) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	signals := make(chan os.Signal, 1)
	signal.Notify(signals, syscall.SIGTERM, syscall.SIGINT)
	defer signal.Stop(signals)
	go func() {
		select {
		case s := <-signals:
			log.G(ctx).WithField("signal", s).Info("warm VM ends")
			cancel()
		case <-ctx.Done():
		}
	}()
	if err := warm.Own(slot); err != nil {
		return warm.Claim{}, nil, nil, err
	}
	cfg, _, err := config.Load(configPath)
	if err != nil {
		return warm.Claim{}, nil, nil, err
	}
	hv, err := hypervisor.New(cfg)
	if err != nil {
		return warm.Claim{}, nil, nil, err
	}
	w, err := pod.PrepareWarm(ctx, cfg, hv, slot, nil)
	if err != nil {
		return warm.Claim{}, nil, nil, err
	}
	// A VM that ends while it waits ends the wait.
	go func() {
		select {
		case <-w.Done():
			log.G(ctx).Warn("the warm VM ended before a pod claimed it")
			cancel()
		case <-ctx.Done():
		}
	}()
	waiter, err := warm.Listen(slot)
	if err == nil {
		var c warm.Claim
		var listener *os.File
		c, listener, err = waiter.Wait(ctx, time.Duration(cfg.Hypervisor.WarmVMIdleTimeout))
		waiter.Close()
		if err == nil {
			return c, listener, w, nil
		}
	}
	if errors.Is(err, warm.ErrIdle) {
		log.G(ctx).Info("no pod came: the warm VM ends")
	}
	if serr := w.Stop(context.WithoutCancel(ctx)); serr != nil {
		log.G(ctx).WithError(serr).Warn("stopping the warm VM")
	}
	return warm.Claim{}, nil, nil, err
}

// warmPool is what Start does with a configuration's warm VM pool: hand the pod's shim to
// a warm shim, then start warm shims until the pool is full again.
type warmPool struct {
	pool       *warm.Pool
	want       int
	self       string
	configPath string
	debug      bool
}

// warmPoolOf is the pool of the configuration a container's start names (nil without
// warm VMs). A configuration that does not load is left to the shim to report.
func warmPoolOf(self, configPath, ns, address string, debug bool) *warmPool {
	cfg, path, err := config.Load(configPath)
	if err != nil || cfg.Hypervisor.WarmVMs == 0 {
		return nil
	}
	dir, err := warm.PoolDir(cfg.StateDir, warm.Key{Exe: self, ConfigPath: path, Namespace: ns, Address: address})
	if err != nil {
		return nil
	}
	p, err := warm.Open(dir, pod.ReleaseWarmSlot)
	if err != nil {
		return nil
	}
	return &warmPool{pool: p, want: cfg.Hypervisor.WarmVMs, self: self, configPath: path, debug: debug}
}

// claim hands the shim that start would start (args, in the bundle, serving listener) to
// a warm shim, and reports whether one took it.
func (wp *warmPool) claim(args []string, bundle string, listener *os.File) bool {
	slot, err := wp.pool.Claim(warm.Claim{Args: args, Env: shimEnv(), Bundle: bundle}, listener)
	return err == nil && slot != ""
}

// fill starts warm shims until the pool is full. Errors cost only speed: pods boot.
func (wp *warmPool) fill() {
	wp.pool.Fill(wp.want, func(slot string, lock *os.File) error {
		args := []string{WarmAction, "-config", wp.configPath, "-slot", slot}
		if wp.debug {
			args = append(args, "-debug")
		}
		cmd := exec.Command(wp.self, args...)
		cmd.Dir = slot
		cmd.Env = shimEnv()
		cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
		placeholder, err := os.Open(os.DevNull)
		if err != nil {
			return err
		}
		defer placeholder.Close()
		cmd.ExtraFiles = []*os.File{placeholder, lock} // shimSocketFD, slotLockFD
		if err := cmd.Start(); err != nil {
			return err
		}
		go cmd.Wait()
		shim.AdjustOOMScore(cmd.Process.Pid)
		return nil
	})
}

// shimEnv is the environment of the shims start starts.
func shimEnv() []string {
	return append(os.Environ(), "GOMAXPROCS=2")
}
