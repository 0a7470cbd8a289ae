package qemu

import (
	"encoding/json"
	"fmt"
	"strconv"
	"strings"

	"github.com/containerd/errdefs"

	"github.com/caisson-containers/caisson/shim/vmm"
	"github.com/caisson-containers/caisson/shim/vmm/qemu/accel"
)

// Guest PCI layout on the q35 root bus (pcie.0). 00.0 is the host bridge and 1f.x the
// ICH9 functions QEMU always adds; everything else is ours and fixed, so guest addresses
// do not depend on the order of options.
const (
	agentSlot    = 0x02 // virtio-serial-pci or vhost-vsock-pci
	balloonSlot  = 0x03 // virtio-balloon-pci, with Config.FreePageReporting (not in template VMs)
	sharedFSSlot = 0x01 // vhost-user-fs-pci, with vmm.Config.SharedFS (00.0 is the host bridge, 1f the ICH9 functions)
	// Root ports, one per disk on the command line, eight functions per slot from
	// firstPortSlot.
	firstPortSlot = 0x08
	lastPortSlot  = 0x1b
	// PCI bridges (pci-bridge) for hot-plugged disks, one per slot from firstBridgeSlot,
	// each with bridgeSlots slots from firstSlotInBridge. An empty root port costs
	// boot time under TCG (the firmware and the kernel each set it up as a bus: about
	// 40 ms per port, BenchmarkBootToInit), an empty bridge slot next to none; q35
	// hot-plugs into both through ACPI (acpiphp in the guest), and the guest releases a
	// device before QEMU reports it deleted either way. 30 slots per bridge (01-1e), as
	// Kata Containers uses them.
	firstBridgeSlot   = 0x1c
	lastBridgeSlot    = 0x1e
	firstSlotInBridge = 0x01
	bridgeSlots       = 30
	// MaxColdDisks is how many disks one VM can have on its command line.
	MaxColdDisks = (lastPortSlot - firstPortSlot + 1) * 8
	// MaxHotplugSlots is how many disks can be hot-plugged into one VM at once.
	MaxHotplugSlots = (lastBridgeSlot - firstBridgeSlot + 1) * bridgeSlots
	// memorySlots are DIMM slots for later memory hot-plug (virtio-pmem does not use them).
	memorySlots = 4
	// baseKernelParams come before the caller's: the console is the first serial port;
	// a panic reboots at once, which -no-reboot turns into QEMU exiting; no swiotlb
	// bounce buffer, which the kernel would otherwise allocate and zero (64 MiB of host
	// memory) because maxmem puts guest addresses above 4 GiB, although no device here
	// needs it (virtio DMA is 64-bit, there is no IOMMU); and root ports driven as plain
	// PCI bridges (pcie_ports=compat): the PCIe port services (AER, PME, native hot-plug)
	// cost about 30 ms of boot per root port under TCG and do nothing here, since q35
	// hot-plugs through ACPI (acpiphp), which needs no port driver. The kernel's crypto
	// self-tests are skipped and the i8042 controller (a VM has no PS/2 devices) is not
	// probed: under TCG the two took 0.35–0.5 s of every boot (guest/README.md, as Kata
	// does). Then what an idle guest wakes up for (idleKernelParams).
	baseKernelParams = "console=ttyS0 panic=-1 swiotlb=noforce pcie_ports=compat cryptomgr.notests" +
		" i8042.direct=1 i8042.dumbkbd=1 i8042.nopnp=1 i8042.noaux=1 " + idleKernelParams
	// idleKernelParams keep an idle guest asleep: each wake-up of its vCPU costs the host
	// about a millisecond of emulation under TCG, and QEMU's main loop wakes with it. The
	// TSC is the clock and trusted (tsc=reliable, as Kata does: without it the kernel
	// checks it against the HPET twice a second); no soft or NMI lockup detector (a timer
	// every 4 s, and under TCG a stalled host thread is not a guest lockup); no proactive
	// compaction, for which kcompactd woke twice a second and moved pages, touching
	// host memory the guest did not need (5–15 MiB per VM); the per-CPU VM statistics
	// are folded every 10 s instead of every second. Together they took an idle pod's
	// guest from about 60 to under 10 wake-ups a second (docs/guest.md). Memory that
	// Resize hot-plugs is onlined by the guest kernel as it arrives
	// (memhp_default_state=online; into the normal zone, usable by the kernel too,
	// since it is never unplugged).
	idleKernelParams = "tsc=reliable nowatchdog nmi_watchdog=0" +
		" sysctl.vm.compaction_proactiveness=0 sysctl.vm.stat_interval=10 memhp_default_state=online"
)

// Names of the files Start creates in the state dir.
const (
	qmpSocketName   = "qmp.sock"
	agentSocketName = "agent.sock"
	stderrLogName   = "qemu.log"
	consoleLogName  = "console.log"
)

// port is the idx-th PCIe root port: its QEMU id and its address on pcie.0.
type port int

func (p port) id() string { return "rp" + strconv.Itoa(int(p)) }
func (p port) slot() int  { return firstPortSlot + int(p)/8 }
func (p port) fn() int    { return int(p) % 8 }

// pciPath is the guest address of the device plugged into the port.
func (p port) pciPath() vmm.PCIPath {
	return vmm.PCIPath(fmt.Sprintf("%02x.%x/00.0", p.slot(), p.fn()))
}

// bridge is the idx-th PCI bridge for hot-plugged disks.
type bridge int

func (b bridge) id() string { return "br" + strconv.Itoa(int(b)) }
func (b bridge) slot() int  { return firstBridgeSlot + int(b) }

// device is the bridge on pcie.0. No SHPC: q35 hot-plugs into it through ACPI
// (acpiphp in the guest). It asks the firmware (QEMU's resource reserve capability) for
// 2 MiB of each memory window, which the BARs of 30 virtio devices fit in (16 KiB of
// 64-bit prefetchable and 4 KiB of MSI-X table each), and for no I/O window: devices on
// it are modern-only virtio (disable-legacy), with no I/O BAR.
func (b bridge) device() map[string]any {
	return map[string]any{
		"driver":         "pci-bridge",
		"id":             b.id(),
		"bus":            "pcie.0",
		"addr":           fmt.Sprintf("%02x.0", b.slot()),
		"chassis_nr":     0xf0 + int(b), // apart from the root ports' chassis numbers
		"shpc":           false,
		"io-reserve":     0,
		"mem-reserve":    2 << 20,
		"pref64-reserve": 2 << 20,
	}
}

// slot is where a disk's device plugs in: alone behind a root port (disks on the
// command line) or into a slot of a bridge (disks hot-plugged later).
type slot struct {
	bus     string // QEMU id of the bus
	addr    string // device address on a bridge; "" behind a root port
	pciPath vmm.PCIPath
}

func (p port) place() slot { return slot{bus: p.id(), pciPath: p.pciPath()} }

// modernOnly are the virtio devices with no legacy (I/O port) interface, which have no
// disable-legacy property either.
var modernOnly = map[string]bool{"vhost-user-fs-pci": true}

// plug puts dev (device_add or -device arguments) into the slot.
func (s slot) plug(dev map[string]any) {
	dev["bus"] = s.bus
	if s.addr != "" {
		dev["addr"] = s.addr
		if driver, _ := dev["driver"].(string); !modernOnly[driver] {
			dev["disable-legacy"] = "on" // a bridge slot has no I/O window
		}
	}
}

// hotSlot is the i-th hot-plug slot: bridge i/bridgeSlots, its slot
// firstSlotInBridge+i%bridgeSlots.
func hotSlot(i int) slot {
	b := bridge(i / bridgeSlots)
	s := firstSlotInBridge + i%bridgeSlots
	return slot{
		bus:     b.id(),
		addr:    fmt.Sprintf("%02x.0", s),
		pciPath: vmm.PCIPath(fmt.Sprintf("%02x.0/%02x.0", b.slot(), s)),
	}
}

// bridgesFor is how many bridges n hot-plug slots need.
func bridgesFor(n int) int { return (n + bridgeSlots - 1) / bridgeSlots }

func (p port) device() map[string]any {
	d := map[string]any{
		"driver":  "pcie-root-port",
		"id":      p.id(),
		"bus":     "pcie.0",
		"chassis": int(p) + 1,
		"addr":    fmt.Sprintf("%02x.%x", p.slot(), p.fn()),
	}
	if p.fn() == 0 {
		d["multifunction"] = true
	}
	return d
}

// backend is what a disk needs besides its device: a block node or a memory object.
type backend struct {
	command string // blockdev-add or object-add
	option  string // -blockdev or -object
	args    map[string]any
	del     string // blockdev-del or object-del
	delArgs map[string]any
}

// diskDevices returns the backend and the device of disk n plugged into slot s.
func diskDevices(d vmm.Disk, n int, s slot, size int64) (backend, map[string]any, vmm.DiskAddress) {
	be, dev, addr := diskDevice(d, n, size)
	addr.PCIPath = s.pciPath
	s.plug(dev)
	return be, dev, addr
}

// diskDevice returns the backend and the device of disk n, not yet placed on a bus.
func diskDevice(d vmm.Disk, n int, size int64) (backend, map[string]any, vmm.DiskAddress) {
	var addr vmm.DiskAddress
	switch d.Kind {
	case vmm.PMEM:
		id := fmt.Sprintf("pmem%d", n)
		mem := id + "-mem"
		return backend{
				command: "object-add",
				option:  "-object",
				args: map[string]any{
					"qom-type": "memory-backend-file",
					"id":       mem,
					"mem-path": d.Path,
					"size":     size,
					"share":    true,
					"readonly": d.ReadOnly,
				},
				del:     "object-del",
				delArgs: map[string]any{"id": mem},
			}, map[string]any{
				"driver": "virtio-pmem-pci",
				"id":     id,
				"memdev": mem,
			}, addr
	default:
		id := fmt.Sprintf("blk%d", n)
		node := id + "-node"
		raw := map[string]any{
			"driver":    "raw",
			"node-name": node,
			"read-only": d.ReadOnly,
			"file": map[string]any{
				"driver":    fileDriver(d.Path),
				"filename":  d.Path,
				"read-only": d.ReadOnly,
			},
		}
		if !d.ReadOnly {
			raw["discard"] = "unmap" // keeps sparse writable images sparse
		}
		addr.Serial = id
		return backend{
				command: "blockdev-add",
				option:  "-blockdev",
				args:    raw,
				del:     "blockdev-del",
				delArgs: map[string]any{"node-name": node},
			}, map[string]any{
				"driver": "virtio-blk-pci",
				"id":     id,
				"drive":  node,
				"serial": id,
				// The guest gets an I/O error where the host fails (a full disk
				// included) instead of the whole VM pausing (diskerr.go).
				"werror": "report",
				"rerror": "report",
			}, addr
	}
}

// optValue escapes a value for QEMU's key=value,... option syntax.
func optValue(s string) string { return strings.ReplaceAll(s, ",", ",,") }

func jsonArg(v map[string]any) string {
	b, err := json.Marshal(v)
	if err != nil {
		panic(err) // maps of strings, numbers and bools always marshal
	}
	return string(b)
}

// coldDisk is a disk on the command line.
type coldDisk struct {
	disk vmm.Disk
	n    int
	port port
	size int64
	// fd is the descriptor of the disk's file in a jailed QEMU (0: QEMU opens the path):
	// a Block disk's goes into fd set fd (-add-fd).
	fd int
}

// cmdline is everything args needs beyond the configs.
type cmdline struct {
	vm        vmm.Config // with defaults applied
	qemu      Config
	accel     string // kvm or tcg
	qmpSocket string
	agentSock string
	ports     int // root ports, for the disks below and no others
	bridges   int // for hot-plug slots
	disks     []coldDisk
	// restoreFD is the descriptor of the template's saved state (Template.Restore), 0 if none.
	restoreFD int
	// consoleFD is the descriptor of the pipe the guest console goes to (console.go).
	consoleFD int
	// jailed: QEMU runs in a jail (jailed.go) and opens no path of the shim's.
	jailed bool
	// tscKHz is the guest's TSC frequency under TCG (guestTSC), 0 to let it calibrate.
	tscKHz uint64
	// sharedFSFD is the descriptor of a connection to the virtio-fs daemon (a jailed
	// QEMU cannot reach its socket's path); 0: QEMU connects to SharedFS.Socket.
	sharedFSFD int
}

// args builds QEMU's command line: the machine, the kernel, the console and QMP, the
// agent's channel, the shared file system, the other devices and the disks.
func (c cmdline) args() ([]string, error) {
	a, err := c.machineArgs()
	if err != nil {
		return nil, err
	}
	a = append(a, c.kernelArgs()...)
	a = append(a, c.consoleArgs()...)
	a = append(a, c.agentArgs()...)
	fs, err := c.sharedFSArgs()
	if err != nil {
		return nil, err
	}
	a = append(a, fs...)
	devices, err := c.deviceArgs()
	if err != nil {
		return nil, err
	}
	a = append(a, devices...)
	return append(a, c.diskArgs()...), nil
}

// machineArgs are the machine, its CPUs and memory, and the accelerator.
func (c cmdline) machineArgs() ([]string, error) {
	cfg := c.vm
	machine := "q35"
	var ram []string
	switch {
	case c.vm.Template != nil && c.vm.SharesMemory():
		return nil, fmt.Errorf("a shared file system needs the guest's memory shared with virtiofsd, and a VM template's is private: %w", errdefs.ErrInvalidArgument)
	case c.vm.Template != nil:
		machine += ",memory-backend=" + templateRAM
	case c.vm.SharesMemory():
		machine += ",memory-backend=" + sharedRAM
		ram = []string{"-object", fmt.Sprintf("memory-backend-memfd,id=%s,size=%dM,share=on", sharedRAM, cfg.MemoryMiB)}
	}
	a := []string{
		"-name", "caisson,debug-threads=on",
		"-M", machine,
		"-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
		"-sandbox", "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
		"-msg", "timestamp=on",
		// maxcpus: Resize hot-plugs vCPUs up to it (resize.go).
		"-smp", fmt.Sprintf("%d,maxcpus=%d", cfg.VCPUs, cfg.MaxVCPUs),
		"-m", fmt.Sprintf("size=%dM,slots=%d,maxmem=%dM", cfg.MemoryMiB, memorySlots, cfg.MaxMemoryMiB),
	}
	a = append(a, ram...)
	switch c.accel {
	case "kvm":
		if len(c.vm.TCGPlugins) > 0 {
			return nil, fmt.Errorf("TCG plugins %q with KVM: %w", c.vm.TCGPlugins, errdefs.ErrInvalidArgument)
		}
		a = append(a, "-accel", "kvm", "-cpu", accel.CPUModel(accel.KVM))
	case "tcg":
		tcg := "tcg"
		if c.qemu.TCGTranslationCacheMiB > 0 {
			tcg += ",tb-size=" + strconv.Itoa(c.qemu.TCGTranslationCacheMiB)
		}
		a = append(a, "-accel", tcg, "-cpu", accel.CPUModel(accel.TCG))
		for _, p := range c.vm.TCGPlugins {
			a = append(a, "-plugin", p)
		}
	default:
		return nil, fmt.Errorf("accelerator %q: want kvm or tcg: %w", c.accel, errdefs.ErrInvalidArgument)
	}
	return a, nil
}

// kernelArgs are the guest kernel, its parameters and the initramfs.
func (c cmdline) kernelArgs() []string {
	params := baseKernelParams
	if c.tscKHz > 0 {
		params += " tsc_early_khz=" + strconv.FormatUint(c.tscKHz, 10)
	}
	if len(c.vm.KernelParams) > 0 {
		params += " " + strings.Join(c.vm.KernelParams, " ")
	}
	a := []string{"-kernel", c.vm.Kernel, "-append", params}
	if c.vm.Initramfs != "" {
		a = append(a, "-initrd", c.vm.Initramfs)
	}
	return a
}

// consoleArgs are the guest's serial console, into the console pipe, and the QMP socket.
func (c cmdline) consoleArgs() []string {
	var a []string
	// QEMU opens the pipe again through /dev/fd: a file chardev takes a path. A jailed
	// QEMU may not (the pipe is the shim's, mode 0600): it takes it from an fd set.
	// append=on: QEMU truncates the file it opens otherwise, and ftruncate of the pipe
	// it dups from the set fails.
	console := fmt.Sprintf("/dev/fd/%d", c.consoleFD)
	if c.jailed {
		a = append(a, "-add-fd", fmt.Sprintf("fd=%d,set=%d", c.consoleFD, c.consoleFD))
		console = fmt.Sprintf("/dev/fdset/%d,append=on", c.consoleFD)
	}
	return append(a,
		"-chardev", "file,id=console,path="+console,
		"-serial", "chardev:console",
		"-chardev", "socket,id=qmp,server=on,wait=off,path="+optValue(c.qmpSocket),
		"-mon", "chardev=qmp,mode=control",
	)
}

// agentArgs are the agent's channel: a virtio-serial port or a vsock device.
func (c cmdline) agentArgs() []string {
	agentAddr := fmt.Sprintf("%02x.0", agentSlot)
	switch c.vm.Agent.Transport {
	case vmm.TransportSerial:
		return []string{
			"-device", "virtio-serial-pci,id=agent-serial,bus=pcie.0,addr=" + agentAddr,
			"-chardev", "socket,id=agent,server=on,wait=off,path=" + optValue(c.agentSock),
			"-device", "virtserialport,bus=agent-serial.0,chardev=agent,name=" + vmm.AgentPortName,
		}
	case vmm.TransportVsock:
		return []string{"-device", fmt.Sprintf("vhost-vsock-pci,id=agent-vsock,bus=pcie.0,addr=%s,guest-cid=%d", agentAddr, c.vm.Agent.CID)}
	}
	return nil
}

// deviceArgs are the balloon, the NICs, the template's restore, and the root ports and
// bridges disks plug into.
func (c cmdline) deviceArgs() ([]string, error) {
	var a []string
	// Not in a template's VMs, the one that makes it or those restored from it: QEMU 7.2
	// discards a reported page of file-backed RAM by punching it out of the file, even
	// where the VM maps it privately, so a restored VM would zero pages of the template's
	// memory file that every later VM of the template loads (they came up without the
	// devices hot-plugged into them). The template's VMs share its unchanged pages anyway.
	if c.qemu.FreePageReporting && c.vm.Template == nil {
		a = append(a, "-device", fmt.Sprintf("virtio-balloon-pci,id=balloon,bus=pcie.0,addr=%02x.0,free-page-reporting=on", balloonSlot))
	}
	nics, err := nicArgs(c.vm.NICs, c.restoreFD != 0)
	if err != nil {
		return nil, err
	}
	a = append(a, nics...)
	if c.vm.Template != nil {
		a = append(a, templateArgs(c.vm, c.restoreFD)...)
	}
	for i := range c.ports {
		a = append(a, "-device", jsonArg(port(i).device()))
	}
	for i := range c.bridges {
		a = append(a, "-device", jsonArg(bridge(i).device()))
	}
	return a, nil
}

// diskArgs are the disks on the command line, each behind its root port.
func (c cmdline) diskArgs() []string {
	var a []string
	for _, d := range c.disks {
		be, dev, _ := diskDevices(d.disk, d.n, d.port.place(), d.size)
		if d.fd != 0 {
			if d.disk.Kind == vmm.Block {
				a = append(a, "-add-fd", fmt.Sprintf("fd=%d,set=%d", d.fd, d.fd))
			}
			be.openedAs(jailedPath(d.disk, d.fd, d.fd))
		}
		a = append(a, be.option, jsonArg(be.args), "-device", jsonArg(dev))
	}
	return a
}
