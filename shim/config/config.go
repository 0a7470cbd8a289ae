// Package config is the configuration of Caisson's runtime (the shim and the
// VMs it runs), read from TOML.
//
// Where it comes from, first found wins: the ConfigPath runtime option that
// containerd passes to the shim, the CAISSON_CONFIG environment variable, then
// DefaultPath. Only a missing DefaultPath means "use the defaults"; a path named
// explicitly must exist. `caisson config default` prints the defaults as a
// commented file (see template.go).
package config

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/containerd/errdefs"
	"golang.org/x/sys/unix"

	"github.com/caisson-containers/caisson/internal/tomlconfig"
)

// MaxWarmVMs bounds hypervisor.warm_vms: each warm VM costs an idle pod's memory and CPU.
const MaxWarmVMs = 16

// MinWarmVMIdleTimeout bounds hypervisor.warm_vm_idle_timeout from below.
const MinWarmVMIdleTimeout = time.Second

// DefaultPath is where the runtime's configuration lives by default.
const DefaultPath = "/etc/caisson/config.toml"

// EnvPath names the environment variable that points at a configuration file.
const EnvPath = "CAISSON_CONFIG"

// Config is the runtime's configuration. Each field's default is in Default.
type Config struct {
	// StateDir holds per-VM state: sockets, console logs, QEMU logs. Default /run/caisson;
	// at most MaxStateDirLen bytes.
	StateDir string `toml:"state_dir"`
	// LogLevel is the shim's log level: trace, debug, info, warn or error. Default info.
	LogLevel string `toml:"log_level"`

	Hypervisor Hypervisor `toml:"hypervisor"`
	Guest      Guest      `toml:"guest"`
	Storage    Storage    `toml:"storage"`

	// PodAnnotations lists the keys a pod may override through annotations
	// "io.caisson.config.<key>" (e.g. "hypervisor.vcpus"). Default: vcpus and memory.
	PodAnnotations []string `toml:"pod_annotations"`
}

// Hypervisor configures QEMU.
type Hypervisor struct {
	// Path is the qemu-system-x86_64 binary. Default: found on PATH.
	Path string `toml:"path"`
	// Accelerator is auto (KVM if a probe guest boots under it, else TCG), kvm or tcg. Default auto.
	Accelerator string `toml:"accelerator"`
	// VCPUs is the number of virtual CPUs of a VM. Default 1.
	VCPUs int `toml:"vcpus"`
	// MemoryMiB is a VM's memory in MiB. Default 512; at least MinMemoryMiB.
	MemoryMiB int `toml:"memory_mib"`
	// MaxVCPUs bounds VCPUs, also after a pod's annotations and its CRI resources grew
	// it: a pod asking for more is refused. Default: the host's CPUs (as Kata's
	// default_maxvcpus).
	MaxVCPUs int `toml:"max_vcpus"`
	// MaxMemoryMiB bounds MemoryMiB, also after a pod's annotations and its CRI
	// resources grew it: a pod asking for more is refused (the scheduler sees the pod's
	// requests, not a VM size an annotation chose). Default: the host's memory.
	MaxMemoryMiB int `toml:"max_memory_mib"`
	// HotplugSlots is how many devices (layers, disks) can be hot-plugged into a running VM. Default 16.
	HotplugSlots int `toml:"hotplug_slots"`
	// TCGTranslationCacheMiB bounds TCG's translation cache, most of a TCG VM's host memory. Default 128:
	// a pod start translates about 78 MiB of guest code (boot 52, the first container 16), and a
	// smaller cache is emptied mid-start and everything translated again (the pause container's
	// create went from about 0.5 to 0.8 s at 64). A node packing idle pods can bound it lower: 100
	// booted idle pods fit on a 24 GiB host at 48 (docs/cri.md, Density).
	TCGTranslationCacheMiB int `toml:"tcg_translation_cache_mib"`
	// FreePageReporting gives each VM a virtio-balloon device with free page reporting,
	// through which the guest (which loads virtio_balloon at boot) hands the host back the
	// memory it frees in blocks of 2 MiB: what the kernel and the agent touch while they
	// start and free again, and what a container's processes free when they exit. The
	// balloon is never inflated. Not in VMs of a template (hypervisor.template): QEMU 7.2
	// would punch the pages they free out of the template's memory file. Default true.
	FreePageReporting bool `toml:"free_page_reporting"`
	// Template starts pod VMs from a template instead of booting them: a VM booted once
	// per VM shape (kernel, initramfs, parameters, CPUs, memory, slots) and saved when its
	// agent is ready, whose memory every VM made from it maps copy-on-write
	// (state_dir/templates). Pod start skips the guest's boot; the VMs share the
	// template's unchanged memory through the host's page cache, and with it the guest
	// kernel's address layout. Default false, as in Kata Containers (enable_template).
	Template bool `toml:"template"`
	// WarmVMs keeps this many VMs started and warmed up ahead of their pods, each held by
	// a shim waiting for a pod (shim/warm): restored from the template with template, else
	// booted (as Kata Containers' VM cache, whose VMs share no memory). A pod's first
	// container takes one, the VM gets the pod's NICs and disks hot-plugged and grows to
	// the pod's size, and another warm VM is started for the next pod. Under TCG a warm
	// VM has translated what a pod's start runs, which a restored or new one has not. Each
	// costs an idle pod's memory and CPU while it waits. At most MaxWarmVMs. Default 0
	// (none).
	WarmVMs int `toml:"warm_vms"`
	// WarmVMIdleTimeout ends a warm VM that no pod took for this long (the next pod
	// starts a new one). Default 30m; at least MinWarmVMIdleTimeout.
	WarmVMIdleTimeout Duration `toml:"warm_vm_idle_timeout"`
	// Jailer confines each VM's QEMU beyond its seccomp filter (-sandbox on).
	Jailer Jailer `toml:"jailer"`
}

// Jailer runs QEMU as an unprivileged user, without capabilities and with no_new_privs, in a
// mount namespace of its own that holds only its files (shim/vmm/qemu/jail), as
// Firecracker's jailer does.
type Jailer struct {
	// Enabled jails every VM's QEMU. Default true.
	Enabled bool `toml:"enabled"`
	// User is whom QEMU runs as: a user name (with its primary group) or "UID:GID", never
	// root. Default "caisson-qemu", a system user `make deps` (hack/deps.sh) creates.
	User string `toml:"user"`
}

// DefaultJailUser is the jail's default user.
const DefaultJailUser = "caisson-qemu"

// Guest configures what runs inside the VM.
type Guest struct {
	// Kernel is the guest kernel image: an uncompressed vmlinux ELF with the PVH entry note,
	// which QEMU starts directly (what `make guest` builds), or a bzImage, which decompresses
	// itself at each boot. Default: the vmlinux `make guest` built next to the binaries.
	Kernel string `toml:"kernel"`
	// Initramfs is the guest initramfs, whose /init is caisson-agent. Default: as Kernel.
	Initramfs string `toml:"initramfs"`
	// KernelParams are appended to the kernel command line. Default empty.
	KernelParams string `toml:"kernel_params"`
	// Transport is how the shim reaches the agent: auto or serial, which both mean a
	// virtio-serial port. auto does not pick vsock where the host has vhost-vsock: the pod
	// path (shim/pod) has no vsock support yet, since no host it is tested on has
	// /dev/vhost-vsock, so "vsock" is refused by Validate rather than accepted and failing
	// at the first pod. Default auto.
	Transport string `toml:"transport"`
	// DebugConsole puts all the guest kernel's messages on the console log (loglevel=7); otherwise
	// it boots quiet, which under TCG saves seconds of emulated serial output. Default false.
	DebugConsole bool `toml:"debug_console"`
	// CopiedMountLimitBytes is the most a bind mount of a host file or tree (a Kubernetes
	// ConfigMap, Secret, service account token or emptyDir) may hold for its content to be
	// copied into the VM at container create; larger ones are refused. At most
	// MaxCopiedMountLimitBytes. Default 1 MiB, the Kubernetes ConfigMap and Secret limit.
	CopiedMountLimitBytes int64 `toml:"copied_mount_limit_bytes"`
	// CopiedMountRefreshInterval is how often the shim looks for host-side changes in the
	// sources of the copied mounts that every container mounts read-only (an updated ConfigMap
	// or Secret, a rotated service account token) and copies what changed into the VM; 0 never
	// looks. A Go duration string ("2s", "500ms"), 0 or at least MinCopiedMountRefreshInterval.
	// Default 2s, as Kata's watchable bind mounts.
	CopiedMountRefreshInterval Duration `toml:"copied_mount_refresh_interval"`
	// StatsReuseVCPUTime lets the shim answer a container's Stats (containerd 2.x's CPU
	// collection, every second by default; the CRI's ContainerStats; `ctr task metrics`)
	// with the guest's last reply for it, while the VM's vCPUs have run less than this on
	// the host since that reply came and it is younger than StatsReuseMaxAge. Each call
	// into the guest wakes it, which under TCG costs about 5 ms of host CPU, most of an
	// idle pod's CPU. A reply's figures (CPU time, memory, I/O, pids, pressure) change
	// only by what the guest runs, so a reused one is behind by at most this much of the
	// container's CPU time (and what it ran while that reply left the guest), and what it
	// did since shows in the next reply that is not reused. A Go duration; 0 asks the
	// guest every time; at most MaxStatsReuseVCPUTime. Default 10ms, a tick of a 100 Hz
	// kernel: an idle TCG guest's own timers run its vCPU about 1.5–2.5 ms a second, so it
	// is asked about every 10 s, and a guest that runs 10 ms between two calls is asked
	// at each (docs/guest.md, "Not waking an idle guest").
	StatsReuseVCPUTime Duration `toml:"stats_reuse_vcpu_time"`
	// SharedFS is how host bind mounts (Kubernetes volumes, `-v` of ctr and nerdctl) reach
	// containers: "virtio-fs" (default) shares them through one virtiofsd per pod, writes
	// landing on the host; "copy" copies their content into the VM at create (up to
	// CopiedMountLimitBytes, read-only ones refreshed), and refuses writable ones, whose
	// writes would never reach the host. Pods from a VM template (hypervisor.template)
	// copy as with "copy": virtio-fs needs the guest's memory shared, a template VM's
	// is private.
	SharedFS string `toml:"shared_fs"`
	// Virtiofsd is the virtio-fs daemon. Default /usr/lib/qemu/virtiofsd (Debian's
	// qemu-system-common).
	Virtiofsd string `toml:"virtiofsd"`
}

// Values of Guest.SharedFS.
const (
	SharedFSVirtio = "virtio-fs"
	SharedFSCopy   = "copy"
)

// MaxStatsReuseVCPUTime bounds Guest.StatsReuseVCPUTime: beyond it, a reused reply
// could hide a container's CPU use for a whole collection interval.
const MaxStatsReuseVCPUTime = 100 * time.Millisecond

// StatsReuseMaxAge is the oldest a reused Stats reply may be (Guest.StatsReuseVCPUTime):
// a client that asks less often (the kubelet's 10 s housekeeping) always gets a new one.
const StatsReuseMaxAge = 10 * time.Second

// MinCopiedMountRefreshInterval bounds Guest.CopiedMountRefreshInterval from below.
const MinCopiedMountRefreshInterval = 100 * time.Millisecond

// MaxCopiedMountLimitBytes bounds Guest.CopiedMountLimitBytes: the copy travels in
// one request to the guest agent, below ttrpc's 4 MiB message limit.
const MaxCopiedMountLimitBytes = 3 << 20

// Storage configures how image layers reach the VM.
type Storage struct {
	// DAX attaches EROFS layers as virtio-pmem, so the guest reads them from the host's page cache,
	// shared by every VM using the layer; otherwise as read-only virtio-blk. Default true.
	DAX bool `toml:"dax"`
	// BlockDriver is the QEMU device for disks: virtio-blk. Default virtio-blk.
	BlockDriver string `toml:"block_driver"`
}

// MaxStateDirLen bounds StateDir: a pod's longest socket path below it is 53 bytes more
// (shim/podid.StateDir's directory of at most 38 bytes, then vm/agent.sock), and a unix
// socket path is at most 107 bytes.
const MaxStateDirLen = 107 - 53

// MinMemoryMiB is the least memory a VM can be given: the guest kernel and agent need it.
const MinMemoryMiB = 128

// hostCPUs and hostMemoryMiB are the host's, for the defaults of the VM size limits.
func hostCPUs() int { return runtime.NumCPU() }

func hostMemoryMiB() int {
	var si unix.Sysinfo_t
	if err := unix.Sysinfo(&si); err != nil {
		return 0 // Validate then says max_memory_mib must be set
	}
	return int(uint64(si.Totalram) * uint64(si.Unit) >> 20)
}

// Default returns the defaults, with guest artifacts in artifactsDir.
func Default(artifactsDir string) Config {
	return Config{
		StateDir: "/run/caisson",
		LogLevel: "info",
		Hypervisor: Hypervisor{
			Accelerator:            "auto",
			VCPUs:                  1,
			MemoryMiB:              512,
			MaxVCPUs:               hostCPUs(),
			MaxMemoryMiB:           hostMemoryMiB(),
			HotplugSlots:           16,
			TCGTranslationCacheMiB: 128,
			FreePageReporting:      true,
			WarmVMIdleTimeout:      Duration(30 * time.Minute),
			Jailer:                 Jailer{Enabled: true, User: DefaultJailUser},
		},
		Guest: Guest{
			Kernel:                     filepath.Join(artifactsDir, "vmlinux"),
			Initramfs:                  filepath.Join(artifactsDir, "initramfs.cpio.lz4"),
			Transport:                  "auto",
			CopiedMountLimitBytes:      1 << 20,
			CopiedMountRefreshInterval: Duration(2 * time.Second),
			StatsReuseVCPUTime:         Duration(10 * time.Millisecond),
			SharedFS:                   SharedFSVirtio,
			Virtiofsd:                  "/usr/lib/qemu/virtiofsd",
		},
		Storage:        Storage{DAX: true, BlockDriver: "virtio-blk"},
		PodAnnotations: []string{"hypervisor.vcpus", "hypervisor.memory_mib"},
	}
}

// DefaultArtifactsDir is where the guest kernel and initramfs are when no
// configuration says: in a checkout, _output/guest beside bin/ (what `make
// guest` builds); otherwise /usr/share/caisson.
func DefaultArtifactsDir() string {
	if exe, err := os.Executable(); err == nil {
		dir := filepath.Join(filepath.Dir(filepath.Dir(exe)), "_output", "guest")
		if st, err := os.Stat(dir); err == nil && st.IsDir() {
			return dir
		}
	}
	return "/usr/share/caisson"
}

// Load reads the configuration from path, or, when path is empty, from
// $CAISSON_CONFIG or DefaultPath. It returns the validated configuration and
// the file it came from ("" for the defaults).
func Load(path string) (Config, string, error) {
	c := Default(DefaultArtifactsDir())
	explicit := true
	if path == "" {
		path = os.Getenv(EnvPath)
	}
	if path == "" {
		path, explicit = DefaultPath, false
	}
	data, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) && !explicit {
		return c, "", c.Validate()
	}
	if err != nil {
		return Config{}, path, fmt.Errorf("read config: %w", err)
	}
	if err := tomlconfig.DecodeStrict(data, &c); err != nil {
		return Config{}, path, fmt.Errorf("config %s: %w", path, err)
	}
	if err := c.Validate(); err != nil {
		return Config{}, path, fmt.Errorf("config %s: %w", path, err)
	}
	return c, path, nil
}

// Validate reports the first value that cannot work, naming its key.
func (c Config) Validate() error {
	bad := func(key string, v any, why string) error {
		return fmt.Errorf("%s = %v: %s: %w", key, v, why, errdefs.ErrInvalidArgument)
	}
	switch {
	case !filepath.IsAbs(c.StateDir):
		return bad("state_dir", c.StateDir, "must be an absolute path")
	case len(c.StateDir) > MaxStateDirLen:
		return bad("state_dir", c.StateDir, fmt.Sprintf("longer than %d bytes: a pod's sockets below it would exceed the 107 bytes of a unix socket path", MaxStateDirLen))
	case !slices.Contains([]string{"trace", "debug", "info", "warn", "error"}, c.LogLevel):
		return bad("log_level", c.LogLevel, "want trace, debug, info, warn or error")
	case !slices.Contains([]string{"auto", "kvm", "tcg"}, c.Hypervisor.Accelerator):
		return bad("hypervisor.accelerator", c.Hypervisor.Accelerator, "want auto, kvm or tcg")
	case c.Hypervisor.VCPUs < 1 || c.Hypervisor.VCPUs > 255:
		return bad("hypervisor.vcpus", c.Hypervisor.VCPUs, "want 1 to 255")
	case c.Hypervisor.MaxVCPUs < 1 || c.Hypervisor.MaxVCPUs > 255:
		return bad("hypervisor.max_vcpus", c.Hypervisor.MaxVCPUs, "want 1 to 255")
	case c.Hypervisor.MaxMemoryMiB < MinMemoryMiB:
		return bad("hypervisor.max_memory_mib", c.Hypervisor.MaxMemoryMiB, fmt.Sprintf("a VM needs at least %d MiB", MinMemoryMiB))
	case c.Hypervisor.VCPUs > c.Hypervisor.MaxVCPUs:
		return bad("hypervisor.vcpus", c.Hypervisor.VCPUs, fmt.Sprintf("above hypervisor.max_vcpus = %d", c.Hypervisor.MaxVCPUs))
	case c.Hypervisor.MemoryMiB < MinMemoryMiB:
		return bad("hypervisor.memory_mib", c.Hypervisor.MemoryMiB, fmt.Sprintf("a VM needs at least %d MiB", MinMemoryMiB))
	case c.Hypervisor.MemoryMiB > c.Hypervisor.MaxMemoryMiB:
		return bad("hypervisor.memory_mib", c.Hypervisor.MemoryMiB, fmt.Sprintf("above hypervisor.max_memory_mib = %d", c.Hypervisor.MaxMemoryMiB))
	case c.Hypervisor.HotplugSlots < 0 || c.Hypervisor.HotplugSlots > 90:
		return bad("hypervisor.hotplug_slots", c.Hypervisor.HotplugSlots, "want 0 to 90 (slots of up to three PCI bridges)")
	case c.Hypervisor.Jailer.Enabled && c.Hypervisor.Jailer.User == "":
		return bad("hypervisor.jailer.user", `""`, "want a user name or UID:GID")
	case c.Hypervisor.Jailer.Enabled && strings.Contains(c.Hypervisor.Jailer.User, ":"):
		// A name is looked up when the VM starts (the user may be created after the
		// configuration is written); UID:GID needs no lookup to be checked now.
		u, g, _ := strings.Cut(c.Hypervisor.Jailer.User, ":")
		uid, err1 := strconv.ParseUint(u, 10, 32)
		gid, err2 := strconv.ParseUint(g, 10, 32)
		if err1 != nil || err2 != nil || uid == 0 || gid == 0 {
			return bad("hypervisor.jailer.user", c.Hypervisor.Jailer.User, "want a user name or UID:GID, neither of them 0 (root)")
		}
	case c.Hypervisor.TCGTranslationCacheMiB < 1:
		return bad("hypervisor.tcg_translation_cache_mib", c.Hypervisor.TCGTranslationCacheMiB, "want at least 1")
	case c.Hypervisor.WarmVMs < 0 || c.Hypervisor.WarmVMs > MaxWarmVMs:
		return bad("hypervisor.warm_vms", c.Hypervisor.WarmVMs, fmt.Sprintf("want 0 to %d", MaxWarmVMs))
	case time.Duration(c.Hypervisor.WarmVMIdleTimeout) < MinWarmVMIdleTimeout:
		return bad("hypervisor.warm_vm_idle_timeout", c.Hypervisor.WarmVMIdleTimeout, fmt.Sprintf("want at least %s", MinWarmVMIdleTimeout))
	case !filepath.IsAbs(c.Guest.Kernel):
		return bad("guest.kernel", c.Guest.Kernel, "must be an absolute path")
	case !filepath.IsAbs(c.Guest.Initramfs):
		return bad("guest.initramfs", c.Guest.Initramfs, "must be an absolute path")
	case c.Guest.Transport == "vsock":
		return fmt.Errorf("guest.transport = vsock: not supported for pods yet (pods reach the agent over virtio-serial; use auto or serial): %w",
			errdefs.ErrNotImplemented)
	case !slices.Contains([]string{"auto", "serial"}, c.Guest.Transport):
		return bad("guest.transport", c.Guest.Transport, "want auto or serial")
	case c.Guest.CopiedMountLimitBytes < 0 || c.Guest.CopiedMountLimitBytes > MaxCopiedMountLimitBytes:
		return bad("guest.copied_mount_limit_bytes", c.Guest.CopiedMountLimitBytes,
			fmt.Sprintf("want 0 to %d (the copy travels in one request into the VM)", MaxCopiedMountLimitBytes))
	case c.Guest.CopiedMountRefreshInterval < 0 ||
		c.Guest.CopiedMountRefreshInterval > 0 && time.Duration(c.Guest.CopiedMountRefreshInterval) < MinCopiedMountRefreshInterval:
		return bad("guest.copied_mount_refresh_interval", c.Guest.CopiedMountRefreshInterval,
			fmt.Sprintf("want 0 (never) or at least %s", MinCopiedMountRefreshInterval))
	case c.Guest.StatsReuseVCPUTime < 0 || time.Duration(c.Guest.StatsReuseVCPUTime) > MaxStatsReuseVCPUTime:
		return bad("guest.stats_reuse_vcpu_time", c.Guest.StatsReuseVCPUTime,
			fmt.Sprintf("want 0 (never reuse) to %s", MaxStatsReuseVCPUTime))
	case c.Guest.SharedFS != SharedFSVirtio && c.Guest.SharedFS != SharedFSCopy:
		return bad("guest.shared_fs", c.Guest.SharedFS, "want virtio-fs or copy")
	case c.Guest.SharedFS == SharedFSVirtio && !filepath.IsAbs(c.Guest.Virtiofsd):
		return bad("guest.virtiofsd", c.Guest.Virtiofsd, "must be an absolute path")
	case c.Storage.BlockDriver != "virtio-blk":
		return bad("storage.block_driver", c.Storage.BlockDriver, "want virtio-blk")
	}
	for _, k := range c.PodAnnotations {
		if _, ok := overrides[k]; !ok {
			return bad("pod_annotations", k, "not a key pods can override; known: "+strings.Join(overrideKeys(), ", "))
		}
	}
	return nil
}
