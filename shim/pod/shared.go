package pod

import (
	"context"
	"fmt"
	"path"
	"path/filepath"

	"github.com/containerd/errdefs"
	"github.com/containerd/errdefs/pkg/errgrpc"
	"github.com/containerd/log"

	agent "github.com/caisson-containers/caisson/api/agent/v1"
	"github.com/caisson-containers/caisson/shim/config"
	"github.com/caisson-containers/caisson/shim/virtiofs"
	"github.com/caisson-containers/caisson/shim/vmm"
)

// Host directories shared with the VM (guest.shared_fs = "virtio-fs", package
// shim/virtiofs): SharedDirName under the pod's state directory, exported by the
// pod's virtiofsd, mounted in the guest as the storage sharedStorage.
const (
	SharedDirName = "shared"
	sharedTag     = "caisson-shared"
	sharedStorage = "shared"
)

// SharesHostPaths reports whether pods of cfg share host paths through virtio-fs:
// a pod from a VM template cannot (its memory is private to it).
func SharesHostPaths(cfg config.Config) bool {
	return cfg.Guest.SharedFS == config.SharedFSVirtio && !cfg.Hypervisor.Template
}

// startShared starts the pod's virtiofsd and returns the VM's device for it.
func startShared(ctx context.Context, cfg config.Config, stateDir string) (*virtiofs.Daemon, *vmm.SharedFS, error) {
	d, err := virtiofs.Start(ctx, virtiofs.Config{
		Binary: cfg.Guest.Virtiofsd,
		Dir:    filepath.Join(stateDir, SharedDirName),
		Socket: filepath.Join(stateDir, "fs.sock"),
		Log:    filepath.Join(stateDir, "virtiofsd.log"),
	})
	if err != nil {
		return nil, nil, err
	}
	return d, &vmm.SharedFS{Socket: filepath.Join(stateDir, "fs.sock"), Tag: sharedTag}, nil
}

// mountShared mounts the shared directory in the guest.
func (p *Pod) mountShared(ctx context.Context) error {
	resp, err := p.storage.Mount(ctx, &agent.MountStorageRequest{
		StorageId: sharedStorage,
		Device:    &agent.Device{Kind: agent.DeviceKind_DEVICE_KIND_VIRTIO_FS, Tag: sharedTag},
		Fstype:    "virtiofs",
	})
	if err != nil {
		return fmt.Errorf("mount the shared directory in the guest: %w", errgrpc.ToNative(err))
	}
	p.sharedGuest = resp.GetMountPoint()
	return nil
}

// watchShared stops the VM if virtiofsd dies while the pod runs: the guest's
// requests to it would hang, and with them every process touching a volume. The
// pod's containers then end as with any VM death.
func (p *Pod) watchShared(ctx context.Context) {
	select {
	case <-p.fs.Done():
		if p.stopping.Load() {
			return
		}
		log.G(ctx).WithError(p.fs.Err()).Error("virtiofsd died: stopping the pod's VM (its volumes are gone)")
		p.vm.Stop(context.WithoutCancel(ctx))
	case <-p.vm.Done():
	}
}

// SharesHostPaths reports whether this pod shares host paths through virtio-fs.
func (p *Pod) SharesHostPaths() bool { return p.fs != nil }

// Share makes the host path src visible to the guest for owner (a container id),
// with access, and returns its guest path and, for a read-only share, the mounts below
// it (virtiofs.Daemon.Share); n numbers owner's shares. Unshare(owner) undoes it.
func (p *Pod) Share(owner string, n int, src string, access virtiofs.Access) (string, []virtiofs.Submount, error) {
	if p.fs == nil {
		return "", nil, fmt.Errorf("this pod shares no host paths (guest.shared_fs): %w", errdefs.ErrFailedPrecondition)
	}
	name := fmt.Sprintf("%s-%d", owner, n)
	subs, err := p.fs.Share(owner, name, src, access)
	if err != nil {
		return "", nil, err
	}
	return path.Join(p.sharedGuest, name), subs, nil
}

// Unshare removes owner's shares from the shared directory.
func (p *Pod) Unshare(owner string) error {
	if p.fs == nil {
		return nil
	}
	return p.fs.Unshare(owner)
}
