package task

import (
	"encoding/json"
	"strings"
	"testing"

	"github.com/containerd/errdefs"
	"github.com/opencontainers/runtime-spec/specs-go"
)

func TestPodNetNS(t *testing.T) {
	withNS := func(ns ...specs.LinuxNamespace) *specs.Linux { return &specs.Linux{Namespaces: ns} }
	for _, tc := range []struct {
		name    string
		spec    specs.Spec
		want    string
		wantErr string
	}{
		{name: "new namespace (ctr, nerdctl)", spec: specs.Spec{Linux: withNS(
			specs.LinuxNamespace{Type: specs.PIDNamespace}, specs.LinuxNamespace{Type: specs.NetworkNamespace})}},
		{name: "CNI's namespace (CRI)", want: "/var/run/netns/cni-1", spec: specs.Spec{Linux: withNS(
			specs.LinuxNamespace{Type: specs.NetworkNamespace, Path: "/var/run/netns/cni-1"})}},
		{name: "host network (--net host)", wantErr: "cannot share the host's network namespace", spec: specs.Spec{Linux: withNS(
			specs.LinuxNamespace{Type: specs.PIDNamespace}, specs.LinuxNamespace{Type: specs.MountNamespace})}},
		{name: "no linux section", wantErr: "cannot share the host's network namespace"},
		{name: "host-network CRI pod", wantErr: "hostNetwork: true", spec: specs.Spec{
			Linux:       withNS(specs.LinuxNamespace{Type: specs.PIDNamespace}),
			Annotations: map[string]string{annotationContainerType: containerTypeSandbox}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := podNetNS(&tc.spec)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) || !errdefs.IsInvalidArgument(err) {
					t.Fatalf("podNetNS = %q, %v; want an invalid argument saying %q", got, err, tc.wantErr)
				}
				return
			}
			if err != nil || got != tc.want {
				t.Fatalf("podNetNS = %q, %v; want %q", got, err, tc.want)
			}
		})
	}
}

// The guest's spec carries no hook: the shim runs them on the host.
func TestGuestSpecDropsHooks(t *testing.T) {
	s := &specs.Spec{Version: "1.1.0", Hooks: &specs.Hooks{CreateRuntime: []specs.Hook{{Path: "/usr/local/bin/nerdctl"}}},
		Linux: &specs.Linux{Namespaces: []specs.LinuxNamespace{{Type: specs.NetworkNamespace}}}}
	b, _, _, err := guestSpec(s, 0)
	if err != nil {
		t.Fatal(err)
	}
	var g specs.Spec
	if err := json.Unmarshal(b, &g); err != nil {
		t.Fatal(err)
	}
	if g.Hooks != nil {
		t.Fatalf("guest spec has hooks: %+v", g.Hooks)
	}
	if s.Hooks == nil {
		t.Fatal("guestSpec changed the host spec's hooks")
	}
}
