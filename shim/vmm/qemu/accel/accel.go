// Package accel decides, by running real guests, which accelerator QEMU can use
// on this host (KVM or TCG) and whether it can attach vhost-vsock devices.
//
// A device node is not evidence: on some hosts /dev/kvm opens but a normal guest
// hangs in it. So a probe boots guests under the accelerator with a timeout:
//  1. a 64 KiB firmware whose reset vector writes to QEMU's isa-debug-exit port
//     (tens of milliseconds; catches a missing or broken accelerator at once);
//  2. when a guest kernel is given, that kernel with no initramfs, which must
//     print its "Kernel panic" line (it cannot mount a root) and make QEMU exit
//     (-no-reboot). That exercises what a real guest needs: long mode, paging,
//     interrupts, timers.
//
// Results are cached per host boot (see Cache), because a hanging KVM costs the
// full timeout.
package accel

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/containerd/errdefs"
	"github.com/containerd/log"
)

// Accelerator is a QEMU accelerator name (-accel NAME).
type Accelerator string

const (
	KVM Accelerator = "kvm"
	TCG Accelerator = "tcg"
)

// Mode is what the configuration asks for: "auto", "kvm" or "tcg".
type Mode string

const (
	Auto    Mode = "auto"
	ModeKVM Mode = "kvm"
	ModeTCG Mode = "tcg"
)

// DefaultTimeout bounds one probe guest. A working accelerator needs well
// under a second for the firmware and a few seconds for a kernel under TCG.
const DefaultTimeout = 10 * time.Second

// debugExitCode is what QEMU exits with when the firmware writes probeValue to
// isa-debug-exit: (value << 1) | 1.
const (
	probeValue    = 0x31
	debugExitCode = probeValue<<1 | 1
)

// Options says how to probe.
type Options struct {
	// QEMU is the qemu-system-x86_64 binary.
	QEMU string
	// Kernel, when set, is booted for the second stage of a KVM probe.
	Kernel string
	// Timeout bounds each probe guest; 0 means DefaultTimeout.
	Timeout time.Duration
	// Cache, when set, remembers results for this host boot.
	Cache *Cache
}

func (o Options) timeout() time.Duration {
	if o.Timeout > 0 {
		return o.Timeout
	}
	return DefaultTimeout
}

// Choose returns the accelerator to use for mode. Auto prefers KVM and falls
// back to TCG with a warning; an explicit mode that does not work is an error.
func Choose(ctx context.Context, mode Mode, o Options) (Accelerator, error) {
	switch mode {
	case ModeTCG:
		return TCG, nil
	case ModeKVM:
		if err := Probe(ctx, KVM, o); err != nil {
			return "", fmt.Errorf("accelerator kvm was configured but is not usable: %w", err)
		}
		return KVM, nil
	case Auto, "":
		err := Probe(ctx, KVM, o)
		if err == nil {
			return KVM, nil
		}
		log.G(ctx).WithError(err).Warn("KVM is not usable; falling back to TCG (software emulation, much slower)")
		if err := Probe(ctx, TCG, o); err != nil {
			return "", fmt.Errorf("neither kvm nor tcg is usable: %w", err)
		}
		return TCG, nil
	}
	return "", fmt.Errorf("accelerator %q: want auto, kvm or tcg: %w", mode, errdefs.ErrInvalidArgument)
}

// Probe reports whether QEMU can run guests under a. A nil error means usable.
func Probe(ctx context.Context, a Accelerator, o Options) error {
	key := string(a)
	if a == KVM && o.Kernel != "" {
		key += "+kernel"
	}
	return o.Cache.remember(key, []string{o.QEMU, o.Kernel}, func() error {
		if err := ProbeFirmware(ctx, a, o); err != nil {
			return err
		}
		if a == KVM && o.Kernel != "" {
			return ProbeKernel(ctx, a, o)
		}
		return nil
	})
}

// ProbeVhostVsock reports whether QEMU can give a guest a vhost-vsock device
// (it needs /dev/vhost-vsock and a host kernel that serves it).
func ProbeVhostVsock(ctx context.Context, o Options) error {
	return o.Cache.remember("vhost-vsock", []string{o.QEMU}, func() error {
		return ProbeFirmware(ctx, TCG, o, "-device", "vhost-vsock-pci,guest-cid=3")
	})
}

// ProbeFirmware runs the probe firmware under a, with extra QEMU arguments.
func ProbeFirmware(ctx context.Context, a Accelerator, o Options, extra ...string) error {
	dir, err := os.MkdirTemp("", "caisson-probe-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	fw := filepath.Join(dir, "probe.bin")
	if err := os.WriteFile(fw, probeFirmware(), 0o600); err != nil {
		return err
	}
	args := append(baseArgs(a), "-bios", fw, "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04", "-m", "16")
	out, code, err := run(ctx, o, append(args, extra...))
	if err != nil {
		return err
	}
	if code != debugExitCode {
		return fmt.Errorf("%s: probe firmware did not run (qemu exit %d): %s", a, code, firstLine(out))
	}
	return nil
}

// ProbeKernel boots o.Kernel without an initramfs under a and waits for its
// panic: proof that a whole kernel boots.
func ProbeKernel(ctx context.Context, a Accelerator, o Options) error {
	if _, err := os.Stat(o.Kernel); err != nil {
		return fmt.Errorf("probe kernel: %w", err)
	}
	args := append(baseArgs(a), "-kernel", o.Kernel, "-m", "256", "-serial", "stdio",
		"-append", "console=ttyS0 panic=-1 quiet root=/dev/caisson-probe-none")
	out, _, err := run(ctx, o, args)
	if err != nil {
		return err
	}
	if !bytes.Contains(out, []byte("Kernel panic")) {
		return fmt.Errorf("%s: the guest kernel stopped before its root-mount panic: %s", a, lastLine(out))
	}
	return nil
}

// CPUModel is the -cpu model to run guests with under a; the VMM and the probes
// use the same one, so that a probe tests what the VMM will run.
//
// Under TCG it is QEMU's default model plus RDRAND, which TCG emulates from the host's
// random source. The guest kernel trusts it at boot (random.trust_cpu, Debian's
// default), so its CRNG is ready at once. Without it the kernel had no entropy of its
// own until the shim sent some at sandbox creation, and until then drew every random
// number (address-space layout, stack canaries, the slab allocator's free-list order)
// through a full extraction from its input pool: a twentieth of a boot's guest
// instructions went to BLAKE2s (docs/guest.md). RDSEED, the kernel's other source, is
// not emulated by TCG. Under KVM the guest gets the host's CPU, with its own RDRAND.
func CPUModel(a Accelerator) string {
	if a == KVM {
		return "host"
	}
	return "qemu64,+rdrand"
}

func baseArgs(a Accelerator) []string {
	return []string{"-M", "q35", "-accel", string(a), "-cpu", CPUModel(a), "-smp", "1", "-nodefaults", "-no-user-config",
		"-display", "none", "-no-reboot"}
}

// run runs QEMU with the probe timeout and returns its combined output and exit code.
func run(ctx context.Context, o Options, args []string) ([]byte, int, error) {
	ctx, cancel := context.WithTimeout(ctx, o.timeout())
	defer cancel()
	cmd := exec.CommandContext(ctx, o.QEMU, args...)
	cmd.Env = []string{"PATH=/usr/bin:/bin"}
	// Die with the caller: a probe must not outlive `caisson check` or the shim.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	err := cmd.Run()
	if ctx.Err() == context.DeadlineExceeded {
		return out.Bytes(), -1, fmt.Errorf("probe guest did not finish within %s (a hung accelerator): %w", o.timeout(), errdefs.ErrUnavailable)
	}
	var exit *exec.ExitError
	if errors.As(err, &exit) {
		if ws, ok := exit.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
			return out.Bytes(), -1, fmt.Errorf("qemu was killed by %v: %s", ws.Signal(), lastLine(out.Bytes()))
		}
		return out.Bytes(), exit.ExitCode(), nil
	}
	if err != nil {
		return out.Bytes(), -1, fmt.Errorf("run %s: %w", o.QEMU, err)
	}
	return out.Bytes(), 0, nil
}

// probeFirmware is a 64 KiB BIOS image. The CPU starts at its last 16 bytes
// (F000:FFF0, real mode): mov al, probeValue; out 0xf4, al; then hlt forever.
func probeFirmware() []byte {
	fw := bytes.Repeat([]byte{0xf4}, 64<<10) // hlt everywhere
	copy(fw[0xfff0:], []byte{0xb0, probeValue, 0xe6, 0xf4, 0xf4, 0xeb, 0xfd})
	return fw
}

func firstLine(b []byte) string {
	s := strings.TrimSpace(string(b))
	if i := strings.IndexByte(s, '\n'); i >= 0 {
		s = s[:i]
	}
	return s
}

func lastLine(b []byte) string {
	s := strings.TrimSpace(string(b))
	if i := strings.LastIndexByte(s, '\n'); i >= 0 {
		s = s[i+1:]
	}
	if s == "" {
		return "no console output"
	}
	return s
}
