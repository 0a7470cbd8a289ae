// Package vmm is the shim's view of the virtual machine that runs a pod: a small interface
// that a VMM implementation (QEMU today, in package shim/vmm/qemu) satisfies, and the plain
// types that describe a VM and the devices attached to it.
//
// A Hypervisor is one VMM configured once (its binary, its own settings): it makes VMs
// (New) and says what they depend on besides their Config (Identity), which a VM saved
// as a template (VM.SaveTemplate) shares with the VMs started from it. The shim reaches
// a VMM through these two interfaces only: a second VMM is a second implementation of
// them, beside QEMU's.
//
// The interface is deliberately small. A VM is configured once (Config), started once
// (Start), has disks attached and detached while it runs (AttachDisk, DetachDisk), and ends
// either because the shim stops it (Stop) or because it dies on its own (Done, Wait).
// Everything the shim needs to reach the guest agent is in Endpoint.
//
// # Lifecycle
//
//	vm, _ := hv.New(cfg)                           // hv: e.g. qemu.NewHypervisor(shimConfig)
//	if err := vm.Start(ctx); err != nil { ... }   // nothing is left behind on error
//	defer vm.Stop(ctx)                             // idempotent, also after the VM died
//	go func() { <-vm.Done(); err := vm.Wait() ... }() // err says why the VM ended
//
// Wait returns nil after Stop and a *ExitError when the VM ended on its own (the VMM
// process crashed or was killed, or the guest shut down or panicked). Done is closed as soon
// as the VMM process has exited, so the shim can fail every container of the pod promptly.
//
// # Disks and their guest addresses
//
// AttachDisk (and Address, for the disks of Config.Disks) returns a DiskAddress that the
// guest agent uses to find the device without guessing device names: PCIPath names the device by the PCI slot.function of each hop
// from the guest's root bus (see PCIPath), and Serial is the virtio-blk serial the guest
// shows in /sys/block/vdX/serial. Bus numbers are not part of the address: the guest's
// firmware assigns them.
//
// Disk files are opaque to the VMM: a Block disk is exposed as a raw virtio-blk device, a
// PMEM disk is mapped into the guest as a virtio-pmem device (DAX), whose size must be a
// multiple of PMEMAlignment. The guest must not write to read-only disks; the VMM makes
// them read-only devices.
package vmm

import (
	"context"
	"fmt"
	"strings"
	"time"
)

// Hypervisor makes the VMs of one VMM, configured once.
type Hypervisor interface {
	// New checks cfg, applies its defaults and returns a VM that is not started yet.
	New(cfg Config) (VM, error)
	// Identity is what the VMs New makes depend on besides their Config. A template is
	// restored only by a hypervisor of the same identity (see Template).
	Identity() (Identity, error)
	// MaxBootDisks is how many Config.Disks a VM may boot with.
	MaxBootDisks() int
}

// Identity is what a VMM's VMs depend on besides their Config: a template made by one
// VMM, or by one build or setting of it, cannot be restored by another.
type Identity struct {
	// VMM names the implementation, e.g. "qemu".
	VMM string `json:"vmm"`
	// Binary is the VMM's executable: a template made by it is stale once the file
	// changes (a new build of the VMM).
	Binary string `json:"binary"`
	// Settings are the VMM's own settings that change the VM (devices, caches).
	Settings map[string]string `json:"settings,omitempty"`
}

// PMEMAlignment is the size a PMEM disk's file must be a multiple of.
const PMEMAlignment = 2 << 20

// AgentPortName is the name of the virtio-serial port that carries the agent's channel.
// The guest finds it as the port whose /sys/class/virtio-ports/vportNpM/name is this name
// (or, with udev, as /dev/virtio-ports/org.caisson.agent.0).
const AgentPortName = "org.caisson.agent.0"

// VM is one virtual machine running one pod.
type VM interface {
	// Start launches the VMM and returns once it accepts commands. The guest may still
	// be booting: the agent channel is usable when the agent answers on it. Start is
	// called once: if it fails, every process, socket and file it created is gone,
	// Done is closed and Wait says why.
	Start(ctx context.Context) error
	// Endpoint says how to reach the guest agent.
	Endpoint() Endpoint
	// AttachDisk hot-plugs d into the running VM.
	AttachDisk(ctx context.Context, d Disk) (DiskAddress, error)
	// AttachNIC hot-plugs n into the running VM, after the NICs it started with (a VM
	// restored from a template ahead of its pod gets the pod's network this way). The
	// VMM has its own copy of n.Tap when it returns: the caller closes its own.
	AttachNIC(ctx context.Context, n NIC) error
	// AttachSharedFS hot-plugs the virtio-fs device fs into a running VM that started
	// with its memory shared (Config.SharedMemory) and no shared file system (a VM
	// booted ahead of its pod gets the pod's virtiofsd this way). The daemon must be
	// listening on fs.Socket.
	AttachSharedFS(ctx context.Context, fs SharedFS) error
	// Address returns the guest address of an attached disk, cold-plugged (Config.Disks)
	// or hot-plugged. An unknown id is ErrNotFound.
	Address(id string) (DiskAddress, error)
	// DetachDisk hot-unplugs the disk attached with id and releases its backend. It
	// returns once the guest has let go of the device, or with an error if ctx ends
	// first (a later call with the same id waits again). An unknown id is ErrNotFound.
	// A device the VMM cannot unplug (QEMU: virtio-pmem) is ErrNotImplemented: the id
	// is released, the device stays, and AttachDisk of the same file reuses it.
	DetachDisk(ctx context.Context, id string) error
	// Stop ends the VM: gracefully while ctx allows (and at most a few seconds), then by
	// killing the VMM's whole process group. It removes the sockets and files the VMM
	// created except the console log. Stop may be called more than once, and after the
	// VM died on its own.
	Stop(ctx context.Context) error
	// Done is closed when the VMM process has exited.
	Done() <-chan struct{}
	// Wait blocks until Done is closed and says why the VM ended: nil if Stop ended it,
	// a *ExitError otherwise.
	Wait() error
	// Pid is the VMM process id (0 before Start).
	Pid() int
	// VCPUTime is how long the VM's vCPUs have run on the host so far: an upper bound of
	// what the guest executed, so that the guest's own counters cannot have changed since
	// an earlier reading unless this grew. It only grows; an error if the VM is not
	// running or the host does not say.
	VCPUTime() (time.Duration, error)
	// SaveTemplate saves a running template VM (Config.Template without Restore) into
	// its Template.Dir, leaving it paused: the caller stops it. The guest should be
	// idle (its agent ready), since the VMs started from it resume where it was.
	SaveTemplate(ctx context.Context) error
	// Resize grows the running VM to want: memory by hot-plugging one more memory
	// device (its size rounded up to the guest's memory block, so the VM may get more
	// than asked for), vCPUs by hot-plugging the missing ones, up to Config.MaxVCPUs and
	// Config.MaxMemoryMiB. It returns the VM's size after. The guest onlines the memory
	// itself (the VMM's kernel parameters) but not the vCPUs: the caller has the guest
	// agent online them (api/agent/v1 Resources.Resize). A VM only grows: want below the
	// VM's current size in either is refused (InvalidArgument) and nothing changes.
	Resize(ctx context.Context, want Size) (Size, error)
}

// Size is a VM's memory and vCPUs.
type Size struct {
	MemoryMiB int
	VCPUs     int
}

// Transport is how the host reaches the guest agent.
type Transport string

const (
	// TransportSerial is a virtio-serial port (named AgentPortName in the guest) whose
	// host end is a unix socket the VMM listens on.
	TransportSerial Transport = "serial"
	// TransportVsock is AF_VSOCK to the guest's context id (needs /dev/vhost-vsock).
	TransportVsock Transport = "vsock"
)

// AgentChannel chooses the transport of the agent channel.
type AgentChannel struct {
	Transport Transport
	// CID is the guest's vsock context id (TransportVsock only; must be ≥ 3 and unique
	// on the host).
	CID uint32
}

// Endpoint is what a transport needs to dial the guest agent.
type Endpoint struct {
	Transport Transport
	// Path is the host unix socket of the virtio-serial port (TransportSerial).
	Path string
	// CID is the guest's vsock context id (TransportVsock). The port is the agent's
	// choice, not the VMM's.
	CID uint32
}

// DiskKind is how a disk file is presented to the guest.
type DiskKind int

const (
	// Block is a virtio-blk device.
	Block DiskKind = iota
	// PMEM is a virtio-pmem device: the file is mapped into guest memory and can be
	// mounted with DAX, so the guest reads it from the host's page cache without a copy.
	PMEM
)

func (k DiskKind) String() string {
	switch k {
	case Block:
		return "block"
	case PMEM:
		return "pmem"
	}
	return fmt.Sprintf("DiskKind(%d)", int(k))
}

// Disk is a host file exposed to the guest as a device.
type Disk struct {
	// ID names the disk for DetachDisk; unique within a VM. Any string.
	ID string
	// Path is the host file.
	Path string
	// ReadOnly makes the device read-only for the guest (layers always are).
	ReadOnly bool
	Kind     DiskKind
}

// PCIPath locates a PCI device from the guest's root bus: the slot.function of each hop,
// separated by "/", all in hex as Linux prints them. "08.1/00.0" is the device at 00.0 on
// the secondary bus of the bridge (a PCIe root port) at 08.1 on the root bus; the guest
// finds it at /sys/devices/pci0000:00/0000:00:08.1/0000:BB:00.0 whatever bus number BB
// firmware gave the port. "1c.0/01.0" is the device in slot 01 of the PCI bridge at 1c.0.
type PCIPath string

// Hops returns the slot.function of each hop, root bus first.
func (p PCIPath) Hops() []string {
	if p == "" {
		return nil
	}
	return strings.Split(string(p), "/")
}

// DiskAddress is how the guest finds an attached disk.
type DiskAddress struct {
	PCIPath PCIPath
	// Serial is the virtio-blk serial (Block disks only), at most 20 bytes.
	Serial string
}

// ExitError says why a VM ended without Stop.
type ExitError struct {
	// Reason is a short human sentence: "qemu was killed by signal killed",
	// "the guest shut down", ...
	Reason string
	// Log is the tail of the VMM's own error output, if any.
	Log string
}

func (e *ExitError) Error() string {
	if e.Log == "" {
		return "vm exited: " + e.Reason
	}
	return fmt.Sprintf("vm exited: %s: %s", e.Reason, e.Log)
}

// Config describes a VM.
type Config struct {
	// Kernel is the guest kernel image (bzImage).
	Kernel string
	// Initramfs is the guest initramfs (optional).
	Initramfs string
	// KernelParams are added to the kernel command line after the VMM's own.
	KernelParams []string
	// VCPUs is the number of virtual CPUs the VM boots with (default 1).
	VCPUs int
	// MaxVCPUs is how many vCPUs the VM can have once Resize hot-plugged more (default
	// VCPUs: none can be added).
	MaxVCPUs int
	// MemoryMiB is the guest's boot memory (default 512).
	MemoryMiB int
	// MaxMemoryMiB bounds boot memory plus everything hot-plugged into the guest's memory
	// space later: PMEM disks take their file size from it. Default MemoryMiB + 64 GiB
	// (address space only; it costs nothing until used).
	MaxMemoryMiB int
	// Accelerator is "auto" (the default: KVM if a probe guest runs under it, else TCG
	// with a warning), "kvm" or "tcg".
	Accelerator string
	// StateDir holds the VMM's sockets and logs; created if missing. Keep its path
	// short: unix socket paths are limited to 107 bytes.
	StateDir string
	// ConsoleLog receives the guest console (default StateDir/console.log). It is the
	// caller's: Stop leaves it for post-mortems.
	ConsoleLog string
	// Agent chooses the agent channel (default TransportSerial).
	Agent AgentChannel
	// Disks are attached before the guest boots. Each can be detached like a hot-plugged one.
	Disks []Disk
	// HotplugSlots is how many more disks can be attached at once while the VM runs.
	HotplugSlots int
	// NICs are network cards backed by taps the caller opened (see NIC).
	NICs []NIC
	// Template, if set, makes this VM a template or starts it from one (see Template).
	Template *Template
	// TCGPlugins are QEMU plugins (-plugin FILE[,ARG=VALUE...]) loaded into a TCG
	// guest: instruments for measuring what the guest executes (hack/tcgprof). A KVM
	// guest has none; a jailed QEMU sees only its jail's files.
	TCGPlugins []string
	// SharedFS, if set, is a virtio-fs device backed by a vhost-user file system daemon
	// (virtiofsd) the caller started. vhost-user needs the guest's RAM shared with the
	// daemon, so the VM's memory is a shared memory file; it cannot be combined with
	// Template, whose VMs map their memory privately.
	SharedFS *SharedFS
	// SharedMemory makes the guest's memory a shared memory file, as SharedFS does, for
	// a VM whose virtio-fs device is attached later (AttachSharedFS). Not with Template.
	SharedMemory bool
}

// SharesMemory says whether the VM's memory is shared with other processes: for a
// virtio-fs daemon, now or later.
func (c Config) SharesMemory() bool { return c.SharedFS != nil || c.SharedMemory }

// SharedFS is a virtio-fs device.
type SharedFS struct {
	// Socket is the daemon's vhost-user socket, listening before Start.
	Socket string
	// Tag is what the guest mounts (mount -t virtiofs TAG DIR), at most 36 bytes.
	Tag string
}

// Template is a VM saved once it has booted and its agent is ready, which other VMs start
// from instead of booting: they map its guest memory privately (copy-on-write, the
// unchanged pages shared through the host's page cache) and load its device state.
//
// A template and the VMs started from it must have the same kernel, initramfs, kernel
// parameters, CPUs, memory (and their maxima), hot-plug slots, agent channel and
// Template.Disks, and no other disks or NICs in the template: a VM started from one gets
// Config.Disks and Config.NICs hot-plugged (into its hot-plug slots) before Start returns.
type Template struct {
	// Dir holds the template: the guest memory file and the saved device state. It
	// should be on a memory filesystem (tmpfs): the memory file is the guest's RAM.
	Dir string
	// Restore starts the VM from the template in Dir. Without it the VM boots with its
	// RAM in Dir's memory file (shared) and SaveTemplate saves it.
	Restore bool
	// Disks are the template's own (read-only) disks: the template VM boots with them
	// and so does every VM started from it, the same files at the same places (the
	// saved device state refers to them), so that what the template's guest set up on
	// them (a mount) is there at once. Block disks only.
	Disks []Disk
}

// Names of a template's files in Template.Dir.
const (
	TemplateMemory = "memory"
	TemplateState  = "state"
)
