// Package template keeps the VM templates pod VMs start from (hypervisor.template): one
// per VM shape, made on first use by whichever shim needs it first and shared by every
// shim after it.
//
// A template is a directory under the root holding the guest's memory file and the saved
// device state (vmm.TemplateMemory, vmm.TemplateState), and shape.json, what it was made
// from. Its name is a hash of the shape and of the identity (inode, size, mtime) of the
// kernel, initramfs and VMM binary (vmm.Hypervisor's Identity) and of the template's own
// storages (Storage: the kernel modules image), so that a rebuilt guest image gets a new
// template.
// A template whose files changed is removed by the next Get that sees it (and all of them
// by RemoveAll: `caisson template remove`); VMs still running from one keep their mapping
// of the removed memory file.
package template

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/containerd/errdefs"
	"github.com/containerd/errdefs/pkg/errgrpc"
	"github.com/containerd/log"
	"golang.org/x/sys/unix"

	agent "github.com/caisson-containers/caisson/api/agent/v1"
	"github.com/caisson-containers/caisson/shim/vmboot"
	"github.com/caisson-containers/caisson/shim/vmm"
)

// format changes when what a template holds or how it is made does (2: the VMM's
// identity from vmm.Hypervisor; 3: room for hot-plugged vCPUs and memory, which the
// guest onlines, so that pods of every size start from the runtime configuration's
// base size and grow; 4: the guest's TSC frequency is given under TCG, not calibrated,
// so a template saved with a clock that runs at a wrong rate is made again).
const format = 4

// readyTimeout bounds the template VM's boot to its agent answering with its drivers loaded.
const readyTimeout = 2 * time.Minute

// shape is what a template and the VMs made from it share. Its JSON is the template's
// shape.json and, hashed, its name.
type shape struct {
	Format    int  `json:"format"`
	Kernel    file `json:"kernel"`
	Initramfs file `json:"initramfs"`
	// VMM, VMMBinary and VMMSettings are the hypervisor's identity (vmm.Identity).
	VMM          string            `json:"vmm"`
	VMMBinary    file              `json:"vmm_binary"`
	VMMSettings  map[string]string `json:"vmm_settings,omitempty"`
	KernelParams []string          `json:"kernel_params"`
	// VCPUs and MemoryMiB are the size the VMs start at (the runtime configuration's,
	// before a pod's additions); MaxVCPUs and MaxMemoryMiB how far they can grow.
	VCPUs        int    `json:"vcpus"`
	MaxVCPUs     int    `json:"max_vcpus"`
	MemoryMiB    int    `json:"memory_mib"`
	MaxMemoryMiB int    `json:"max_memory_mib"`
	HotplugSlots int    `json:"hotplug_slots"`
	Accelerator  string `json:"accelerator"`
	// Storages are the template's own disks, mounted in its guest.
	Storages []storageShape `json:"storages,omitempty"`
}

// storageShape is a Storage as the template's shape has it.
type storageShape struct {
	ID     string `json:"id"`
	FSType string `json:"fstype"`
	File   file   `json:"file"`
}

// Storage is a read-only file system image that the template VM boots with (a
// virtio-blk disk) and has its agent mount, as storage Disk.ID, before it is saved:
// every VM started from the template has it mounted from the start (the caller gives
// those VMs the same disks: vmm.Template's Disks), nothing to attach or mount.
type Storage struct {
	Disk   vmm.Disk // ReadOnly, vmm.Block
	FSType string
	// Optional: if the agent refuses the mount (say, the kernel modules image of another
	// kernel), the template is made all the same, with the disk attached and not
	// mounted, and a warning; else the make fails.
	Optional bool
}

// file is a file's path and identity.
type file struct {
	Path  string `json:"path"`
	Inode uint64 `json:"inode"`
	Size  int64  `json:"size"`
	Mtime int64  `json:"mtime_ns"`
}

func identify(path string) (file, error) {
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		return file{}, fmt.Errorf("template: %s: %w", path, err)
	}
	return file{Path: path, Inode: st.Ino, Size: st.Size, Mtime: st.Mtim.Nano()}, nil
}

// Get returns the directory of the template for VMs like cfg on hv (no disks, no NICs,
// serial agent channel) with storages mounted, making it first if there is none: a VM is
// booted with cfg and the storages' disks, saved once its agent answers with its drivers
// loaded and has mounted the storages, and stopped. Concurrent Gets of one shape, in any
// process, make it once. The caller starts its VM on hv with vmm.Template{Dir: dir,
// Restore: true, Disks: the storages' disks, in order} and otherwise the same cfg.
func Get(ctx context.Context, root string, hv vmm.Hypervisor, cfg vmm.Config, storages ...Storage) (string, error) {
	if len(cfg.Disks) > 0 || len(cfg.NICs) > 0 || cfg.Template != nil {
		return "", fmt.Errorf("template of a VM with disks, NICs or a template: %w", errdefs.ErrInvalidArgument)
	}
	if cfg.Agent.Transport != "" && cfg.Agent.Transport != vmm.TransportSerial {
		return "", fmt.Errorf("templates need the serial agent channel: %w", errdefs.ErrNotImplemented)
	}
	for _, st := range storages {
		if st.Disk.ID == "" || st.FSType == "" || !st.Disk.ReadOnly || st.Disk.Kind != vmm.Block {
			return "", fmt.Errorf("template storage %q (%s): a read-only block disk with an id and a file system type: %w",
				st.Disk.ID, st.Disk.Path, errdefs.ErrInvalidArgument)
		}
	}
	sh, err := shapeOf(hv, cfg, storages)
	if err != nil {
		return "", err
	}
	b, name, err := sh.key()
	if err != nil {
		return "", err
	}
	dir := filepath.Join(root, name)
	if Ready(dir) {
		return dir, nil
	}
	if err := os.MkdirAll(root, 0o700); err != nil {
		return "", err
	}
	lock, err := os.OpenFile(filepath.Join(root, name+".lock"), os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		return "", err
	}
	defer lock.Close()
	if err := flock(ctx, lock); err != nil {
		return "", err
	}
	if Ready(dir) { // made while we waited
		return dir, nil
	}
	removeStale(ctx, root, name, sh)
	start := time.Now()
	if err := build(ctx, hv, dir, b, cfg, storages); err != nil {
		return "", fmt.Errorf("make VM template: %w", err)
	}
	log.G(ctx).WithField("template", dir).WithField("took", time.Since(start)).Info("VM template made")
	return dir, nil
}

// Key names the shape of VMs like cfg on hv with storages (the VMM and its settings,
// the guest's files, its kernel parameters and sizes): the name of their template's
// directory under a root, made or not. VMs of one key run the same guest the same way,
// whatever their state directories, disks and NICs, which Key ignores: warm VMs that
// boot are matched to the pods that may take them by it (shim/pod).
func Key(hv vmm.Hypervisor, cfg vmm.Config, storages ...Storage) (string, error) {
	sh, err := shapeOf(hv, cfg, storages)
	if err != nil {
		return "", err
	}
	_, name, err := sh.key()
	return name, err
}

// key is the shape as it is saved, and the name of its template's directory: the start
// of the hash of that.
func (sh shape) key() ([]byte, string, error) {
	b, err := json.Marshal(sh)
	if err != nil {
		return nil, "", err
	}
	sum := sha256.Sum256(b)
	return b, hex.EncodeToString(sum[:8]), nil
}

// Ready says whether dir holds a template that is made (and not removed since).
func Ready(dir string) bool {
	_, err := os.Stat(filepath.Join(dir, vmm.TemplateState))
	return err == nil
}

func shapeOf(hv vmm.Hypervisor, cfg vmm.Config, storages []Storage) (shape, error) {
	sh := shape{Format: format, KernelParams: cfg.KernelParams, VCPUs: cfg.VCPUs, MaxVCPUs: cfg.MaxVCPUs, MemoryMiB: cfg.MemoryMiB,
		MaxMemoryMiB: cfg.MaxMemoryMiB, HotplugSlots: cfg.HotplugSlots, Accelerator: cfg.Accelerator}
	id, err := hv.Identity()
	if err != nil {
		return shape{}, err
	}
	sh.VMM, sh.VMMSettings = id.VMM, id.Settings
	if sh.VMMBinary, err = identify(id.Binary); err != nil {
		return shape{}, err
	}
	if sh.Kernel, err = identify(cfg.Kernel); err != nil {
		return shape{}, err
	}
	if cfg.Initramfs != "" {
		if sh.Initramfs, err = identify(cfg.Initramfs); err != nil {
			return shape{}, err
		}
	}
	for _, st := range storages {
		f, err := identify(st.Disk.Path)
		if err != nil {
			return shape{}, err
		}
		sh.Storages = append(sh.Storages, storageShape{ID: st.Disk.ID, FSType: st.FSType, File: f})
	}
	return sh, nil
}

// flock takes an exclusive lock on f, giving up when ctx ends.
func flock(ctx context.Context, f *os.File) error {
	for delay := 5 * time.Millisecond; ; delay = min(2*delay, 100*time.Millisecond) {
		err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB)
		if err == nil {
			return nil
		}
		if !errors.Is(err, unix.EWOULDBLOCK) {
			return fmt.Errorf("lock %s: %w", f.Name(), err)
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("waiting for another shim to make the VM template: %w", ctx.Err())
		case <-time.After(delay):
		}
	}
}

// removeStale removes the templates in root made from the same kernel, initramfs or
// VMM binary paths as sh when those files have changed since, and the leftovers of makes that
// died (their lock is free: we hold ours, theirs we try).
func removeStale(ctx context.Context, root, keep string, sh shape) {
	entries, err := os.ReadDir(root)
	if err != nil {
		return
	}
	for _, e := range entries {
		name := e.Name()
		switch {
		case strings.HasSuffix(name, ".tmp"):
			if strings.TrimSuffix(name, ".tmp") == keep {
				os.RemoveAll(filepath.Join(root, name)) // ours, from a make that died
			}
			continue
		case !e.IsDir() || name == keep:
			continue
		}
		b, err := os.ReadFile(filepath.Join(root, name, "shape.json"))
		if err != nil {
			continue
		}
		var old shape
		if json.Unmarshal(b, &old) != nil {
			continue
		}
		if changed(old.Kernel, sh.Kernel) || changed(old.Initramfs, sh.Initramfs) || changed(old.VMMBinary, sh.VMMBinary) ||
			storageChanged(old.Storages, sh.Storages) || old.Format != sh.Format {
			log.G(ctx).WithField("template", filepath.Join(root, name)).Info("removing a VM template whose guest image or VMM changed")
			os.RemoveAll(filepath.Join(root, name)) // not its lock file: see RemoveAll
		}
	}
}

func changed(old, cur file) bool { return old.Path == cur.Path && old != cur }

// storageChanged says whether a file of old's storages is one of cur's, changed since.
func storageChanged(old, cur []storageShape) bool {
	for _, o := range old {
		for _, c := range cur {
			if changed(o.File, c.File) {
				return true
			}
		}
	}
	return false
}

// build boots the template VM in dir.tmp, saves it, and renames dir.tmp to dir.
func build(ctx context.Context, hv vmm.Hypervisor, dir string, shapeJSON []byte, cfg vmm.Config, storages []Storage) (retErr error) {
	tmp := dir + ".tmp"
	os.RemoveAll(tmp)
	if err := os.MkdirAll(tmp, 0o700); err != nil {
		return err
	}
	defer func() {
		if retErr != nil {
			os.RemoveAll(tmp)
		}
	}()
	cfg.Template = &vmm.Template{Dir: tmp}
	for _, st := range storages {
		cfg.Template.Disks = append(cfg.Template.Disks, st.Disk)
	}
	cfg.StateDir = filepath.Join(tmp, "vm")
	cfg.ConsoleLog = filepath.Join(tmp, "console.log")
	ctx, cancel := context.WithTimeout(ctx, readyTimeout)
	defer cancel()
	// Saved once the agent answers with its background start (drivers, cgroup
	// controllers) over.
	g, err := vmboot.Boot(ctx, hv, cfg, vmboot.Options{Timeout: readyTimeout, DevicesReady: true})
	if err != nil {
		return fmt.Errorf("template VM: %w", err)
	}
	defer g.VM.Stop(context.WithoutCancel(ctx))
	if err := mountStorages(ctx, g, storages); err != nil {
		g.Close()
		return err
	}
	// VMs made from the template connect afresh.
	if err := g.Close(); err != nil {
		log.G(ctx).WithError(err).Debug("hanging up on the template VM's agent")
	}
	if err := g.VM.SaveTemplate(ctx); err != nil {
		return err
	}
	if err := g.VM.Stop(ctx); err != nil {
		return err
	}
	for _, f := range []string{"vm", "console.log"} {
		os.RemoveAll(filepath.Join(tmp, f))
	}
	if err := os.WriteFile(filepath.Join(tmp, "shape.json"), shapeJSON, 0o600); err != nil {
		return err
	}
	return os.Rename(tmp, dir)
}

// mountStorages has the template VM's agent mount storages, attached to g's VM.
func mountStorages(ctx context.Context, g *vmboot.Guest, storages []Storage) error {
	sc := agent.NewStorageClient(g.Client)
	for _, st := range storages {
		addr, err := g.VM.Address(st.Disk.ID)
		if err != nil {
			return fmt.Errorf("template storage %q: %w", st.Disk.ID, err)
		}
		dev := &agent.Device{Kind: agent.DeviceKind_DEVICE_KIND_BLOCK, PciPath: string(addr.PCIPath)}
		if dev.PciPath == "" {
			dev.Serial = addr.Serial
		}
		_, err = sc.Mount(ctx, &agent.MountStorageRequest{
			StorageId: st.Disk.ID, Device: dev, Fstype: st.FSType, Options: []string{"ro"},
		})
		if err != nil {
			err = fmt.Errorf("mount template storage %q (%s) in the template VM: %w", st.Disk.ID, st.Disk.Path, errgrpc.ToNative(err))
			if !st.Optional || ctx.Err() != nil {
				return err
			}
			log.G(ctx).WithError(err).Warn("VM template made without the storage mounted")
		}
	}
	return nil
}
