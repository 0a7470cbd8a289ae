package qemu

import (
	"encoding/json"
	"slices"
	"strings"
	"testing"

	"github.com/containerd/errdefs"

	"github.com/caisson-containers/caisson/shim/vmm"
)

// option returns the values of every occurrence of flag in args.
func option(args []string, flag string) []string {
	var vals []string
	for i := 0; i+1 < len(args); i++ {
		if args[i] == flag {
			vals = append(vals, args[i+1])
		}
	}
	return vals
}

func TestCmdline(t *testing.T) {
	base := vmm.Config{
		Kernel: "/k", StateDir: "/s", ConsoleLog: "/s/console.log",
		VCPUs: 2, MaxVCPUs: 4, MemoryMiB: 512, MaxMemoryMiB: 4096,
		Agent: vmm.AgentChannel{Transport: vmm.TransportSerial},
	}
	for _, tc := range []struct {
		name   string
		change func(*cmdline)
		want   map[string][]string // flag -> values that must all be present
		absent []string            // flags that must not appear
		// notWant: flag -> a substring none of its values may hold
		notWant map[string]string
		err     func(error) bool
	}{
		{
			name: "serial agent, tcg",
			want: map[string][]string{
				"-M":      {"q35"},
				"-accel":  {"tcg"},
				"-cpu":    {"qemu64,+rdrand"},
				"-smp":    {"2,maxcpus=4"},
				"-m":      {"size=512M,slots=4,maxmem=4096M"},
				"-kernel": {"/k"},
				"-append": {"console=ttyS0 panic=-1 swiotlb=noforce pcie_ports=compat cryptomgr.notests i8042.direct=1 i8042.dumbkbd=1 i8042.nopnp=1 i8042.noaux=1" +
					" tsc=reliable nowatchdog nmi_watchdog=0 sysctl.vm.compaction_proactiveness=0 sysctl.vm.stat_interval=10 memhp_default_state=online quiet"},
				"-sandbox": {"on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"},
				"-chardev": {
					"file,id=console,path=/dev/fd/7",
					"socket,id=qmp,server=on,wait=off,path=/s/qmp.sock",
					"socket,id=agent,server=on,wait=off,path=/s/agent.sock",
				},
				"-device": {
					"virtio-serial-pci,id=agent-serial,bus=pcie.0,addr=02.0",
					"virtserialport,bus=agent-serial.0,chardev=agent,name=org.caisson.agent.0",
				},
			},
			absent: []string{"-initrd"},
		},
		{
			name: "vsock agent, kvm, initramfs",
			change: func(c *cmdline) {
				c.accel = "kvm"
				c.vm.Initramfs = "/i"
				c.vm.Agent = vmm.AgentChannel{Transport: vmm.TransportVsock, CID: 42}
			},
			want: map[string][]string{
				"-accel":  {"kvm"},
				"-cpu":    {"host"},
				"-initrd": {"/i"},
				"-device": {"vhost-vsock-pci,id=agent-vsock,bus=pcie.0,addr=02.0,guest-cid=42"},
			},
		},
		{
			name:   "tcg translation cache",
			change: func(c *cmdline) { c.qemu.TCGTranslationCacheMiB = 64 },
			want:   map[string][]string{"-accel": {"tcg,tb-size=64"}},
		},
		{
			name:   "the host's TSC frequency for a guest under tcg",
			change: func(c *cmdline) { c.tscKHz = 2095984 },
			want: map[string][]string{"-append": {"console=ttyS0 panic=-1 swiotlb=noforce pcie_ports=compat cryptomgr.notests i8042.direct=1 i8042.dumbkbd=1 i8042.nopnp=1 i8042.noaux=1" +
				" tsc=reliable nowatchdog nmi_watchdog=0 sysctl.vm.compaction_proactiveness=0 sysctl.vm.stat_interval=10 memhp_default_state=online tsc_early_khz=2095984 quiet"}},
		},
		{
			name:   "free page reporting",
			change: func(c *cmdline) { c.qemu.FreePageReporting = true },
			want:   map[string][]string{"-device": {"virtio-balloon-pci,id=balloon,bus=pcie.0,addr=03.0,free-page-reporting=on"}},
		},
		{
			// QEMU 7.2 would punch reported pages out of the template's memory file.
			name: "no free page reporting in a template's VMs",
			change: func(c *cmdline) {
				c.qemu.FreePageReporting = true
				c.vm.Template = &vmm.Template{Dir: "/t", Restore: true}
				c.restoreFD = 9
			},
			notWant: map[string]string{"-device": "virtio-balloon-pci"},
		},
		{
			name: "no free page reporting in the VM that makes a template",
			change: func(c *cmdline) {
				c.qemu.FreePageReporting = true
				c.vm.Template = &vmm.Template{Dir: "/t"}
			},
			notWant: map[string]string{"-device": "virtio-balloon-pci"},
		},
		{
			name:   "tcg plugin",
			change: func(c *cmdline) { c.vm.TCGPlugins = []string{"/p/tcgprof.so,ctl=/s/ctl"} },
			want:   map[string][]string{"-accel": {"tcg"}, "-plugin": {"/p/tcgprof.so,ctl=/s/ctl"}},
		},
		{
			name: "no tcg plugin with kvm",
			change: func(c *cmdline) {
				c.accel = "kvm"
				c.vm.TCGPlugins = []string{"/p/tcgprof.so"}
			},
			err: errdefs.IsInvalidArgument,
		},
		{
			name:   "unknown accelerator",
			change: func(c *cmdline) { c.accel = "hvf" },
			err:    errdefs.IsInvalidArgument,
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := cmdline{vm: base, accel: "tcg", qmpSocket: "/s/qmp.sock", agentSock: "/s/agent.sock", consoleFD: 7}
			c.vm.KernelParams = []string{"quiet"}
			if tc.change != nil {
				tc.change(&c)
			}
			args, err := c.args()
			if tc.err != nil {
				if !tc.err(err) {
					t.Fatalf("got %v", err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			for flag, vals := range tc.want {
				got := option(args, flag)
				for _, v := range vals {
					if !slices.Contains(got, v) {
						t.Errorf("%s %q missing; have %q", flag, v, got)
					}
				}
			}
			for _, flag := range tc.absent {
				if slices.Contains(args, flag) {
					t.Errorf("unexpected %s in %q", flag, args)
				}
			}
			for flag, sub := range tc.notWant {
				for _, v := range option(args, flag) {
					if strings.Contains(v, sub) {
						t.Errorf("unexpected %s %q", flag, v)
					}
				}
			}
			for _, flag := range []string{"-nodefaults", "-no-user-config", "-nographic", "-no-reboot"} {
				if !slices.Contains(args, flag) {
					t.Errorf("%s missing", flag)
				}
			}
		})
	}
}

// Disks get a root port each; their backends and devices are JSON with read-only set.
func TestCmdlineDisks(t *testing.T) {
	c := cmdline{
		vm:        vmm.Config{Kernel: "/k", VCPUs: 1, MemoryMiB: 512, MaxMemoryMiB: 1024, ConsoleLog: "/c", Agent: vmm.AgentChannel{Transport: vmm.TransportSerial}},
		accel:     "tcg",
		qmpSocket: "/q", agentSock: "/a",
		ports: 10, bridges: 2,
		disks: []coldDisk{
			{disk: vmm.Disk{ID: "a", Path: "/l,1.erofs", ReadOnly: true, Kind: vmm.Block}, n: 0, port: 0},
			{disk: vmm.Disk{ID: "b", Path: "/l2.erofs", ReadOnly: true, Kind: vmm.PMEM}, n: 1, port: 9, size: 4 << 20},
			{disk: vmm.Disk{ID: "c", Path: "/rw.ext4", Kind: vmm.Block}, n: 2, port: 2},
		},
	}
	args, err := c.args()
	if err != nil {
		t.Fatal(err)
	}
	decode := func(s string) map[string]any {
		var m map[string]any
		if err := json.Unmarshal([]byte(s), &m); err != nil {
			t.Fatalf("%s: %v", s, err)
		}
		return m
	}
	var ports, bridges, devices []map[string]any
	for _, d := range option(args, "-device") {
		if !strings.HasPrefix(d, "{") {
			continue
		}
		m := decode(d)
		switch m["driver"] {
		case "pcie-root-port":
			ports = append(ports, m)
		case "pci-bridge":
			bridges = append(bridges, m)
		default:
			devices = append(devices, m)
		}
	}
	if len(ports) != 10 {
		t.Fatalf("%d root ports, want 10", len(ports))
	}
	if p := ports[9]; p["addr"] != "09.1" || p["id"] != "rp9" || p["multifunction"] != nil {
		t.Errorf("port 9: %v", p)
	}
	if p := ports[8]; p["addr"] != "09.0" || p["multifunction"] != true {
		t.Errorf("port 8: %v", p)
	}

	if len(bridges) != 2 {
		t.Fatalf("%d bridges, want 2", len(bridges))
	}
	if b := bridges[1]; b["addr"] != "1d.0" || b["id"] != "br1" || b["bus"] != "pcie.0" || b["shpc"] != false {
		t.Errorf("bridge 1: %v", b)
	}

	blockdevs := option(args, "-blockdev")
	if len(blockdevs) != 2 {
		t.Fatalf("blockdevs %q", blockdevs)
	}
	a := decode(blockdevs[0])
	if a["read-only"] != true || a["file"].(map[string]any)["filename"] != "/l,1.erofs" || a["file"].(map[string]any)["read-only"] != true {
		t.Errorf("blockdev a: %v", a)
	}
	if c := decode(blockdevs[1]); c["read-only"] != false || c["discard"] != "unmap" {
		t.Errorf("blockdev c: %v", c)
	}
	objs := option(args, "-object")
	if len(objs) != 1 {
		t.Fatalf("objects %q", objs)
	}
	if b := decode(objs[0]); b["qom-type"] != "memory-backend-file" || b["readonly"] != true || b["share"] != true || b["size"] != float64(4<<20) {
		t.Errorf("object b: %v", b)
	}
	want := []map[string]any{
		{"driver": "virtio-blk-pci", "id": "blk0", "drive": "blk0-node", "bus": "rp0", "serial": "blk0", "werror": "report", "rerror": "report"},
		{"driver": "virtio-pmem-pci", "id": "pmem1", "memdev": "pmem1-mem", "bus": "rp9"},
		{"driver": "virtio-blk-pci", "id": "blk2", "drive": "blk2-node", "bus": "rp2", "serial": "blk2", "werror": "report", "rerror": "report"},
	}
	if len(devices) != len(want) {
		t.Fatalf("devices %v", devices)
	}
	for i, w := range want {
		for k, v := range w {
			if devices[i][k] != v {
				t.Errorf("device %d: %s=%v, want %v", i, k, devices[i][k], v)
			}
		}
	}
	if got := port(9).pciPath(); got != "09.1/00.0" {
		t.Errorf("pci path of port 9: %s", got)
	}
}

// Hot-plug slots fill bridge after bridge, slots 01-1e of each; a device in one is
// modern-only virtio (a bridge has no I/O window).
func TestHotSlots(t *testing.T) {
	for _, tc := range []struct {
		i          int
		bus, addr  string
		path       vmm.PCIPath
		numBridges int
	}{
		{0, "br0", "01.0", "1c.0/01.0", 1},
		{29, "br0", "1e.0", "1c.0/1e.0", 1},
		{30, "br1", "01.0", "1d.0/01.0", 2},
		{MaxHotplugSlots - 1, "br2", "1e.0", "1e.0/1e.0", 3},
	} {
		s := hotSlot(tc.i)
		if s.bus != tc.bus || s.addr != tc.addr || s.pciPath != tc.path {
			t.Errorf("slot %d: %+v, want bus %s addr %s path %s", tc.i, s, tc.bus, tc.addr, tc.path)
		}
		if n := bridgesFor(tc.i + 1); n != tc.numBridges {
			t.Errorf("%d slots: %d bridges, want %d", tc.i+1, n, tc.numBridges)
		}
		_, dev, addr := diskDevices(vmm.Disk{ID: "x", Path: "/x", Kind: vmm.Block}, 7, s, 0)
		if dev["bus"] != tc.bus || dev["addr"] != tc.addr || dev["disable-legacy"] != "on" || addr.PCIPath != tc.path {
			t.Errorf("slot %d: device %v at %s", tc.i, dev, addr.PCIPath)
		}
	}
	if bridgesFor(0) != 0 {
		t.Error("no slots need a bridge")
	}
}

// A jailed QEMU opens none of the shim's paths: a Block disk comes from an fd set, a PMEM
// disk through /proc/self/fd, the console from an fd set (appended to, never truncated),
// and the virtio-fs daemon as a connected descriptor.
func TestCmdlineJailed(t *testing.T) {
	c := cmdline{
		vm: vmm.Config{Kernel: "/k", VCPUs: 1, MemoryMiB: 512, MaxMemoryMiB: 1024, Agent: vmm.AgentChannel{Transport: vmm.TransportSerial},
			SharedFS: &vmm.SharedFS{Socket: "/s/fs.sock", Tag: "shared"}},
		accel: "tcg", qmpSocket: "/q", agentSock: "/a", ports: 2,
		disks: []coldDisk{
			{disk: vmm.Disk{ID: "a", Path: "/l.erofs", ReadOnly: true, Kind: vmm.Block}, n: 0, port: 0, fd: 5},
			{disk: vmm.Disk{ID: "b", Path: "/p.erofs", ReadOnly: true, Kind: vmm.PMEM}, n: 1, port: 1, size: 2 << 20, fd: 6},
		},
		sharedFSFD: 4, consoleFD: 7, jailed: true,
	}
	args, err := c.args()
	if err != nil {
		t.Fatal(err)
	}
	all := strings.Join(args, " ")
	for _, want := range []string{
		"-add-fd fd=7,set=7", "file,id=console,path=/dev/fdset/7,append=on",
		"-add-fd fd=5,set=5", `"filename":"/dev/fdset/5"`, `"driver":"file"`,
		`"mem-path":"/proc/self/fd/6"`, "socket,id=sharedfs,fd=4",
	} {
		if !strings.Contains(all, want) {
			t.Errorf("jailed command line lacks %q:\n%s", want, all)
		}
	}
	for _, path := range []string{"/l.erofs", "/p.erofs", "/s/fs.sock", "/dev/fd/"} {
		if strings.Contains(all, path) {
			t.Errorf("jailed command line names %s", path)
		}
	}
	if n := strings.Count(all, "-add-fd"); n != 2 {
		t.Errorf("%d -add-fd options, want 2 (the console and the Block disk)", n)
	}
}
