package qemu

import (
	"errors"
	"path/filepath"
	"strconv"
	"testing"

	"github.com/containerd/errdefs"

	"github.com/caisson-containers/caisson/shim/config"
	"github.com/caisson-containers/caisson/shim/vmm"
)

// TestNewHypervisor: the shim's configuration becomes QEMU's settings, New refuses a bad
// VM with a nil VM (not a typed nil in the interface), and the identity names the binary
// and the settings a template depends on.
func TestNewHypervisor(t *testing.T) {
	cfg := config.Default("/opt/caisson/guest")
	cfg.StateDir = t.TempDir()
	cfg.Hypervisor.Path = "/nonexistent/qemu-system-x86_64"
	cfg.Hypervisor.TCGTranslationCacheMiB = 128
	cfg.Hypervisor.Jailer = config.Jailer{Enabled: true, User: "1000:1000"}
	hv := NewHypervisor(cfg).(*Hypervisor)
	q := hv.qcfg
	if q.Path != cfg.Hypervisor.Path || q.TCGTranslationCacheMiB != 128 || q.AccelCacheDir != filepath.Join(cfg.StateDir, "probes") {
		t.Errorf("QEMU settings %+v", q)
	}
	if q.Jail == nil || q.Jail.User != "1000:1000" {
		t.Errorf("jail %+v, want user 1000:1000", q.Jail)
	}
	cfg.Hypervisor.Jailer.Enabled = false
	if j := NewHypervisor(cfg).(*Hypervisor).qcfg.Jail; j != nil {
		t.Errorf("jail %+v with the jailer off", j)
	}

	vm, err := hv.New(vmm.Config{Kernel: "/vmlinuz"}) // no state dir
	if !errdefs.IsInvalidArgument(err) {
		t.Errorf("New without a state dir: %v", err)
	}
	if vm != nil {
		t.Errorf("New failed with a non-nil VM %#v", vm)
	}
	if hv.MaxBootDisks() != MaxColdDisks {
		t.Errorf("MaxBootDisks %d, want %d", hv.MaxBootDisks(), MaxColdDisks)
	}

	if _, err := hv.Identity(); !errors.Is(err, errdefs.ErrNotFound) {
		t.Errorf("identity of a missing binary: %v", err)
	}
	hv.qcfg.Path = "/bin/true" // any executable: the identity names it
	id, err := hv.Identity()
	if err != nil {
		t.Fatal(err)
	}
	if id.VMM != "qemu" || id.Binary != "/bin/true" || id.Settings["tcg_translation_cache_mib"] != "128" || id.Settings["free_page_reporting"] != strconv.FormatBool(q.FreePageReporting) {
		t.Errorf("identity %+v", id)
	}
}
