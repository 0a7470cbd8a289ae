package config_test

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/containerd/errdefs"

	"github.com/caisson-containers/caisson/shim/config"
	"github.com/caisson-containers/caisson/shim/podid"
	"github.com/caisson-containers/caisson/shim/vmm"
	"github.com/caisson-containers/caisson/shim/vmm/qemu"
)

// FuzzLoad loads arbitrary TOML, then applies one pod annotation to it. Neither may
// panic; a refusal is an InvalidArgument (or NotImplemented, for guest.transport =
// vsock); and what they accept must be a VM the QEMU backend takes: Validate must not
// accept what the first pod would then fail on.
func FuzzLoad(f *testing.F) {
	var def strings.Builder
	if err := config.Default("/opt/caisson/guest").Write(&def); err != nil {
		f.Fatal(err)
	}
	f.Add(def.String(), "hypervisor.vcpus", "2")
	f.Add("state_dir = \"/run/c\"\n[hypervisor]\nvcpus = 4\nmemory_mib = 1024\n", "hypervisor.memory_mib", "2048")
	f.Add("[hypervisor]\nmemory_mib = 9223372036854775807\n", "", "")
	f.Add("pod_annotations = [\"storage.dax\", \"guest.debug_console\"]\n", "storage.dax", "false")
	f.Add("[guest]\ncopied_mount_refresh_interval = \"-1s\"\ntransport = \"vsock\"\n", "", "")
	f.Add("[guest]\nshared_fs = \"copy\"\nvirtiofsd = \"relative\"\n", "hypervisor.memory_mib", "99999999999999999999")
	f.Add("state_dir = \""+strings.Repeat("/s", 60)+"\"\n", "", "")
	f.Add("[hypervisor]\nunknown = 1\n", "", "")
	f.Add("[hypervisor.jailer]\nuser = \"0:0\"\n", "", "")
	f.Add("[hypervisor.jailer]\nuser = \"1000:x\"\n", "", "")
	f.Add("state_dir = \"/"+strings.Repeat("s", 54)+"\"\n", "", "")
	f.Add("log_level = 3\n", "", "")
	f.Fuzz(func(t *testing.T, doc, key, value string) {
		p := filepath.Join(t.TempDir(), "config.toml")
		if err := os.WriteFile(p, []byte(doc), 0o644); err != nil {
			t.Fatal(err)
		}
		c, file, err := config.Load(p)
		if err != nil {
			checkConfigErr(t, err)
			return
		}
		if file != p {
			t.Errorf("Load read %q, want %q", file, p)
		}
		checkRunnable(t, c)
		if key == "" {
			return
		}
		c, err = c.WithAnnotations(map[string]string{config.AnnotationPrefix + key: value})
		if err != nil {
			checkConfigErr(t, err)
			return
		}
		checkRunnable(t, c)
	})
}

func checkConfigErr(t *testing.T, err error) {
	t.Helper()
	if !errdefs.IsInvalidArgument(err) && !errdefs.IsNotImplemented(err) {
		t.Errorf("%v: neither InvalidArgument nor NotImplemented", err)
	}
}

// checkRunnable checks that the QEMU backend takes the VM of a pod with the longest
// namespace and id under c, as the pod package describes it.
func checkRunnable(t *testing.T, c config.Config) {
	t.Helper()
	// A user name is looked up only when a VM starts (and need not exist here); UID:GID
	// is checked by New.
	var j *qemu.Jail
	if c.Hypervisor.Jailer.Enabled && strings.Contains(c.Hypervisor.Jailer.User, ":") {
		j = &qemu.Jail{User: c.Hypervisor.Jailer.User}
	}
	stateDir := podid.StateDir(c.StateDir, strings.Repeat("n", 76), strings.Repeat("0123456789abcdef", 4))
	_, err := qemu.New(vmm.Config{
		Kernel:       c.Guest.Kernel,
		Initramfs:    c.Guest.Initramfs,
		VCPUs:        c.Hypervisor.VCPUs,
		MemoryMiB:    c.Hypervisor.MemoryMiB,
		Accelerator:  c.Hypervisor.Accelerator,
		StateDir:     filepath.Join(stateDir, "vm"),
		ConsoleLog:   filepath.Join(stateDir, "console.log"),
		Agent:        vmm.AgentChannel{Transport: vmm.TransportSerial},
		HotplugSlots: c.Hypervisor.HotplugSlots,
	}, qemu.Config{
		Path:                   c.Hypervisor.Path,
		TCGTranslationCacheMiB: c.Hypervisor.TCGTranslationCacheMiB,
		FreePageReporting:      c.Hypervisor.FreePageReporting,
		AccelCacheDir:          filepath.Join(c.StateDir, "probes"),
		Jail:                   j,
	})
	if err != nil {
		t.Errorf("Validate accepted a configuration the QEMU backend refuses: %v\n%+v", err, c)
	}
}
