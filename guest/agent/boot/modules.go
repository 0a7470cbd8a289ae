package boot

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/containerd/log"
	"golang.org/x/sys/unix"

	"github.com/caisson-containers/caisson/guest/agent/modprobe"
	"github.com/caisson-containers/caisson/guest/initramfs/moddep"
)

// ModulesDir is where the initramfs keeps the modules of the running kernel.
func ModulesDir() (string, error) {
	var u unix.Utsname
	if err := unix.Uname(&u); err != nil {
		return "", err
	}
	return filepath.Join("/lib/modules", unix.ByteSliceToString(u.Release[:])), nil
}

// Modules is the loading of the guest's kernel modules.
type Modules struct {
	dir  string
	rest []string
	n    int
}

// LoadModules loads the modules the initramfs carries, as its dir/modules.dep lists them
// (only those, dependencies first, as the image builder writes it). It returns once now
// and their dependencies are loaded (what the agent needs to talk to the shim); LoadRest
// loads every other module that no module needs (the image's list), with its
// dependencies, except those in skip (another transport's channel) and the drivers of
// devices the VM does not have (bootOnlyDevices). A module of now or skip the image does
// not have is built into the kernel. A module that is loaded already is not an error.
func LoadModules(ctx context.Context, dir string, now, skip []string) (*Modules, error) {
	dep, err := readGraph(dir)
	if err != nil {
		return nil, err
	}
	first, _, err := plan(dep, now, skip)
	if err != nil {
		return nil, err
	}
	m := &Modules{dir: dir}
	if err := m.load(ctx, dir, first); err != nil {
		return nil, err
	}
	// With the channel's PCI driver loaded, the virtio devices the VM booted with are
	// on the virtio bus: drivers of devices it does not have are left out.
	absent, err := absentDeviceModules(virtioDevicesDir)
	if err != nil {
		return nil, err
	}
	if _, m.rest, err = plan(dep, now, append(slices.Clip(skip), absent...)); err != nil {
		return nil, err
	}
	return m, nil
}

// bootOnlyDevices are the modules whose only use is driving a kind of virtio device that
// a VM has from its start (on QEMU's command line) or never: the shim hot-plugs disks
// and NICs, never these. The agent loads one only if its device is there: under TCG,
// virtiofs with fuse took about 50 ms of the background set-up that sandbox creation
// waits for, and virtio_rng 17 ms, in VMs without those devices. Values are virtio
// device IDs (include/uapi/linux/virtio_ids.h).
var bootOnlyDevices = map[string]uint32{
	"virtio_rng":     4,  // VIRTIO_ID_RNG: no VM has one today
	"virtio_balloon": 5,  // VIRTIO_ID_BALLOON: with hypervisor.free_page_reporting
	"virtiofs":       26, // VIRTIO_ID_FS: with a shared file system
}

// virtioDevicesDir lists the guest's virtio devices.
const virtioDevicesDir = "/sys/bus/virtio/devices"

// absentDeviceModules are the modules of bootOnlyDevices whose device is not among the
// virtio devices in dir (each a directory whose "device" file holds the device ID, as
// "0x001a"). No dir is no virtio device.
func absentDeviceModules(dir string) ([]string, error) {
	entries, err := os.ReadDir(dir)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("virtio devices: %w", err)
	}
	present := map[uint32]bool{}
	for _, e := range entries {
		b, err := os.ReadFile(filepath.Join(dir, e.Name(), "device"))
		if err != nil {
			return nil, fmt.Errorf("virtio device %s: %w", e.Name(), err)
		}
		id, err := strconv.ParseUint(strings.TrimSpace(string(b)), 0, 32)
		if err != nil {
			return nil, fmt.Errorf("virtio device %s: id %q: %w", e.Name(), b, err)
		}
		present[uint32(id)] = true
	}
	var absent []string
	for mod, id := range bootOnlyDevices {
		if !present[id] {
			absent = append(absent, mod)
		}
	}
	slices.Sort(absent)
	return absent, nil
}

// LoadRest loads the modules LoadModules left.
func (m *Modules) LoadRest(ctx context.Context) error {
	if err := m.load(ctx, m.dir, m.rest); err != nil {
		return fmt.Errorf("kernel modules: %w", err)
	}
	return nil
}

func (m *Modules) load(ctx context.Context, dir string, paths []string) error {
	debug := log.GetLevel() >= log.DebugLevel
	var took []string
	for _, p := range paths {
		start := time.Now()
		if err := loadModule(filepath.Join(dir, p)); err != nil {
			return err
		}
		m.n++
		if debug {
			took = append(took, fmt.Sprintf("%s=%d", moddep.Name(p), time.Since(start).Milliseconds()))
		}
	}
	if debug {
		log.G(ctx).WithFields(log.Fields{"count": len(paths), "uptime": Uptime(), "ms": strings.Join(took, " ")}).Debug("kernel modules loaded")
	}
	return nil
}

// plan returns the modules to load before the agent serves (now, with their dependencies)
// and after (every root of the graph but now and skip, with their dependencies), both in
// load order.
func plan(dep *moddep.Graph, now, skip []string) (first, rest []string, err error) {
	first, err = dep.Closure(slices.DeleteFunc(slices.Clone(now), func(n string) bool { return !dep.Has(n) }))
	if err != nil {
		return nil, nil, err
	}
	roots := slices.DeleteFunc(dep.Roots(), func(n string) bool { return slices.Contains(now, n) || slices.Contains(skip, n) })
	rest, err = dep.Closure(roots)
	if err != nil {
		return nil, nil, err
	}
	rest = slices.DeleteFunc(rest, func(p string) bool { return slices.Contains(first, p) })
	return first, rest, nil
}

// readGraph reads the image's modules.dep; without one (a kernel with everything built
// in) the graph is empty.
func readGraph(dir string) (*moddep.Graph, error) {
	f, err := os.Open(filepath.Join(dir, moddep.FileName))
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return moddep.Parse(strings.NewReader(""))
		}
		return nil, err
	}
	defer f.Close()
	return moddep.Parse(f)
}

func loadModule(path string) error { return modprobe.Insmod(path, "") }
