package task

import (
	"context"
	"fmt"
	"slices"

	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"github.com/opencontainers/runtime-spec/specs-go"

	"github.com/caisson-containers/caisson/shim/hooks"
	"github.com/caisson-containers/caisson/shim/netns"
	"github.com/caisson-containers/caisson/shim/network"
	"github.com/caisson-containers/caisson/shim/pod"
)

// OCI hooks run on the host, where their binaries are, at the points runc runs them:
//
//   - prestart, createRuntime and createContainer while the container is created, before
//     the pod's VM starts for its first container, so that the network they set up is
//     the VM's from its boot (its NICs on QEMU's command line, as for a CRI pod);
//   - startContainer before the container's process starts in the guest, poststart after;
//   - poststop when the container is deleted, and when its create fails after hooks ran
//     (runc's destroy does the same), so that what createRuntime set up is torn down.
//
// createContainer and startContainer run in the container's namespaces under runc; a
// Caisson container's namespaces are in the guest, which has no host binary, so they run
// on the host like the others (as Kata Containers runs its hooks).
//
// Every hook's state has the pid of a holder process (package shim/netns) in the pod's
// host network namespace, where hooks such as nerdctl's find it (/proc/PID/ns/net): a
// namespace the shim makes when the pod's first container asks for a new one, or the
// CRI's. A failed hook fails the create or the start, except poststop hooks, whose
// failures are logged (the runtime spec's rule, and runc's).

// containerHooks are a container's hooks and what their state says of it.
type containerHooks struct {
	hooks *specs.Hooks
	state specs.State // without status and pid, which each run sets
}

func newContainerHooks(id, bundle string, s *specs.Spec) *containerHooks {
	return &containerHooks{hooks: s.Hooks, state: specs.State{Version: s.Version, ID: id, Bundle: bundle, Annotations: s.Annotations}}
}

// run runs the hooks of kind k, the container being in status and pid the holder's.
func (h *containerHooks) run(ctx context.Context, k hooks.Kind, status specs.ContainerState, pid int) error {
	hs := hooks.Of(h.hooks, k)
	if len(hs) == 0 {
		return nil
	}
	st := h.state
	st.Status, st.Pid = status, pid
	if k == hooks.Poststop {
		return hooks.RunAll(ctx, k, hs, st)
	}
	return hooks.Run(ctx, k, hs, st)
}

// poststop runs the poststop hooks; their failures are logged, not returned.
func (h *containerHooks) poststop(ctx context.Context, pid int) {
	if err := h.run(ctx, hooks.Poststop, specs.StateStopped, pid); err != nil {
		log.G(ctx).WithError(err).Warn("poststop hook failed; the container is deleted all the same")
	}
}

// hookNetNS returns the holder whose pid the pod's hooks get, starting it for the first
// container that has hooks: in a new network namespace when the pod has no VM yet and the
// container asks for a new one (specPath ""; the VM's NICs then come from it), else in the
// pod's namespace (the CRI's: specPath, or the running pod's), else in a new, empty one. It
// lives until the pod stops (stopPod).
func (s *service) hookNetNS(specPath string) (*netns.NS, error) {
	s.podMu.Lock()
	defer s.podMu.Unlock()
	if s.hookNS != nil {
		return s.hookNS, nil
	}
	path := specPath
	if s.pod != nil {
		path = s.pod.NetNS()
	}
	var err error
	if path != "" {
		s.hookNS, err = netns.Join(path)
	} else {
		s.hookNS, err = netns.New()
	}
	if err != nil {
		return nil, fmt.Errorf("network namespace for the container's hooks: %w", err)
	}
	return s.hookNS, nil
}

// hookPid is the pid hooks get: the holder's, or 0 when no container of the pod has hooks.
func (s *service) hookPid() int {
	s.podMu.Lock()
	defer s.podMu.Unlock()
	if s.hookNS == nil {
		return 0
	}
	return s.hookNS.Pid()
}

// checkUnwired fails if the hooks of a container that joined a running VM left veths in
// the pod's namespace that the VM has no NIC for: they would carry nothing. Only the hooks
// of a pod's first container, which run before its VM starts, give the VM its network.
func checkUnwired(pd *pod.Pod, ns *netns.NS) error {
	veths, err := network.Veths(ns.Path())
	if err != nil {
		return fmt.Errorf("network interfaces the container's hooks left: %w", err)
	}
	wired := pd.Interfaces()
	var extra []string
	for _, v := range veths {
		if !slices.Contains(wired, v) {
			extra = append(extra, v)
		}
	}
	if len(extra) > 0 {
		return fmt.Errorf("the container's hooks added network interfaces %v to the pod's network namespace, but its VM is already running and takes no new NICs: only the hooks of a pod's first container set up its network: %w",
			extra, errdefs.ErrNotImplemented)
	}
	return nil
}
