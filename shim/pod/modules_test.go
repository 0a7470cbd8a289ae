package pod

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/containerd/errdefs"
	"github.com/containerd/errdefs/pkg/errgrpc"
	"github.com/containerd/log"
	"github.com/sirupsen/logrus"

	agent "github.com/caisson-containers/caisson/api/agent/v1"
	"github.com/caisson-containers/caisson/guest/modimage"
	"github.com/caisson-containers/caisson/internal/testutil"
	"github.com/caisson-containers/caisson/shim/config"
	"github.com/caisson-containers/caisson/shim/podid"
	"github.com/caisson-containers/caisson/shim/vmm"
)

// testMaxBoot is the hypervisor's MaxBootDisks in TestModulesDisk.
const testMaxBoot = 32

func TestModulesDisk(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	image := filepath.Join(dir, modimage.FileName)
	for _, tc := range []struct {
		name        string
		size        int64 // -1: no image
		dax         bool
		template    bool
		disks, nics int
		want        bool
		kind        vmm.DiskKind
	}{
		{name: "no image", size: -1, dax: true},
		{name: "pmem", size: 4 * vmm.PMEMAlignment, dax: true, want: true, kind: vmm.PMEM},
		{name: "dax off", size: 4 * vmm.PMEMAlignment, want: true, kind: vmm.Block},
		{name: "not aligned", size: vmm.PMEMAlignment + 4096, dax: true, want: true, kind: vmm.Block},
		// From its template: nothing to attach.
		{name: "template", size: vmm.PMEMAlignment, dax: true, template: true},
		{name: "command line full", size: vmm.PMEMAlignment, dax: true, disks: testMaxBoot},
	} {
		t.Run(tc.name, func(t *testing.T) {
			os.Remove(image)
			if tc.size >= 0 {
				if err := os.WriteFile(image, nil, 0o644); err != nil {
					t.Fatal(err)
				}
				if err := os.Truncate(image, tc.size); err != nil {
					t.Fatal(err)
				}
			}
			cfg := config.Default(dir)
			cfg.Storage.DAX = tc.dax
			cfg.Hypervisor.Template = tc.template
			cfg.Hypervisor.HotplugSlots = 16
			d, ok := modulesDisk(ctx, cfg, testMaxBoot, tc.disks, tc.nics)
			if ok != tc.want {
				t.Fatalf("attached %v, want %v", ok, tc.want)
			}
			if ok && (d.Path != image || !d.ReadOnly || d.Kind != tc.kind || d.ID != modulesDiskID) {
				t.Errorf("disk %+v, want %s read-only as %v", d, image, tc.kind)
			}
		})
	}
}

// TestModulesImage boots pod VMs with the guest's modules image, without one, and with
// one for another kernel: the first has it mounted when Start returns; the others start
// all the same, with a warning naming what is wrong.
func TestModulesImage(t *testing.T) {
	testutil.RequireRoot(t)
	testutil.RequireBinary(t, "qemu-system-x86_64")
	guest := testutil.RequireGuest(t)
	if _, err := os.Stat(modimage.Beside(guest.Kernel)); err != nil {
		t.Skipf("needs the modules image (make guest): %v", err)
	}
	// A directory with the guest's kernel and initramfs, and no modules image (yet).
	other := t.TempDir()
	for _, f := range []string{guest.Kernel, guest.Initramfs} {
		if err := os.Symlink(f, filepath.Join(other, filepath.Base(f))); err != nil {
			t.Fatal(err)
		}
	}
	stateRoot := testutil.ShortTempDir(t)
	start := func(t *testing.T, dir string, fromTemplate bool) (*Pod, string) {
		cfg := config.Default(dir)
		cfg.StateDir = stateRoot
		cfg.Hypervisor.Template = fromTemplate
		var logs bytes.Buffer
		l := logrus.New()
		l.SetOutput(&logs)
		ctx, cancel := context.WithTimeout(log.WithLogger(context.Background(), logrus.NewEntry(l)), 2*time.Minute)
		defer cancel()
		p, _, err := Start(ctx, cfg, Options{ID: "modules", StateDir: podid.StateDir(stateRoot, "test", "modules"), Hostname: "modules", Hypervisor: qemuOf(t, cfg)})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { p.Stop(context.Background()) })
		return p, logs.String()
	}
	mountedAgain := func(t *testing.T, p *Pod) error {
		_, err := p.storage.Mount(context.Background(), &agent.MountStorageRequest{
			StorageId: modulesDiskID, Fstype: "erofs", Options: []string{"ro"},
			Device: &agent.Device{Kind: agent.DeviceKind_DEVICE_KIND_BLOCK, Serial: "none"},
		})
		return errgrpc.ToNative(err)
	}

	// Booted, and from a template: there the VM has the image from its template,
	// attached and mounted; the pod's start neither attaches nor mounts it.
	for _, tc := range []struct {
		name     string
		template bool
	}{{"present", false}, {"template", true}} {
		t.Run(tc.name, func(t *testing.T) {
			p, logs := start(t, filepath.Dir(guest.Kernel), tc.template)
			if _, err := p.vm.Address(modulesDiskID); err != nil {
				t.Fatalf("the modules image is not attached: %v", err)
			}
			if err := mountedAgain(t, p); !errdefs.IsAlreadyExists(err) {
				t.Errorf("the modules image is not mounted when Start returns (a second mount: %v)", err)
			}
			if strings.Contains(logs, "modules image") && strings.Contains(logs, "level=warning") {
				t.Errorf("a warning about the modules image:\n%s", logs)
			}
		})
	}
	t.Run("missing", func(t *testing.T) {
		p, logs := start(t, other, false)
		if _, err := p.vm.Address(modulesDiskID); !errdefs.IsNotFound(err) {
			t.Errorf("a modules disk without an image: %v", err)
		}
		if !strings.Contains(logs, "no kernel modules image beside the guest kernel") {
			t.Errorf("no warning:\n%s", logs)
		}
	})
	t.Run("another kernel's", func(t *testing.T) {
		tree := t.TempDir()
		if err := os.WriteFile(filepath.Join(tree, "modules.dep"), []byte("kernel/x.ko:\n"), 0o644); err != nil {
			t.Fatal(err)
		}
		if err := modimage.Build(context.Background(), modimage.Image{Dir: tree, Release: "0.0.0-other"}, modimage.Beside(filepath.Join(other, "vmlinuz"))); err != nil {
			t.Fatal(err)
		}
		p, logs := start(t, other, false)
		if _, err := p.vm.Address(modulesDiskID); err != nil {
			t.Errorf("the modules image is not attached: %v", err)
		}
		if !strings.Contains(logs, "0.0.0-other") || !strings.Contains(logs, "kernel modules image: the pod's VM loads only") {
			t.Errorf("no warning naming the image's kernel:\n%s", logs)
		}
		if err := mountedAgain(t, p); errdefs.IsAlreadyExists(err) {
			t.Error("the image of another kernel stays mounted")
		}
	})
	// The template is made all the same, with a warning; its VMs have the image attached,
	// not mounted.
	t.Run("another kernel's, from a template", func(t *testing.T) {
		p, logs := start(t, other, true)
		if _, err := p.vm.Address(modulesDiskID); err != nil {
			t.Errorf("the modules image is not attached: %v", err)
		}
		if !strings.Contains(logs, "0.0.0-other") || !strings.Contains(logs, "VM template made without the storage mounted") {
			t.Errorf("no warning naming the image's kernel:\n%s", logs)
		}
		if err := mountedAgain(t, p); errdefs.IsAlreadyExists(err) {
			t.Error("the image of another kernel is mounted")
		}
	})
}

// BenchmarkPodStartModules: Start to the agent's sandbox and boot disks ready, for a pod
// whose first container has one layer, with the modules image attached and mounted and
// without one (the kernel and initramfs alone in another directory), alternated in one run;
// booted, and made from a template (whose VMs have the image from it). Reports the
// medians and their ratio.
func BenchmarkPodStartModules(b *testing.B) {
	testutil.RequireRoot(b)
	testutil.RequireBinary(b, "qemu-system-x86_64")
	guest := testutil.RequireGuest(b)
	if _, err := os.Stat(modimage.Beside(guest.Kernel)); err != nil {
		b.Skipf("needs the modules image (make guest): %v", err)
	}
	without := b.TempDir()
	for _, f := range []string{guest.Kernel, guest.Initramfs} {
		if err := os.Symlink(f, filepath.Join(without, filepath.Base(f))); err != nil {
			b.Fatal(err)
		}
	}
	dir := b.TempDir()
	layer := erofsLayer(b, dir)
	ctx := log.WithLogger(context.Background(), logrus.NewEntry(logrus.New()))
	log.G(ctx).Logger.SetLevel(logrus.ErrorLevel)
	for _, template := range []bool{false, true} {
		name := "boot"
		if template {
			name = "template"
		}
		b.Run(name, func(b *testing.B) {
			stateRoot := testutil.ShortTempDir(b)
			start := func(guestDir string, i int) time.Duration {
				cfg := config.Default(guestDir)
				cfg.StateDir = stateRoot
				cfg.Hypervisor.Template = template
				rw := filepath.Join(dir, "rw"+strconv.Itoa(i)+".ext4")
				plan := rootfsPlan(b, layer, rw)
				t0 := time.Now()
				p, _, err := Start(ctx, cfg, Options{ID: "bench", StateDir: podid.StateDir(stateRoot, "bench", strconv.Itoa(i)), Hostname: "bench", Rootfs: plan, Hypervisor: qemuOf(b, cfg)})
				took := time.Since(t0)
				if err != nil {
					b.Fatal(err)
				}
				if err := p.Stop(context.Background()); err != nil {
					b.Fatal(err)
				}
				os.Remove(rw)
				return took
			}
			// QEMU, the kernel and the image in the page cache; each directory's template made.
			start(filepath.Dir(guest.Kernel), -1)
			start(without, -2)
			var with, bare []time.Duration
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				if i%2 == 0 {
					with = append(with, start(filepath.Dir(guest.Kernel), 2*i))
					bare = append(bare, start(without, 2*i+1))
				} else {
					bare = append(bare, start(without, 2*i))
					with = append(with, start(filepath.Dir(guest.Kernel), 2*i+1))
				}
			}
			mw, mb := median(with), median(bare)
			b.ReportMetric(mw.Seconds(), "with-modules-s")
			b.ReportMetric(mb.Seconds(), "without-s")
			b.ReportMetric(float64(mw)/float64(mb), "with/without")
			b.ReportMetric(0, "ns/op")
		})
	}
}

func median(ds []time.Duration) time.Duration {
	s := slices.Clone(ds)
	slices.Sort(s)
	return s[len(s)/2]
}
