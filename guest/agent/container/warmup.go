package container

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path"
	"path/filepath"
	"time"

	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"github.com/opencontainers/runc/libcontainer/specconv"
	specs "github.com/opencontainers/runtime-spec/specs-go"
)

// warmUpID is the throwaway container WarmUp runs. A container id of the CRI or of
// containerd is never it (both are 64 hex digits or a user's name without the dot).
const warmUpID = ".caisson-warm-up"

// WarmUp creates, starts, waits for and deletes one throwaway container, whose process
// is the program exe bind-mounted read-only at args[0] and run with args, and returns its
// exit, so that what the guest does only for its first container
// is done before the pod asks for one: the cgroup parent's controllers, the kernel's caches for namespaces, mounts, devpts and
// the BPF device filter, and the state libcontainer, encoding/json and the Go runtime
// build lazily (procfs handles, capability lists, BPF feature probes, per-type
// decoders, a grown heap). A VM template is saved after it, so every pod made from the
// template starts with that state; the translated code of TCG is not saved, so a
// template's first container still costs more than its next ones.
//
// It takes the container id warmUpID while it runs, and fails if a container has it.
func (r *Runtime) WarmUp(ctx context.Context, exe string, args ...string) (Exit, error) {
	if len(args) == 0 || !path.IsAbs(args[0]) {
		return Exit{}, fmt.Errorf("warm-up process %q: want an absolute path first: %w", args, errdefs.ErrInvalidArgument)
	}
	start := time.Now()
	if err := r.Reserve(warmUpID); err != nil {
		return Exit{}, err
	}
	dir, err := os.MkdirTemp("", "caisson-warm-up-")
	if err != nil {
		r.Unreserve(warmUpID)
		return Exit{}, err
	}
	defer os.RemoveAll(dir)
	rootfs := filepath.Join(dir, "rootfs")
	b, err := json.Marshal(warmUpSpec(exe, args))
	if err == nil {
		err = os.Mkdir(rootfs, 0o755)
	}
	if err != nil {
		r.Unreserve(warmUpID)
		return Exit{}, err
	}
	// Every container's spec comes as JSON: decoding one builds encoding/json's
	// per-type state for the spec's types.
	var spec specs.Spec
	if err := json.Unmarshal(b, &spec); err != nil {
		r.Unreserve(warmUpID)
		return Exit{}, err
	}
	// Create takes the reservation over, and releases it if it fails.
	c, err := r.Create(ctx, CreateOpts{ID: warmUpID, Spec: &spec, Rootfs: rootfs})
	if err != nil {
		return Exit{}, fmt.Errorf("warm-up container: %w", err)
	}
	var exit Exit
	runErr := c.Start(ctx)
	if runErr == nil {
		exit, runErr = c.init.Wait(ctx)
	}
	if _, err := r.Delete(ctx, warmUpID, true); err != nil {
		return Exit{}, errors.Join(runErr, fmt.Errorf("delete the warm-up container: %w", err))
	}
	if runErr != nil {
		return Exit{}, fmt.Errorf("warm-up container: %w", runErr)
	}
	log.G(ctx).WithFields(log.Fields{"took": time.Since(start), "exit_status": exit.Status}).Debug("container runtime warmed up")
	return exit, nil
}

// warmUpSpec is runc's default spec (the mounts, masked and read-only paths,
// capabilities and device rules a CRI container gets too) with a read-only rootfs, cgroup
// limits, no network namespace (the pod's does not exist yet) and, as its process, exe
// bind-mounted read-only at args[0].
func warmUpSpec(exe string, args []string) *specs.Spec {
	s := specconv.Example()
	s.Root = &specs.Root{Path: "rootfs", Readonly: true}
	s.Process.Terminal = false
	s.Process.Args = args
	s.Hostname = "warm-up"
	s.Mounts = append(s.Mounts, specs.Mount{Destination: args[0], Type: "bind", Source: exe,
		Options: []string{"rbind", "ro", "nosuid", "nodev"}})
	var nss []specs.LinuxNamespace
	for _, ns := range s.Linux.Namespaces {
		if ns.Type != specs.NetworkNamespace {
			nss = append(nss, ns)
		}
	}
	s.Linux.Namespaces = nss
	memory, shares, pids := int64(64<<20), uint64(2), int64(16)
	s.Linux.Resources.Memory = &specs.LinuxMemory{Limit: &memory}
	s.Linux.Resources.CPU = &specs.LinuxCPU{Shares: &shares}
	s.Linux.Resources.Pids = &specs.LinuxPids{Limit: &pids}
	return s
}
