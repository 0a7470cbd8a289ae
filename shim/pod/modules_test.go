package pod

import (
	"context"
	"os"
	"path/filepath"
	"testing"

	"github.com/caisson-containers/caisson/guest/modimage"
	"github.com/caisson-containers/caisson/shim/config"
	"github.com/caisson-containers/caisson/shim/vmm"
	"github.com/caisson-containers/caisson/shim/vmm/qemu"
)

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
		{name: "template with a slot left", size: vmm.PMEMAlignment, dax: true, template: true, disks: 10, nics: 5, want: true, kind: vmm.PMEM},
		{name: "template without", size: vmm.PMEMAlignment, dax: true, template: true, disks: 11, nics: 5},
		{name: "command line full", size: vmm.PMEMAlignment, dax: true, disks: qemu.MaxColdDisks},
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
			d, ok := modulesDisk(ctx, cfg, tc.disks, tc.nics)
			if ok != tc.want {
				t.Fatalf("attached %v, want %v", ok, tc.want)
			}
			if ok && (d.Path != image || !d.ReadOnly || d.Kind != tc.kind || d.ID != modulesDiskID) {
				t.Errorf("disk %+v, want %s read-only as %v", d, image, tc.kind)
			}
		})
	}
}
