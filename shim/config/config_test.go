package config

import (
	"bytes"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/containerd/errdefs"

	"github.com/caisson-containers/caisson/internal/tomlconfig"
)

// The printed default file must decode, strictly, to exactly the defaults: it
// cannot drift from the code.
func TestWrittenDefaultsDecodeToDefaults(t *testing.T) {
	want := Default("/opt/caisson/guest")
	var buf bytes.Buffer
	if err := want.Write(&buf); err != nil {
		t.Fatal(err)
	}
	var got Config
	if err := tomlconfig.DecodeStrict(buf.Bytes(), &got); err != nil {
		t.Fatalf("printed defaults do not decode: %v\n%s", err, buf.String())
	}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("printed defaults decode to\n%+v\nwant\n%+v", got, want)
	}
	if err := got.Validate(); err != nil {
		t.Fatal(err)
	}
}

func TestLoad(t *testing.T) {
	dir := t.TempDir()
	write := func(name, body string) string {
		p := filepath.Join(dir, name)
		os.WriteFile(p, []byte(body), 0o644)
		return p
	}
	for _, tc := range []struct {
		name    string
		path    string
		env     string
		check   func(t *testing.T, c Config)
		wantErr string
	}{
		{name: "explicit file", path: write("a.toml", "[hypervisor]\nvcpus = 2\n"),
			check: func(t *testing.T, c Config) {
				if c.Hypervisor.VCPUs != 2 || c.Hypervisor.MemoryMiB != 512 {
					t.Fatalf("got %+v", c.Hypervisor)
				}
			}},
		{name: "env file", env: write("b.toml", "log_level = \"debug\"\n"),
			check: func(t *testing.T, c Config) {
				if c.LogLevel != "debug" {
					t.Fatalf("log_level %q", c.LogLevel)
				}
			}},
		{name: "explicit missing file", path: filepath.Join(dir, "nope.toml"), wantErr: "nope.toml"},
		{name: "unknown key", path: write("c.toml", "[hypervisor]\nvcpu = 2\n"), wantErr: `"hypervisor.vcpu"`},
		{name: "too little memory", path: write("d.toml", "[hypervisor]\nmemory_mib = 64\n"), wantErr: "hypervisor.memory_mib = 64"},
		{name: "bad accelerator", path: write("e.toml", "[hypervisor]\naccelerator = \"xen\"\n"), wantErr: "hypervisor.accelerator"},
		{name: "relative kernel", path: write("f.toml", "[guest]\nkernel = \"vmlinuz\"\n"), wantErr: "guest.kernel"},
		// QEMU boots both formats: a vmlinux directly (PVH), a bzImage through its setup code.
		{name: "vmlinux kernel", path: write("f2.toml", "[guest]\nkernel = \"/opt/k/vmlinux\"\n"),
			check: func(t *testing.T, c Config) {
				if c.Guest.Kernel != "/opt/k/vmlinux" {
					t.Fatalf("kernel %q", c.Guest.Kernel)
				}
			}},
		{name: "bzImage kernel", path: write("f3.toml", "[guest]\nkernel = \"/boot/vmlinuz-6.1.0-56-cloud-amd64\"\n"),
			check: func(t *testing.T, c Config) {
				if c.Guest.Kernel != "/boot/vmlinuz-6.1.0-56-cloud-amd64" {
					t.Fatalf("kernel %q", c.Guest.Kernel)
				}
			}},
		{name: "bad transport", path: write("g.toml", "[guest]\ntransport = \"tcp\"\n"), wantErr: "guest.transport = tcp: want auto or serial"},
		{name: "serial transport", path: write("g2.toml", "[guest]\ntransport = \"serial\"\n"),
			check: func(t *testing.T, c Config) {
				if c.Guest.Transport != "serial" {
					t.Fatalf("transport %q", c.Guest.Transport)
				}
			}},
		{name: "vsock transport", path: write("g3.toml", "[guest]\ntransport = \"vsock\"\n"), wantErr: "guest.transport = vsock: not supported for pods yet"},
		{name: "copied mount limit", path: write("i.toml", "[guest]\ncopied_mount_limit_bytes = 4096\n"),
			check: func(t *testing.T, c Config) {
				if c.Guest.CopiedMountLimitBytes != 4096 {
					t.Fatalf("copied_mount_limit_bytes %d", c.Guest.CopiedMountLimitBytes)
				}
			}},
		{name: "copied mount limit over a request", path: write("j.toml", "[guest]\ncopied_mount_limit_bytes = 4194304\n"), wantErr: "guest.copied_mount_limit_bytes = 4194304"},
		{name: "copied mount refresh interval", path: write("k.toml", "[guest]\ncopied_mount_refresh_interval = \"250ms\"\n"),
			check: func(t *testing.T, c Config) {
				if c.Guest.CopiedMountRefreshInterval != Duration(250*time.Millisecond) {
					t.Fatalf("copied_mount_refresh_interval %v", c.Guest.CopiedMountRefreshInterval)
				}
			}},
		{name: "copied mount refresh off", path: write("l.toml", "[guest]\ncopied_mount_refresh_interval = \"0\"\n"),
			check: func(t *testing.T, c Config) {
				if c.Guest.CopiedMountRefreshInterval != 0 {
					t.Fatalf("copied_mount_refresh_interval %v", c.Guest.CopiedMountRefreshInterval)
				}
			}},
		{name: "copied mount refresh too often", path: write("m.toml", "[guest]\ncopied_mount_refresh_interval = \"10ms\"\n"),
			wantErr: "guest.copied_mount_refresh_interval = 10ms: want 0 (never) or at least 100ms"},
		{name: "copied mount refresh negative", path: write("n.toml", "[guest]\ncopied_mount_refresh_interval = \"-1s\"\n"),
			wantErr: "guest.copied_mount_refresh_interval = -1s"},
		{name: "copied mount refresh not a duration", path: write("o.toml", "[guest]\ncopied_mount_refresh_interval = \"often\"\n"),
			wantErr: "want a duration"},
		{name: "copied mount refresh as a number", path: write("p.toml", "[guest]\ncopied_mount_refresh_interval = 2\n"),
			wantErr: "guest.copied_mount_refresh_interval = 2ns"}, // an integer is nanoseconds
		{name: "stats reuse", path: write("sr.toml", "[guest]\nstats_reuse_vcpu_time = \"20ms\"\n"),
			check: func(t *testing.T, c Config) {
				if c.Guest.StatsReuseVCPUTime != Duration(20*time.Millisecond) {
					t.Fatalf("stats_reuse_vcpu_time %v", c.Guest.StatsReuseVCPUTime)
				}
			}},
		{name: "stats reuse off", path: write("sr0.toml", "[guest]\nstats_reuse_vcpu_time = \"0\"\n"),
			check: func(t *testing.T, c Config) {
				if c.Guest.StatsReuseVCPUTime != 0 {
					t.Fatalf("stats_reuse_vcpu_time %v", c.Guest.StatsReuseVCPUTime)
				}
			}},
		{name: "stats reuse too long", path: write("sr1.toml", "[guest]\nstats_reuse_vcpu_time = \"1s\"\n"),
			wantErr: "guest.stats_reuse_vcpu_time = 1s: want 0 (never reuse) to 100ms"},
		{name: "stats reuse negative", path: write("sr2.toml", "[guest]\nstats_reuse_vcpu_time = \"-1ms\"\n"),
			wantErr: "guest.stats_reuse_vcpu_time = -1ms"},
		{name: "unknown pod annotation key", path: write("h.toml", "pod_annotations = [\"guest.kernel\"]\n"), wantErr: "not a key pods can override"},
		{name: "jailer without a user", path: write("jailer-nouser.toml", "[hypervisor.jailer]\nuser = \"\"\n"), wantErr: "hypervisor.jailer.user"},
		{name: "jailer off", path: write("jailer-off.toml", "[hypervisor.jailer]\nenabled = false\nuser = \"\"\n"),
			check: func(t *testing.T, c Config) {
				if c.Hypervisor.Jailer.Enabled {
					t.Fatal("jailer still enabled")
				}
			}},
		{name: "jailer on by default", path: write("jailer-default.toml", "[hypervisor]\nvcpus = 1\n"),
			check: func(t *testing.T, c Config) {
				if j := c.Hypervisor.Jailer; !j.Enabled || j.User != DefaultJailUser {
					t.Fatalf("jailer %+v", j)
				}
			}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Setenv(EnvPath, tc.env)
			c, _, err := Load(tc.path)
			if tc.wantErr != "" {
				if !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("error %v, want it to mention %s", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			tc.check(t, c)
		})
	}
}

// A pod cannot reach its agent over vsock yet (shim/pod), so a configuration asking for it
// is refused when it is loaded, as not implemented rather than as a typo.
func TestVsockTransportNotImplemented(t *testing.T) {
	c := Default("/g")
	c.Guest.Transport = "vsock"
	if err := c.Validate(); !errdefs.IsNotImplemented(err) {
		t.Fatalf("Validate with transport vsock: %v, want NotImplemented", err)
	}
	c.Guest.Transport = "tcp"
	if err := c.Validate(); !errdefs.IsInvalidArgument(err) {
		t.Fatalf("Validate with transport tcp: %v, want InvalidArgument", err)
	}
}

func TestWithAnnotations(t *testing.T) {
	base := Default("/g")
	base.Hypervisor.MaxVCPUs, base.Hypervisor.MaxMemoryMiB = 4, 4096
	for _, tc := range []struct {
		name        string
		annotations map[string]string
		want        func(c Config) bool
		wantErr     bool
		mention     []string // in the error
	}{
		{name: "none", annotations: map[string]string{"other": "x"}, want: func(c Config) bool { return reflect.DeepEqual(c, base) }},
		{name: "allowed", annotations: map[string]string{AnnotationPrefix + "hypervisor.vcpus": "2", AnnotationPrefix + "hypervisor.memory_mib": "1024"},
			want: func(c Config) bool { return c.Hypervisor.VCPUs == 2 && c.Hypervisor.MemoryMiB == 1024 }},
		{name: "not allowed here", annotations: map[string]string{AnnotationPrefix + "storage.dax": "false"}, wantErr: true},
		{name: "never overridable", annotations: map[string]string{AnnotationPrefix + "guest.kernel": "/evil"}, wantErr: true},
		{name: "bad value", annotations: map[string]string{AnnotationPrefix + "hypervisor.vcpus": "many"}, wantErr: true},
		{name: "below minimum", annotations: map[string]string{AnnotationPrefix + "hypervisor.memory_mib": "16"}, wantErr: true},
		{name: "memory above max", annotations: map[string]string{AnnotationPrefix + "hypervisor.memory_mib": "4097"},
			wantErr: true, mention: []string{AnnotationPrefix + "hypervisor.memory_mib", "hypervisor.max_memory_mib = 4096"}},
		{name: "memory at max", annotations: map[string]string{AnnotationPrefix + "hypervisor.memory_mib": "4096"},
			want: func(c Config) bool { return c.Hypervisor.MemoryMiB == 4096 }},
		{name: "vcpus above max", annotations: map[string]string{AnnotationPrefix + "hypervisor.vcpus": "5"},
			wantErr: true, mention: []string{AnnotationPrefix + "hypervisor.vcpus", "hypervisor.max_vcpus = 4"}},
		{name: "vcpus at max", annotations: map[string]string{AnnotationPrefix + "hypervisor.vcpus": "4"},
			want: func(c Config) bool { return c.Hypervisor.VCPUs == 4 }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := base.WithAnnotations(tc.annotations)
			if tc.wantErr {
				if !errdefs.IsInvalidArgument(err) {
					t.Fatalf("error %v, want InvalidArgument", err)
				}
				for _, m := range tc.mention {
					if !strings.Contains(err.Error(), m) {
						t.Errorf("error %q does not mention %q", err, m)
					}
				}
				return
			}
			if err != nil || !tc.want(got) {
				t.Fatalf("got %+v, %v", got, err)
			}
		})
	}
}

// The VM size limits: defaults from the host, a configuration above them refused naming
// the key, and a pod's CRI resources that would grow the VM past them refused naming
// their source and the limit.
func TestVMSizeLimits(t *testing.T) {
	d := Default("/g")
	if d.Hypervisor.MaxVCPUs < 1 || d.Hypervisor.MaxMemoryMiB < MinMemoryMiB {
		t.Fatalf("default limits %d vCPUs, %d MiB", d.Hypervisor.MaxVCPUs, d.Hypervisor.MaxMemoryMiB)
	}
	for _, tc := range []struct {
		name    string
		change  func(h *Hypervisor)
		mention string
	}{
		{"vcpus above max_vcpus", func(h *Hypervisor) { h.MaxVCPUs, h.VCPUs = 2, 3 }, "hypervisor.vcpus = 3: above hypervisor.max_vcpus = 2"},
		{"memory above max_memory_mib", func(h *Hypervisor) { h.MaxMemoryMiB, h.MemoryMiB = 1024, 2048 }, "hypervisor.memory_mib = 2048: above hypervisor.max_memory_mib = 1024"},
		{"max_vcpus zero", func(h *Hypervisor) { h.MaxVCPUs = 0 }, "hypervisor.max_vcpus = 0"},
		{"max_memory_mib below the minimum", func(h *Hypervisor) { h.MaxMemoryMiB = 64 }, "hypervisor.max_memory_mib = 64"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := Default("/g")
			tc.change(&c.Hypervisor)
			err := c.Validate()
			if !errdefs.IsInvalidArgument(err) || !strings.Contains(err.Error(), tc.mention) {
				t.Fatalf("Validate: %v, want InvalidArgument mentioning %q", err, tc.mention)
			}
		})
	}

	c := Default("/g")
	c.Hypervisor.MaxVCPUs, c.Hypervisor.MaxMemoryMiB = 2, 1024
	got, err := c.WithPodResources("io.kubernetes.cri.sandbox-memory=536870912", 512, 1)
	if err != nil || got.Hypervisor.MemoryMiB != 1024 || got.Hypervisor.VCPUs != 2 {
		t.Fatalf("resources up to the limits: %+v, %v", got.Hypervisor, err)
	}
	for _, tc := range []struct {
		name         string
		mem, vcpus   int
		mentionLimit string
	}{
		{"memory", 513, 0, "hypervisor.max_memory_mib = 1024"},
		{"vcpus", 0, 2, "hypervisor.max_vcpus = 2"},
	} {
		_, err := c.WithPodResources("SOURCE", tc.mem, tc.vcpus)
		if !errdefs.IsInvalidArgument(err) || !strings.Contains(err.Error(), "SOURCE") || !strings.Contains(err.Error(), tc.mentionLimit) {
			t.Errorf("%s above the limit: %v, want InvalidArgument naming SOURCE and %q", tc.name, err, tc.mentionLimit)
		}
	}
}

// Warm VMs: off by default, from a template or booted, and refused above MaxWarmVMs or
// with an idle timeout too short to be one, naming the key.
func TestWarmVMs(t *testing.T) {
	d := Default("/g")
	if d.Hypervisor.WarmVMs != 0 || d.Hypervisor.WarmVMIdleTimeout <= 0 {
		t.Fatalf("defaults: %d warm VMs, idle timeout %s", d.Hypervisor.WarmVMs, d.Hypervisor.WarmVMIdleTimeout)
	}
	for _, tc := range []struct {
		name    string
		change  func(h *Hypervisor)
		mention string // "": valid
	}{
		{"with a template", func(h *Hypervisor) { h.Template, h.WarmVMs = true, 2 }, ""},
		{"the most", func(h *Hypervisor) { h.Template, h.WarmVMs = true, MaxWarmVMs }, ""},
		{"booted", func(h *Hypervisor) { h.WarmVMs = 1 }, ""},
		{"too many", func(h *Hypervisor) { h.Template, h.WarmVMs = true, MaxWarmVMs+1 }, "hypervisor.warm_vms = 17"},
		{"negative", func(h *Hypervisor) { h.Template, h.WarmVMs = true, -1 }, "hypervisor.warm_vms = -1"},
		{"idle timeout zero", func(h *Hypervisor) { h.WarmVMIdleTimeout = 0 }, "hypervisor.warm_vm_idle_timeout = 0s"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := Default("/g")
			tc.change(&c.Hypervisor)
			err := c.Validate()
			if tc.mention == "" {
				if err != nil {
					t.Fatal(err)
				}
				return
			}
			if !errdefs.IsInvalidArgument(err) || !strings.Contains(err.Error(), tc.mention) {
				t.Fatalf("Validate: %v, want InvalidArgument mentioning %q", err, tc.mention)
			}
		})
	}
}
