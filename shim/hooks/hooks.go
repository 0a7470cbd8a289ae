// Package hooks runs a container's OCI hooks on the host.
//
// A hook is a host binary the container's creator (nerdctl, Podman, a CDI or NRI plugin)
// puts in the spec to act on the container from outside: nerdctl sets up the container's
// network from one (`nerdctl internal oci-hook createRuntime`) and tears it down from
// another (postStop). Each runs as the runtime spec says: its path, args and env, the
// container's state as JSON on its stdin, its stdout and stderr kept for the error, and
// its timeout. A hook without a timeout gets DefaultTimeout: runc and Kata wait for ever,
// but a hung hook would then hang containerd's Create and keep what it holds.
//
// Which hooks run where, and with which pid in the state, is the task service's choice
// (shim/task): this package only runs them.
package hooks

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"time"

	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"github.com/opencontainers/runtime-spec/specs-go"
)

// DefaultTimeout bounds a hook whose spec gives no timeout. nerdctl's network hook takes
// well under a second; a minute leaves room for slow CNI plugins on a loaded host.
const DefaultTimeout = 60 * time.Second

// Kind is the lifecycle point a hook runs at, spelled as the runtime spec's JSON names it.
type Kind string

// The runtime spec's hooks, in the order a container meets them.
const (
	// Prestart is deprecated in the runtime spec but still used (and run by runc, first,
	// beside CreateRuntime).
	Prestart        Kind = "prestart"
	CreateRuntime   Kind = "createRuntime"
	CreateContainer Kind = "createContainer"
	StartContainer  Kind = "startContainer"
	Poststart       Kind = "poststart"
	Poststop        Kind = "poststop"
)

// Of returns the hooks of kind k in h (none if h is nil).
func Of(h *specs.Hooks, k Kind) []specs.Hook {
	if h == nil {
		return nil
	}
	switch k {
	case Prestart:
		return h.Prestart //nolint:staticcheck // deprecated, still honoured (runc does)
	case CreateRuntime:
		return h.CreateRuntime
	case CreateContainer:
		return h.CreateContainer
	case StartContainer:
		return h.StartContainer
	case Poststart:
		return h.Poststart
	case Poststop:
		return h.Poststop
	}
	return nil
}

// Any reports whether h has a hook of any kind.
func Any(h *specs.Hooks) bool {
	for _, k := range []Kind{Prestart, CreateRuntime, CreateContainer, StartContainer, Poststart, Poststop} {
		if len(Of(h, k)) > 0 {
			return true
		}
	}
	return false
}

// Validate checks what the runtime spec requires of every hook in h (an absolute path, a
// positive timeout) before any runs, so that a bad spec fails before it changes anything.
func Validate(h *specs.Hooks) error {
	for _, k := range []Kind{Prestart, CreateRuntime, CreateContainer, StartContainer, Poststart, Poststop} {
		for i, hk := range Of(h, k) {
			if !strings.HasPrefix(hk.Path, "/") {
				return fmt.Errorf("%s hook #%d: path %q is not absolute: %w", k, i, hk.Path, errdefs.ErrInvalidArgument)
			}
			if hk.Timeout != nil && *hk.Timeout <= 0 {
				return fmt.Errorf("%s hook #%d (%s): timeout %d is not positive: %w", k, i, hk.Path, *hk.Timeout, errdefs.ErrInvalidArgument)
			}
		}
	}
	return nil
}

// Run runs the hooks of kind k in order, each with state on its stdin, and stops at the
// first that fails. The error names the hook (kind, index and path) and says why: a
// missing binary (errdefs.ErrNotFound), or an exit status, a signal or the timeout
// (errdefs.ErrFailedPrecondition), with the end of what the hook wrote to stderr and
// stdout. A canceled ctx kills the running hook.
func Run(ctx context.Context, k Kind, hooks []specs.Hook, state specs.State) error {
	return run(ctx, k, hooks, state, false)
}

// RunAll runs every hook of kind k, also those after one that fails, and returns the
// failures joined: the runtime spec's rule for poststop hooks, which clean up and must
// not stop each other.
func RunAll(ctx context.Context, k Kind, hooks []specs.Hook, state specs.State) error {
	return run(ctx, k, hooks, state, true)
}

func run(ctx context.Context, k Kind, hooks []specs.Hook, state specs.State, all bool) error {
	if len(hooks) == 0 {
		return nil
	}
	stdin, err := json.Marshal(state)
	if err != nil {
		return fmt.Errorf("encode the state for %s hooks: %w", k, err)
	}
	var errs []error
	for i, h := range hooks {
		start := time.Now()
		if err := runOne(ctx, h, stdin); err != nil {
			errs = append(errs, fmt.Errorf("%s hook #%d (%s): %w", k, i, h.Path, err))
			if !all {
				break
			}
			continue
		}
		log.G(ctx).WithFields(log.Fields{"hook": k, "path": h.Path, "took": time.Since(start)}).Debug("hook ran")
	}
	return errors.Join(errs...)
}

// outputLimit is how much of a hook's stdout and of its stderr an error quotes (the end).
const outputLimit = 2 << 10

func runOne(ctx context.Context, h specs.Hook, stdin []byte) error {
	if _, err := os.Stat(h.Path); errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("no such binary: %w", errdefs.ErrNotFound)
	}
	timeout := DefaultTimeout
	if h.Timeout != nil {
		timeout = time.Duration(*h.Timeout) * time.Second
	}
	var stdout, stderr tailBuffer
	cmd := &exec.Cmd{
		Path:   h.Path,
		Args:   h.Args,
		Env:    h.Env, // nil: the shim's environment, as runc gives its own to such hooks
		Stdin:  bytes.NewReader(stdin),
		Stdout: &stdout,
		Stderr: &stderr,
		// Its own process group, so that a timeout kills what the hook started too (a CNI
		// plugin, iptables) rather than leaving it to finish behind the failed create.
		SysProcAttr: &syscall.SysProcAttr{Setpgid: true},
		// Bounded wait for output a daemonized child keeps writing to after the hook exits.
		WaitDelay: time.Second,
	}
	if len(cmd.Args) == 0 {
		cmd.Args = []string{h.Path}
	}
	if err := cmd.Start(); err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("%v: %w", err, errdefs.ErrNotFound)
		}
		return fmt.Errorf("start: %v: %w", err, errdefs.ErrFailedPrecondition)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	timer := time.NewTimer(timeout)
	defer timer.Stop()
	var why string
	select {
	case err := <-done:
		if err == nil {
			return nil
		}
		return fmt.Errorf("%v%s: %w", err, output(&stdout, &stderr), errdefs.ErrFailedPrecondition)
	case <-timer.C:
		why = fmt.Sprintf("did not finish within its timeout of %s, killed", timeout)
	case <-ctx.Done():
		why = fmt.Sprintf("killed: %v", ctx.Err())
	}
	syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
	<-done
	return fmt.Errorf("%s%s: %w", why, output(&stdout, &stderr), errdefs.ErrFailedPrecondition)
}

// output quotes the end of a hook's stderr and stdout, when it wrote any.
func output(stdout, stderr *tailBuffer) string {
	var s string
	if e := strings.TrimSpace(stderr.String()); e != "" {
		s += fmt.Sprintf("; stderr: %q", e)
	}
	if o := strings.TrimSpace(stdout.String()); o != "" {
		s += fmt.Sprintf("; stdout: %q", o)
	}
	return s
}

// tailBuffer keeps the last outputLimit bytes written to it.
type tailBuffer struct{ b []byte }

func (t *tailBuffer) Write(p []byte) (int, error) {
	t.b = append(t.b, p...)
	if len(t.b) > outputLimit {
		t.b = append(t.b[:0], t.b[len(t.b)-outputLimit:]...)
	}
	return len(p), nil
}

func (t *tailBuffer) String() string { return string(t.b) }
