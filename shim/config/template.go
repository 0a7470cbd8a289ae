package config

import (
	"fmt"
	"io"
	"strconv"
	"strings"
	"text/template"
)

// Write prints c as a complete, commented TOML file: what `caisson config
// default` prints. Every key is present, so the file documents itself.
func (c Config) Write(w io.Writer) error {
	return fileTemplate.Execute(w, c)
}

var fileTemplate = template.Must(template.New("config").Funcs(template.FuncMap{
	"q":    strconv.Quote,
	"list": func(s []string) string { return tomlList(s) },
}).Parse(`# Caisson runtime configuration (containerd-shim-caisson-v2).
# Read from the runtime option ConfigPath, else $CAISSON_CONFIG, else /etc/caisson/config.toml.
# Unknown keys are an error.

# Per-VM state: sockets, console and QEMU logs.
state_dir = {{q .StateDir}}
# trace, debug, info, warn or error.
log_level = {{q .LogLevel}}
# Keys a pod may override with annotations "io.caisson.config.<key>".
# Allowed: hypervisor.vcpus, hypervisor.memory_mib, storage.dax, guest.debug_console.
pod_annotations = {{list .PodAnnotations}}

[hypervisor]
# qemu-system-x86_64; empty means the one on PATH.
path = {{q .Hypervisor.Path}}
# auto: KVM if a probe guest boots under it, else TCG (software emulation, with a warning).
accelerator = {{q .Hypervisor.Accelerator}}
vcpus = {{.Hypervisor.VCPUs}}
# At least 128.
memory_mib = {{.Hypervisor.MemoryMiB}}
# The largest VM a pod may get: vcpus and memory_mib after the pod's annotations and its CRI
# resources (sandbox CPU and memory) grew them. A pod asking for more is refused, with an error
# naming what asked and the limit. The defaults printed are this host's CPUs and memory.
max_vcpus = {{.Hypervisor.MaxVCPUs}}
max_memory_mib = {{.Hypervisor.MaxMemoryMiB}}
# Devices that can be hot-plugged into a running VM (slots of PCI bridges, 30 each; at most 90).
hotplug_slots = {{.Hypervisor.HotplugSlots}}
# Bounds TCG's translation cache, most of a TCG VM's host memory. Unused under KVM.
tcg_translation_cache_mib = {{.Hypervisor.TCGTranslationCacheMiB}}
# A virtio-balloon device with free page reporting: the guest hands back the memory it frees
# (booted VMs only, not those of a template).
free_page_reporting = {{.Hypervisor.FreePageReporting}}
# Start pod VMs from a saved VM (one per VM shape, made on first use in state_dir/templates)
# instead of booting them: faster starts, memory shared copy-on-write; every VM of a shape
# has the same guest kernel address layout.
template = {{.Hypervisor.Template}}
# Keep this many VMs started and warmed up, each waiting for a pod (at most 16): restored from the
# template with template = true, else booted. A pod takes one and the next is started; each costs
# an idle pod's memory and CPU while it waits. A warm VM no pod took ends after warm_vm_idle_timeout.
warm_vms = {{.Hypervisor.WarmVMs}}
warm_vm_idle_timeout = {{q .Hypervisor.WarmVMIdleTimeout.String}}

[hypervisor.jailer]
# Run each VM's QEMU as an unprivileged user, without capabilities, in a mount namespace holding
# only its files (kernel, initramfs, the VM's state directory; disks are passed as descriptors).
enabled = {{.Hypervisor.Jailer.Enabled}}
# A user name (with its primary group) or "UID:GID", never root. make deps creates caisson-qemu.
user = {{q .Hypervisor.Jailer.User}}

[guest]
# The uncompressed vmlinux (booted directly, through its PVH entry) or a bzImage; the kernel's
# modules image, modules.erofs, is beside it.
kernel = {{q .Guest.Kernel}}
# Its /init is caisson-agent.
initramfs = {{q .Guest.Initramfs}}
# Appended to the kernel command line.
kernel_params = {{q .Guest.KernelParams}}
# How the shim reaches the agent: auto or serial, both a virtio-serial port (vsock, even where
# the host has vhost-vsock, is not supported for pods yet).
transport = {{q .Guest.Transport}}
# All the guest kernel's messages on the console log (otherwise it boots quiet, which is faster).
debug_console = {{.Guest.DebugConsole}}
# How host bind mounts (Kubernetes volumes, -v of ctr and nerdctl) reach containers:
# "virtio-fs" shares them through one virtiofsd per pod (writes land on the host); "copy"
# copies them into the VM and refuses writable ones. Pods from a VM template always copy.
shared_fs = {{q .Guest.SharedFS}}
# The virtio-fs daemon (shared_fs = "virtio-fs").
virtiofsd = {{q .Guest.Virtiofsd}}
# Copied bind mounts (shared_fs = "copy", or a pod from a template) holding at most this many
# bytes are copied into the VM at container create; larger ones are refused. 0 refuses them
# all; at most 3145728.
copied_mount_limit_bytes = {{.Guest.CopiedMountLimitBytes}}
# How often the sources of copied mounts that every container mounts read-only are checked
# for host-side changes (an updated ConfigMap or Secret, a rotated token), which are then
# copied into the VM: a Go duration ("2s", "500ms"), "0" never checks, else at least 100ms.
copied_mount_refresh_interval = {{q .Guest.CopiedMountRefreshInterval.String}}
# A container's stats are answered with the guest's last reply while the VM's vCPUs ran less
# than this since it came (and for at most 10s), instead of waking the guest: the reply is then
# behind by at most this much of the container's CPU time. A Go duration, "0" always asks the
# guest, at most 100ms.
stats_reuse_vcpu_time = {{q .Guest.StatsReuseVCPUTime.String}}

[storage]
# EROFS layers as virtio-pmem (DAX: the guest reads the host's page cache) instead of virtio-blk.
dax = {{.Storage.DAX}}
block_driver = {{q .Storage.BlockDriver}}
`))

func tomlList(s []string) string {
	q := make([]string, len(s))
	for i, v := range s {
		q[i] = strconv.Quote(v)
	}
	return fmt.Sprintf("[%s]", strings.Join(q, ", "))
}
