package pod

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"testing"

	"github.com/containerd/errdefs"

	"github.com/caisson-containers/caisson/internal/rootfs"
	"github.com/caisson-containers/caisson/shim/config"
	"github.com/caisson-containers/caisson/shim/internal/fakevm"
	"github.com/caisson-containers/caisson/shim/podid"
)

// fakeConfig is a pod configuration a fake VMM runs without root: no shared directory
// (no virtiofsd), no template.
func fakeConfig(t *testing.T) config.Config {
	cfg := config.Default(t.TempDir())
	cfg.StateDir = t.TempDir()
	cfg.Guest.SharedFS = config.SharedFSCopy
	cfg.Hypervisor.Template = false
	return cfg
}

// files creates empty files named names in dir and returns their paths.
func files(t *testing.T, dir string, names ...string) []string {
	var out []string
	for _, n := range names {
		p := filepath.Join(dir, n)
		if err := os.WriteFile(p, nil, 0o600); err != nil {
			t.Fatal(err)
		}
		out = append(out, p)
	}
	return out
}

// overlayPlan is a rootfs of one read-only layer and a writable image holding the
// upper and work directories.
func overlayPlan(layer, rw string) *rootfs.Plan {
	return &rootfs.Plan{
		Devices: []rootfs.Device{{Source: layer, FSType: "erofs", ReadOnly: true}, {Source: rw, FSType: "ext4"}},
		Lower:   []rootfs.Ref{{Device: 0}},
		Upper:   &rootfs.Ref{Device: 1, Path: "upper"},
		Work:    &rootfs.Ref{Device: 1, Path: "work"},
	}
}

// TestStartOnFakeVMM starts a pod on a fake VMM (no QEMU, no root, NoCgroup): the VM
// boots with the first container's devices, which Start returns mounted as that
// container's rootfs; a second container's rootfs shares the layer and hot-plugs only its
// own image; releasing both detaches what only they used; Stop ends the VM and removes
// the state directory.
func TestStartOnFakeVMM(t *testing.T) {
	cfg := fakeConfig(t)
	hv := fakevm.New()
	ctx := context.Background()
	f := files(t, t.TempDir(), "layer.erofs", "rw1.ext4", "rw2.ext4")
	layer, rw1, rw2 := f[0], f[1], f[2]
	stateDir := podid.StateDir(cfg.StateDir, "test", "fake")

	p, first, err := Start(ctx, cfg, Options{ID: "fake", StateDir: stateDir, Hostname: "fake",
		Rootfs: overlayPlan(layer, rw1), Hypervisor: hv, NewCgroup: NoCgroup})
	if err != nil {
		t.Fatal(err)
	}
	defer p.Stop(ctx)
	vm := hv.VMs()[0]
	if got := vm.Events(); !slices.Equal(got, []fakevm.Event{"start"}) {
		t.Errorf("VM events after Start %v, want a start and no hot-plug", got)
	}
	var booted []string
	for _, d := range vm.Config().Disks {
		booted = append(booted, d.Path)
	}
	if !slices.Contains(booted, layer) || !slices.Contains(booted, rw1) {
		t.Errorf("VM booted with %v, want the first container's %s and %s", booted, layer, rw1)
	}
	if hv.Agent.Sandbox().GetSandboxId() != "fake" {
		t.Errorf("sandbox %v, want fake", hv.Agent.Sandbox())
	}
	rfs := first.Agent
	if rfs == nil || len(rfs.Lower) != 1 || rfs.Upper == nil || rfs.Work == nil {
		t.Fatalf("first rootfs %v: want one lower, an upper and a work dir", rfs)
	}
	if rfs.Upper.StorageId != rfs.Work.StorageId || rfs.Upper.StorageId == rfs.Lower[0].StorageId {
		t.Errorf("first rootfs %v: want upper and work on one storage, the lower on another", rfs)
	}
	for _, id := range []string{rfs.Lower[0].StorageId, rfs.Upper.StorageId} {
		if hv.Agent.Storage(id) == nil {
			t.Errorf("storage %s not mounted in the guest", id)
		}
	}

	second, err := p.AttachRootfs(ctx, overlayPlan(layer, rw2))
	if err != nil {
		t.Fatal(err)
	}
	if second.Agent.Lower[0].StorageId != rfs.Lower[0].StorageId {
		t.Errorf("the shared layer is storage %s for the second container, %s for the first", second.Agent.Lower[0].StorageId, rfs.Lower[0].StorageId)
	}
	if got, want := vm.Events(), []fakevm.Event{"start", fakevm.Event("attach " + storageID(rw2))}; !slices.Equal(got, want) {
		t.Errorf("VM events after the second attach %v, want %v", got, want)
	}

	if err := first.Release(ctx); err != nil {
		t.Fatal(err)
	}
	if hv.Agent.Storage(rfs.Lower[0].StorageId) == nil {
		t.Error("the layer was unmounted while the second container uses it")
	}
	if hv.Agent.Storage(rfs.Upper.StorageId) != nil {
		t.Error("the first container's image is still mounted after its release")
	}
	if err := second.Release(ctx); err != nil {
		t.Fatal(err)
	}
	if got := hv.Agent.Storages(); len(got) != 0 {
		t.Errorf("storages mounted after every release: %v", got)
	}
	if err := p.Stop(ctx); err != nil {
		t.Fatal(err)
	}
	if !vm.Stopped() {
		t.Error("VM not stopped by Stop")
	}
	if _, err := os.Stat(stateDir); !os.IsNotExist(err) {
		t.Errorf("state dir after Stop: %v", err)
	}
}

// failingCgroup is a cgroup that cannot be made or cannot take a process.
type failingCgroup struct{ add error }

func (c failingCgroup) Add(int) error                { return c.add }
func (c failingCgroup) Remove(context.Context) error { return nil }

// TestStartFailsCleanly fails a pod's start at each step: Start says why, and leaves no
// VM running, no storage mounted and no state directory.
func TestStartFailsCleanly(t *testing.T) {
	boom := errors.New("boom")
	for _, tc := range []struct {
		name  string
		setup func(*fakevm.Hypervisor, *Options)
		want  error
	}{
		{"no hypervisor", func(_ *fakevm.Hypervisor, o *Options) { o.Hypervisor = nil }, errdefs.ErrInvalidArgument},
		{"cgroup", func(_ *fakevm.Hypervisor, o *Options) {
			o.NewCgroup = func(config.Config, Options) (Cgroup, error) { return nil, boom }
		}, boom},
		{"cgroup add", func(_ *fakevm.Hypervisor, o *Options) {
			o.NewCgroup = func(config.Config, Options) (Cgroup, error) { return failingCgroup{add: boom}, nil }
		}, boom},
		{"vm new", func(h *fakevm.Hypervisor, _ *Options) { h.Fail(fakevm.OpNew, boom) }, boom},
		{"vm start", func(h *fakevm.Hypervisor, _ *Options) { h.Fail(fakevm.OpStart, boom) }, boom},
		{"agent check", func(h *fakevm.Hypervisor, _ *Options) { h.Agent.Fail("Sandbox.Check", boom) }, nil},
		{"boot disk mount", func(h *fakevm.Hypervisor, _ *Options) { h.Agent.Fail("Storage.Mount", boom) }, nil},
		{"sandbox create", func(h *fakevm.Hypervisor, _ *Options) { h.Agent.Fail("Sandbox.Create", boom) }, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := fakeConfig(t)
			hv := fakevm.New()
			f := files(t, t.TempDir(), "layer.erofs", "rw.ext4")
			o := Options{ID: "fail", StateDir: podid.StateDir(cfg.StateDir, "test", "fail"), Hostname: "fail",
				Rootfs: overlayPlan(f[0], f[1]), Hypervisor: hv, NewCgroup: NoCgroup}
			tc.setup(hv, &o)
			p, _, err := Start(context.Background(), cfg, o)
			if err == nil {
				p.Stop(context.Background())
				t.Fatal("Start succeeded")
			}
			t.Logf("Start: %v", err)
			if tc.want != nil && !errors.Is(err, tc.want) {
				t.Errorf("got %v, want %v", err, tc.want)
			}
			for _, vm := range hv.VMs() {
				if vm.Running() {
					t.Error("VM still running after a failed Start")
				}
			}
			if got := hv.Agent.Storages(); len(got) != 0 {
				t.Errorf("storages mounted after a failed Start: %v", got)
			}
			if _, err := os.Stat(o.StateDir); !os.IsNotExist(err) {
				t.Errorf("state dir after a failed Start: %v", err)
			}
		})
	}
}
