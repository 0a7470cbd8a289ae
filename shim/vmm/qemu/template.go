package qemu

import (
	"context"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"time"

	"github.com/containerd/errdefs"
	"github.com/containerd/log"

	"github.com/caisson-containers/caisson/shim/vmm"
	"github.com/caisson-containers/caisson/shim/vmm/qemu/qmp"
)

// VM templates (vmm.Template) use QEMU's migration: a template VM boots with its RAM in a
// file (memory-backend-file, share=on) and is saved, once paused, with the
// x-ignore-shared capability, which leaves that file out of the stream: the state file
// holds the devices only (a few hundred KiB). A VM started from it maps the same file
// privately (share=off: its writes go to its own copy-on-write pages) and loads the
// state with -incoming, from a descriptor it inherits. Kata Containers' VM templating
// works the same way.
const (
	// templateRAM is the id of the guest RAM's backend in a template and the VMs made from it.
	templateRAM = "guest-ram"
	// sharedRAM is the shared memory backend of a VM with a shared file system.
	sharedRAM = "guest-ram-shared"
	// migrateSocketName is where a template VM sends its state (in the VM's state dir).
	migrateSocketName = "migrate.sock"
	// migrationTimeout bounds saving and loading a template's state.
	migrationTimeout = time.Minute
)

// templateArgs are the options of a template VM (restoreFD 0) or of a VM started from
// one, whose state QEMU reads from descriptor restoreFD.
func templateArgs(cfg vmm.Config, restoreFD int) []string {
	share := "on"
	if restoreFD != 0 {
		share = "off"
	}
	a := []string{
		"-object", fmt.Sprintf("memory-backend-file,id=%s,size=%dM,mem-path=%s,share=%s",
			templateRAM, cfg.MemoryMiB, optValue(filepath.Join(cfg.Template.Dir, vmm.TemplateMemory)), share),
	}
	if restoreFD != 0 {
		// Deferred: both ends need the capability set first, which QEMU 7.2 takes
		// over QMP only (see restore).
		a = append(a, "-incoming", "defer")
	}
	return a
}

// ignoreShared sets the migration capability that leaves the template's RAM file out.
func ignoreShared(ctx context.Context, c *qmp.Client) error {
	return c.Execute(ctx, "migrate-set-capabilities", map[string]any{
		"capabilities": []map[string]any{{"capability": "x-ignore-shared", "state": true}},
	}, nil)
}

// noAnnounce keeps QEMU from announcing the VM's NICs once the incoming migration is
// loaded. After a live migration the announce (by default 5 rounds over 750 ms: a RARP
// broadcast per NIC and round, or the guest's own gratuitous ARP) tells the switches
// where the VM now is. A VM from a template is on the host that made its NIC, whose MAC
// the pod's veth already announced (CNI's gratuitous ARP), so there is no one to tell.
// And every broadcast reaches every pod VM on the bridge, each woken to drop it: under
// TCG about 4 ms of host CPU per pod and frame (measured with ARP requests), so at 100
// pods the four RARPs that reached the bridge per restore come to some 1.6 s of the
// node's CPU, while the new pod's guest resumes (docs/cri.md, "Density").
func noAnnounce(ctx context.Context, c *qmp.Client) error {
	return c.Execute(ctx, "migrate-set-parameters", map[string]any{"announce-rounds": 0}, nil)
}

// restoring says whether the VM starts from a template.
func (v *VM) restoring() bool { return v.cfg.Template != nil && v.cfg.Template.Restore }

// coldDisks are the disks on QEMU's command line, each behind a root port of its own: a
// template's own disks (vmm.Template.Disks) in a template VM and in the VMs started from
// it alike, the same disk on the same root port in both as the saved device state
// expects; then, but in a VM started from a template (restore hot-plugs them),
// Config.Disks.
func (v *VM) coldDisks() []vmm.Disk {
	if v.cfg.Template == nil {
		return v.cfg.Disks
	}
	if v.restoring() {
		return v.cfg.Template.Disks
	}
	return append(slices.Clip(v.cfg.Template.Disks), v.cfg.Disks...)
}

// openTemplateState opens the saved state of the template a VM starts from.
func (v *VM) openTemplateState() (*os.File, error) {
	dir := v.cfg.Template.Dir
	if _, err := os.Stat(filepath.Join(dir, vmm.TemplateMemory)); err != nil {
		return nil, fmt.Errorf("template %s: %w: %w", dir, errdefs.ErrNotFound, err)
	}
	f, err := os.Open(filepath.Join(dir, vmm.TemplateState))
	if err != nil {
		return nil, fmt.Errorf("template %s: %w: %w", dir, errdefs.ErrNotFound, err)
	}
	return f, nil
}

// migrationStatus is the part of query-migrate's answer that matters here.
type migrationStatus struct {
	Status    string `json:"status"`
	ErrorDesc string `json:"error-desc"`
}

// waitMigration polls query-migrate until the migration (outgoing or incoming) is over.
func waitMigration(ctx context.Context, c *qmp.Client) error {
	ctx, cancel := context.WithTimeout(ctx, migrationTimeout)
	defer cancel()
	for delay := time.Millisecond; ; delay = min(2*delay, 20*time.Millisecond) {
		var st migrationStatus
		if err := c.Execute(ctx, "query-migrate", nil, &st); err != nil {
			return err
		}
		switch st.Status {
		case "completed":
			return nil
		case "failed", "cancelled":
			return fmt.Errorf("migration %s: %s", st.Status, st.ErrorDesc)
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("migration still %q: %w", st.Status, ctx.Err())
		case <-time.After(delay):
		}
	}
}

// restore finishes the start of a VM from a template: QEMU has loaded (or is loading) the
// saved state and waits, paused. The VM's own NICs and disks are hot-plugged before the
// guest resumes, so that it finds them at once.
//
// Its steps' times are logged (debug): under TCG the restore took 20 ms on its own
// (35-60 ms in pods on a loaded machine), the hot-plugs most of it; QEMU's own start
// before it 60-120 ms (docs/cri.md, Starting pods from a VM template). The plugs go one
// after the other: QEMU runs QMP commands in turn, and sending them all at once saved
// about 1 ms of the 13 ms that three disks took (measured): the time is QEMU's work,
// not the round trips.
func (v *VM) restore(ctx context.Context, c *qmp.Client, restoreFD int) error {
	start := time.Now()
	if err := ignoreShared(ctx, c); err != nil {
		return fmt.Errorf("load template %s: %w", v.cfg.Template.Dir, err)
	}
	if err := noAnnounce(ctx, c); err != nil {
		return fmt.Errorf("load template %s: %w", v.cfg.Template.Dir, err)
	}
	if err := c.Execute(ctx, "migrate-incoming", map[string]any{"uri": "fd:" + strconv.Itoa(restoreFD)}, nil); err != nil {
		return fmt.Errorf("load template %s: %w", v.cfg.Template.Dir, err)
	}
	if err := waitMigration(ctx, c); err != nil {
		return fmt.Errorf("load template %s: %w", v.cfg.Template.Dir, err)
	}
	loaded := time.Now()
	for i, n := range v.cfg.NICs {
		if err := v.plugNIC(ctx, c, i, n); err != nil {
			return err
		}
	}
	for _, d := range v.cfg.Disks {
		if _, err := v.attach(ctx, c, d); err != nil {
			return err
		}
	}
	plugged := time.Now()
	if err := c.Execute(ctx, "cont", nil, nil); err != nil {
		return fmt.Errorf("resume the VM: %w", err)
	}
	log.G(ctx).WithFields(log.Fields{
		"template": v.cfg.Template.Dir, "load": loaded.Sub(start), "hotplug": plugged.Sub(loaded), "took": time.Since(start),
	}).Debug("vm restored from template")
	return nil
}

// SaveTemplate pauses a template VM (vmm.Template without Restore) and saves its device
// state into the template's dir; its memory is the dir's memory file already. The VM
// stays paused: stop it afterwards. Save once the guest is ready for what VMs made from
// the template will do first (its agent answering, its drivers loaded).
func (v *VM) SaveTemplate(ctx context.Context) (retErr error) {
	v.opMu.Lock()
	defer v.opMu.Unlock()
	if v.cfg.Template == nil || v.cfg.Template.Restore {
		return fmt.Errorf("not a template VM: %w", errdefs.ErrFailedPrecondition)
	}
	c, err := v.running()
	if err != nil {
		return err
	}
	state := filepath.Join(v.cfg.Template.Dir, vmm.TemplateState)
	tmp := state + ".tmp"
	f, err := os.OpenFile(tmp, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o600)
	if err != nil {
		return err
	}
	defer func() {
		f.Close()
		if retErr != nil {
			os.Remove(tmp)
		}
	}()
	// QEMU may not spawn (-sandbox) nor take descriptors over QMP here: it connects
	// to a socket of ours instead, and the stream goes into the file.
	sock := filepath.Join(v.cfg.StateDir, migrateSocketName)
	os.Remove(sock)
	l, err := net.Listen("unix", sock)
	if err != nil {
		return err
	}
	defer os.Remove(sock)
	defer l.Close()
	if j := v.qcfg.Jail; j != nil {
		// Connecting takes write permission on the socket.
		if err := os.Chown(sock, int(j.UID), int(j.GID)); err != nil {
			return err
		}
	}
	copied := make(chan error, 1)
	go func() {
		conn, err := l.Accept()
		if err != nil {
			copied <- err
			return
		}
		defer conn.Close()
		_, err = io.Copy(f, conn)
		copied <- err
	}()

	ctx, cancel := context.WithTimeout(ctx, migrationTimeout)
	defer cancel()
	if err := c.Execute(ctx, "stop", nil, nil); err != nil {
		return fmt.Errorf("pause the template VM: %w", err)
	}
	if err := ignoreShared(ctx, c); err != nil {
		return fmt.Errorf("save the template VM: %w", err)
	}
	if err := c.Execute(ctx, "migrate", map[string]any{"uri": "unix:" + sock}, nil); err != nil {
		return fmt.Errorf("save the template VM: %w", err)
	}
	if err := waitMigration(ctx, c); err != nil {
		return fmt.Errorf("save the template VM: %w", err)
	}
	select {
	case err := <-copied:
		if err != nil {
			return fmt.Errorf("save the template VM: %w", err)
		}
	case <-ctx.Done():
		l.Close()
		return fmt.Errorf("save the template VM: %w", ctx.Err())
	}
	if err := f.Sync(); err != nil {
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	return os.Rename(tmp, state)
}
