package task

import (
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	"github.com/containerd/errdefs"
	"github.com/opencontainers/runtime-spec/specs-go"

	"github.com/caisson-containers/caisson/shim/config"
	"github.com/caisson-containers/caisson/shim/pod"
	"github.com/caisson-containers/caisson/shim/virtiofs"
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
	want := []sharedBind{{index: 2, source: filepath.Join(dir, "cm"), access: virtiofs.ReadOnly}, {index: 3, source: dir}}
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

// TestMountAccess: the CRI's options for a host path ("ro", "rro", "rw") become the
// share's access; the last of "ro" and "rw" wins, as in runc.
func TestMountAccess(t *testing.T) {
	for _, tc := range []struct {
		opts []string
		want virtiofs.Access
	}{
		{[]string{"rbind", "rprivate", "rw"}, virtiofs.ReadWrite},
		{[]string{"rbind", "rprivate", "ro"}, virtiofs.ReadOnly},
		{[]string{"rbind", "rprivate", "rro"}, virtiofs.RecursiveReadOnly},
		{[]string{"rbind", "ro", "rw"}, virtiofs.ReadWrite},
		{[]string{"rbind"}, virtiofs.ReadWrite},
	} {
		if got := mountAccess(specs.Mount{Options: tc.opts}); got != tc.want {
			t.Errorf("mountAccess(%v) = %v, want %v", tc.opts, got, tc.want)
		}
	}
}

// TestSubmount: a submount of a read-only share is mounted at its place below the
// container's mount, with the share's options but for its own read-only flag.
func TestSubmount(t *testing.T) {
	m := specs.Mount{Type: "bind", Source: "/run/caisson/storage/shared/c-0", Destination: "/data",
		Options: []string{"rbind", "rslave", "ro"}}
	for _, tc := range []struct {
		sub  virtiofs.Submount
		want specs.Mount
	}{
		{virtiofs.Submount{Path: "tmp"}, specs.Mount{Type: "bind", Source: "/run/caisson/storage/shared/c-0/tmp",
			Destination: "/data/tmp", Options: []string{"rbind", "rslave", "rw"}}},
		{virtiofs.Submount{Path: "a/b", ReadOnly: true}, specs.Mount{Type: "bind", Source: "/run/caisson/storage/shared/c-0/a/b",
			Destination: "/data/a/b", Options: []string{"rbind", "rslave", "ro"}}},
	} {
		if got := submount(m, tc.sub); !reflect.DeepEqual(got, tc.want) {
			t.Errorf("submount(%+v) = %+v, want %+v", tc.sub, got, tc.want)
		}
	}
	if !reflect.DeepEqual(m.Options, []string{"rbind", "rslave", "ro"}) {
		t.Errorf("the share's own options changed: %v", m.Options)
	}
}

// TestGuestSpecRefusesUserNamespaces: containerd 1.7's CRI does not ask the runtime's
// features before it gives a pod a user namespace; the shim refuses it by name.
func TestGuestSpecRefusesUserNamespaces(t *testing.T) {
	s := &specs.Spec{Linux: &specs.Linux{Namespaces: []specs.LinuxNamespace{
		{Type: specs.PIDNamespace}, {Type: specs.UserNamespace},
	}}}
	_, _, err := guestSpec(s, 1<<20, true)
	if !errdefs.IsNotImplemented(err) || !strings.Contains(err.Error(), "user namespace") {
		t.Fatalf("guestSpec with a user namespace: %v", err)
	}
}

// translate is the one reading of a spec: what the pod takes from it, and refusals
// that name the container.
func TestTranslate(t *testing.T) {
	cfg := config.Default("/usr/share/caisson")
	cni := specs.LinuxNamespace{Type: specs.NetworkNamespace, Path: "/var/run/netns/cni-1"}
	for _, tc := range []struct {
		name     string
		spec     specs.Spec
		wantPod  pod.Options
		wantErr  string
		wantKind func(error) bool
	}{
		{
			name: "CRI sandbox",
			spec: specs.Spec{Hostname: "web-0", Linux: &specs.Linux{Namespaces: []specs.LinuxNamespace{cni}, CgroupsPath: "kubepods-pod1.slice:cri:sb1"},
				Annotations: map[string]string{annotationContainerType: containerTypeSandbox}},
			wantPod: pod.Options{Hostname: "web-0", NetNS: cni.Path, Cgroup: "kubepods-pod1.slice:cri:sb1"},
		},
		{
			// A CRI container's cgroup is not its VM's: it joins its sandbox's.
			name: "CRI container",
			spec: specs.Spec{Linux: &specs.Linux{Namespaces: []specs.LinuxNamespace{cni}, CgroupsPath: "kubepods-pod1.slice:cri:c1"},
				Annotations: map[string]string{annotationContainerType: containerTypeContainer}},
			wantPod: pod.Options{Hostname: "0123456789ab", NetNS: cni.Path},
		},
		{
			name:    "lone container asking for a network namespace",
			spec:    specs.Spec{Linux: &specs.Linux{Namespaces: []specs.LinuxNamespace{{Type: specs.NetworkNamespace}}, CgroupsPath: "/default/c1"}},
			wantPod: pod.Options{Hostname: "0123456789ab", Cgroup: "/default/c1"},
		},
		{
			name:    "host network",
			spec:    specs.Spec{Linux: &specs.Linux{}},
			wantErr: "container 0123456789abcdef: the spec shares the host's network namespace", wantKind: errdefs.IsInvalidArgument,
		},
		{
			name:    "user namespace",
			spec:    specs.Spec{Linux: &specs.Linux{Namespaces: []specs.LinuxNamespace{{Type: specs.NetworkNamespace}, {Type: specs.UserNamespace}}}},
			wantErr: "container 0123456789abcdef: a user namespace", wantKind: errdefs.IsNotImplemented,
		},
		{
			name: "a hook without a path",
			spec: specs.Spec{Linux: &specs.Linux{Namespaces: []specs.LinuxNamespace{{Type: specs.NetworkNamespace}}},
				Hooks: &specs.Hooks{CreateRuntime: []specs.Hook{{}}}},
			wantErr: "container 0123456789abcdef: ", wantKind: errdefs.IsInvalidArgument,
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			g, err := translate("0123456789abcdef", &tc.spec, cfg)
			if tc.wantErr != "" {
				if err == nil || !strings.HasPrefix(err.Error(), tc.wantErr) || !tc.wantKind(err) {
					t.Fatalf("translate: %v; want an error starting %q of the right kind", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(g.pod, tc.wantPod) {
				t.Errorf("pod options %+v, want %+v", g.pod, tc.wantPod)
			}
			if g.spec.Hooks != nil || g.spec.Root.Path != "rootfs" {
				t.Errorf("guest spec not translated: hooks %+v, root %+v", g.spec.Hooks, g.spec.Root)
			}
		})
	}
}
