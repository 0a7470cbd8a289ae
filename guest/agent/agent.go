// Package agent is caisson-agent, the guest's PID 1: it sets the VM up (package boot),
// reaps every process (package reaper), and serves the shim's API.
package agent

import (
	"context"
	"fmt"
	"os"

	"github.com/containerd/log"

	"github.com/caisson-containers/caisson/guest/agent/boot"
	"github.com/caisson-containers/caisson/guest/agent/reaper"
)

// Main runs the agent. As PID 1 it never returns: whatever ends it, it powers the VM off.
func Main(ctx context.Context) (retErr error) {
	pid1 := os.Getpid() == 1
	if pid1 {
		defer func() {
			if retErr != nil {
				log.G(ctx).WithError(retErr).Error("agent failed; powering off")
			}
			if err := boot.PowerOff(ctx); err != nil {
				log.G(ctx).WithError(err).Error("power off")
			}
			select {} // PID 1 must not exit: that panics the kernel
		}()
		if err := boot.MountBase(ctx); err != nil {
			return fmt.Errorf("base mounts: %w", err)
		}
		if err := boot.AttachConsole(); err != nil {
			return fmt.Errorf("console: %w", err)
		}
	}
	params := map[string]string{}
	if pid1 {
		var err error
		if params, err = boot.Cmdline(); err != nil {
			return err
		}
	}
	if _, debug := params["debug"]; debug {
		_ = log.SetLevel("debug")
	}
	if pid1 {
		dir, err := boot.ModulesDir()
		if err != nil {
			return err
		}
		if _, err := boot.LoadModules(ctx, dir); err != nil {
			return err
		}
	}
	r := reaper.New()
	go r.Run()
	defer r.Stop()

	log.G(ctx).Info("caisson-agent ready")
	select {}
}
