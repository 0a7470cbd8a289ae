// Package hostcheck finds out, by real probes, whether this host can run
// Caisson and how: which accelerator and which shim↔agent transport. It backs
// `caisson check`. Nothing is decided from a file's existence alone: guests are
// booted, loop devices attached, filesystems mounted, a tap device created.
package hostcheck

import (
	"context"
	"fmt"
	"io"
	"os/exec"
	"strings"
	"time"

	"github.com/caisson-containers/caisson/internal/transport"
	"github.com/caisson-containers/caisson/shim/config"
	"github.com/caisson-containers/caisson/shim/vmm/qemu/accel"
)

// Status is how one item came out.
type Status int

const (
	// OK: present and working.
	OK Status = iota
	// Absent: an optional feature is missing; Caisson does without it.
	Absent
	// Warn: works, but something deserves attention.
	Warn
	// Fail: Caisson cannot run until this is fixed.
	Fail
)

func (s Status) String() string {
	return [...]string{"ok", "no", "warn", "FAIL"}[s]
}

// Result is one line of the report.
type Result struct {
	Item   string
	Status Status
	Detail string
}

// Verdict is what Caisson will use on this host.
type Verdict struct {
	Accelerator accel.Accelerator
	Transport   transport.Kind
	// CanRun is false when any item failed.
	CanRun bool
}

// Options says what to check against.
type Options struct {
	Config config.Config
	// StateRoot is where Caisson keeps its data (snapshots, VM state); its free space is reported.
	StateRoot string
	// ProbeTimeout bounds each probe guest; 0 means accel.DefaultTimeout.
	ProbeTimeout time.Duration
	// Cache remembers accelerator probes for this boot; nil probes every time.
	Cache *accel.Cache
	// ContainerdAddress is containerd's socket, whose version is checked against
	// SnapshotterConfig's mount_mode; "" skips the check.
	ContainerdAddress string
	// SnapshotterConfig is caisson-snapshotter's configuration file.
	SnapshotterConfig string
}

// Run runs every probe and returns the results in report order and the verdict.
func Run(ctx context.Context, o Options) ([]Result, Verdict) {
	var results []Result
	add := func(item string, st Status, format string, args ...any) {
		results = append(results, Result{Item: item, Status: st, Detail: fmt.Sprintf(format, args...)})
	}

	qemu := o.Config.Hypervisor.Path
	if qemu == "" {
		qemu = "qemu-system-x86_64"
	}
	qemuPath, err := exec.LookPath(qemu)
	if err != nil {
		add("qemu", Fail, "%s not found: install qemu-system-x86 (make deps)", qemu)
	} else {
		results = append(results, qemuStatus(ctx, qemuPath))
	}

	ao := accel.Options{QEMU: qemuPath, Kernel: o.Config.Guest.Kernel, Timeout: o.ProbeTimeout, Cache: o.Cache}
	var kvmErr, tcgErr, vsockErr error
	if qemuPath != "" {
		kvmErr = accel.Probe(ctx, accel.KVM, ao)
		tcgErr = accel.Probe(ctx, accel.TCG, ao)
		vsockErr = accel.ProbeVhostVsock(ctx, ao)
	} else {
		kvmErr, tcgErr, vsockErr = err, err, err
	}
	if kvmErr == nil {
		add("kvm", OK, "usable: a guest kernel booted under it")
	} else {
		add("kvm", Absent, "not usable: %v", kvmErr)
	}
	if tcgErr == nil {
		add("tcg", OK, "available: software emulation")
	} else {
		add("tcg", Fail, "not usable: %v", tcgErr)
	}
	// vhost-vsock is information only: pods reach their agent over virtio-serial whether
	// or not the host has it (see the transport below).
	if vsockErr == nil {
		add("vhost-vsock", OK, "QEMU can attach vhost-vsock devices (information only: pods use virtio-serial)")
	} else {
		add("vhost-vsock", Absent, "not available (%v) (information only: pods use virtio-serial)", vsockErr)
	}

	results = append(results, guestArtifacts(o.Config)...)
	results = append(results, guestModules(o.Config)...)
	results = append(results, hostFeatures(ctx)...)
	results = append(results, tools()...)
	results = append(results, cgroupVersion(), diskSpace(o.StateRoot))
	if o.ContainerdAddress != "" {
		results = append(results, containerdStatus(ctx, o.ContainerdAddress, o.SnapshotterConfig))
	}

	// The transport is the one pods will use, not the best the host offers: the pod path
	// (shim/pod) speaks virtio-serial only, and config.Validate refuses
	// guest.transport = "vsock", so a vhost-vsock host still gets serial.
	if err := o.Config.Validate(); err != nil {
		add("config", Fail, "%v", err)
	}
	v := Verdict{CanRun: true, Transport: transport.Serial}
	mode := accel.Mode(o.Config.Hypervisor.Accelerator)
	switch {
	case (mode == accel.Auto || mode == accel.ModeKVM) && kvmErr == nil:
		v.Accelerator = accel.KVM
	case mode == accel.ModeKVM:
		add("accelerator", Fail, "hypervisor.accelerator = \"kvm\" but KVM is not usable")
	case tcgErr == nil:
		v.Accelerator = accel.TCG
	}
	for _, r := range results {
		if r.Status == Fail {
			v.CanRun = false
		}
	}
	if v.Accelerator == "" {
		v.CanRun = false
	}
	return results, v
}

func qemuStatus(ctx context.Context, path string) Result {
	r := func(st Status, format string, args ...any) Result {
		return Result{Item: "qemu", Status: st, Detail: fmt.Sprintf(format, args...)}
	}
	out, err := exec.CommandContext(ctx, path, "--version").Output()
	if err != nil {
		return r(Fail, "%s --version: %v", path, err)
	}
	version := strings.TrimSpace(strings.SplitN(string(out), "\n", 2)[0])
	out, err = exec.CommandContext(ctx, path, "-machine", "help").Output()
	if err != nil {
		return r(Fail, "%s -machine help: %v", path, err)
	}
	var have []string
	for _, m := range []string{"q35", "microvm"} {
		if strings.Contains(string(out), "\n"+m+" ") {
			have = append(have, m)
		}
	}
	if !strings.Contains(strings.Join(have, " "), "q35") {
		return r(Fail, "%s (%s) has no q35 machine", path, version)
	}
	return r(OK, "%s: %s; machines: %s", path, version, strings.Join(have, ", "))
}

// Print writes the report, one line per item, then the verdict.
func Print(w io.Writer, results []Result, v Verdict) {
	for _, r := range results {
		fmt.Fprintf(w, "%-14s %-5s %s\n", r.Item, r.Status, r.Detail)
	}
	if v.CanRun {
		fmt.Fprintf(w, "%-14s %-5s Caisson can run here: accelerator %s, shim<->agent transport %s\n", "verdict", OK, v.Accelerator, v.Transport)
	} else {
		fmt.Fprintf(w, "%-14s %-5s Caisson cannot run here until the FAIL lines are fixed\n", "verdict", Fail)
	}
}
