package qemu

import (
	"context"
	"fmt"
	"slices"
	"strconv"
	"strings"

	"github.com/containerd/errdefs"

	"github.com/caisson-containers/caisson/shim/vmm"
)

// sharedFSID is the virtio-fs device's chardev; its device is sharedFSID+"-dev". A VM has
// one shared file system, cold-plugged (sharedFSArgs) or hot-plugged (AttachSharedFS).
const sharedFSID = "sharedfs"

// checkTag refuses a tag QEMU's option syntax or the guest's mount cannot carry.
func checkTag(fs vmm.SharedFS) error {
	if fs.Tag == "" || len(fs.Tag) > 36 || strings.ContainsAny(fs.Tag, ",=") {
		return fmt.Errorf("shared file system tag %q: want 1 to 36 bytes without ',' or '=': %w", fs.Tag, errdefs.ErrInvalidArgument)
	}
	return nil
}

// sharedFSArgs are the virtio-fs device of vmm.Config.SharedFS, if any.
func (c cmdline) sharedFSArgs() ([]string, error) {
	fs := c.vm.SharedFS
	if fs == nil {
		return nil, nil
	}
	if err := checkTag(*fs); err != nil {
		return nil, err
	}
	chardev := "socket,id=" + sharedFSID + ",path=" + optValue(fs.Socket)
	if c.sharedFSFD != 0 {
		chardev = "socket,id=" + sharedFSID + ",fd=" + strconv.Itoa(c.sharedFSFD)
	}
	return []string{
		"-chardev", chardev,
		"-device", fmt.Sprintf("vhost-user-fs-pci,id=%s-dev,bus=pcie.0,addr=%02x.0,chardev=%s,tag=%s", sharedFSID, sharedFSSlot, sharedFSID, fs.Tag),
	}, nil
}

// AttachSharedFS hot-plugs the virtio-fs device fs in a free hot-plug slot: the shim
// connects to the daemon and passes QEMU the connection (getfd), as it does for a
// jailed QEMU at the start, then QEMU adds the chardev and the device. A failed step
// undoes the ones before it; the daemon, whose one connection then closed, ends.
func (v *VM) AttachSharedFS(ctx context.Context, fs vmm.SharedFS) error {
	v.opMu.Lock()
	defer v.opMu.Unlock()
	if err := checkTag(fs); err != nil {
		return err
	}
	if !v.cfg.SharesMemory() {
		return fmt.Errorf("shared file system %q: the VM's memory is private (vmm.Config.SharedMemory): %w", fs.Tag, errdefs.ErrFailedPrecondition)
	}
	c, err := v.running()
	if err != nil {
		return err
	}
	what := fmt.Sprintf("shared file system %q", fs.Tag)
	v.mu.Lock()
	free := slices.Contains(v.used, false)
	has := v.cfg.SharedFS != nil || v.hotFS
	v.mu.Unlock()
	switch {
	case has:
		return fmt.Errorf("%s: the VM has one: %w", what, errdefs.ErrAlreadyExists)
	case !free: // before the daemon's one connection is spent
		return fmt.Errorf("%s: no hot-plug slot left: %w", what, errdefs.ErrResourceExhausted)
	}
	conn, err := dialSharedFS(fs.Socket)
	if err != nil {
		return err
	}
	defer conn.Close() // QEMU has its own copy once getfd returned
	// Not ctx: as in attach, a command QEMU ran after the caller gave up would leave a
	// device nobody knows about.
	qctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), qmpTimeout)
	defer cancel()
	if err := c.ExecuteWithFile(qctx, "getfd", map[string]any{"fdname": sharedFSID}, nil, conn); err != nil {
		return fmt.Errorf("%s: pass its connection to qemu: %w", what, err)
	}
	backend := map[string]any{"type": "socket", "data": map[string]any{
		"addr":   map[string]any{"type": "fd", "data": map[string]any{"str": sharedFSID}},
		"server": false,
	}}
	if err := c.Execute(qctx, "chardev-add", map[string]any{"id": sharedFSID, "backend": backend}, nil); err != nil {
		c.Execute(qctx, "closefd", map[string]any{"fdname": sharedFSID}, nil)
		return fmt.Errorf("%s: %w", what, err)
	}
	dev := map[string]any{"driver": "vhost-user-fs-pci", "id": sharedFSID + "-dev", "chardev": sharedFSID, "tag": fs.Tag}
	if err := v.plugInFreeSlot(qctx, c, what, dev); err != nil {
		c.Execute(qctx, "chardev-remove", map[string]any{"id": sharedFSID}, nil)
		return err
	}
	v.mu.Lock()
	v.hotFS = true
	v.mu.Unlock()
	return nil
}
