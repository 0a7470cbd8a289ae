package task

import (
	"os"
	"path/filepath"
	"reflect"
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
	g, _, err := guestSpec(s, 0, false)
	if err != nil {
		t.Fatal(err)
	}
	if g.Hooks != nil {
		t.Fatalf("guest spec has hooks: %+v", g.Hooks)
	}
	if s.Hooks == nil {
		t.Fatal("guestSpec changed the host spec's hooks")
	}
}

// TestGuestSpecBinds: how each kind of bind mount reaches the guest, shared and copied.
func TestGuestSpecBinds(t *testing.T) {
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "cm"), []byte("x"), 0o644); err != nil {
		t.Fatal(err)
	}
	bind := func(src, dst string, opts ...string) specs.Mount {
		return specs.Mount{Type: "bind", Source: src, Destination: dst, Options: append([]string{"rbind"}, opts...)}
	}
	s := &specs.Spec{Mounts: []specs.Mount{
		{Type: "proc", Source: "proc", Destination: "/proc"},
		bind("/var/lib/kubelet/pods/p/etc-hosts", "/etc/hosts", "rw"),
		bind("/var/lib/kubelet/pods/p/termination-log", "/dev/termination-log", "rw"),
		bind(filepath.Join(dir, "cm"), "/etc/cm", "ro"),
		bind(dir, "/data", "rw"),
	}}

	g, binds, err := guestSpec(s, 1<<20, true)
	if err != nil {
		t.Fatal(err)
	}
	want := []sharedBind{{index: 2, source: filepath.Join(dir, "cm"), readonly: true}, {index: 3, source: dir}}
	if !reflect.DeepEqual(binds.shared, want) || len(binds.copied) != 0 {
		t.Errorf("shared binds %+v, copied %d; want %+v", binds.shared, len(binds.copied), want)
	}
	if len(g.Mounts) != 4 || g.Mounts[1].Source != guestSandboxDir+"/hosts" {
		t.Errorf("guest mounts %+v", g.Mounts)
	}

	// Copy mode: the writable /data is refused, saying why and the way out.
	_, _, err = guestSpec(s, 1<<20, false)
	if err == nil || !errdefs.IsInvalidArgument(err) || !strings.Contains(err.Error(), `"/data" is writable`) ||
		!strings.Contains(err.Error(), "virtio-fs") {
		t.Fatalf("copy mode with a writable bind: %v", err)
	}
	s.Mounts = s.Mounts[:4]
	_, binds, err = guestSpec(s, 1<<20, false)
	if err != nil {
		t.Fatal(err)
	}
	if len(binds.copied) != 1 || binds.copied[0].MountIndex != 2 || len(binds.shared) != 0 {
		t.Errorf("copy mode: copied %+v, shared %+v", binds.copied, binds.shared)
	}
}
