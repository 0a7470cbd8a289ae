// Package virtiofs shares host directories with a pod's VM through virtio-fs:
// one virtiofsd per pod exports the pod's shared directory, and each host path a
// container bind-mounts (a Kubernetes volume, a `-v` of ctr or nerdctl) is mounted
// into that directory, where the guest finds it under the virtio-fs mount. Writes
// land on the host; host changes reach the guest.
//
// The shares are mounted in virtiofsd's own mount namespace, not the host's
// (mountns.go): on the host the shared directory holds only empty placeholders, so
// removing it never reaches a shared path, and a shared host path carries no host
// mount that would keep it busy.
package virtiofs

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"sort"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"github.com/moby/sys/mountinfo"
	"golang.org/x/sys/unix"
)

// DefaultBinary is where Debian's QEMU (package qemu-system-common) installs virtiofsd.
const DefaultBinary = "/usr/lib/qemu/virtiofsd"

// Config is one pod's virtiofsd.
type Config struct {
	// Binary is virtiofsd (default DefaultBinary).
	Binary string
	// Dir is the shared directory; created, and removed by Close.
	Dir string
	// Socket is the vhost-user socket QEMU connects to.
	Socket string
	// Log receives virtiofsd's output.
	Log string
}

// Daemon is a running virtiofsd and the shared directory it exports.
type Daemon struct {
	cfg  Config
	cmd  *exec.Cmd
	done chan struct{}
	err  error // why virtiofsd exited, after done
	// sandboxPid is virtiofsd's child, in whose mount namespace the shares are (0
	// until the first share).
	sandboxPid int

	mu     sync.Mutex
	shares map[string][]string // names in Dir, by owner
}

// Start prepares the shared directory and starts virtiofsd listening on the socket.
// On error nothing is left.
func Start(ctx context.Context, cfg Config) (_ *Daemon, retErr error) {
	if cfg.Binary == "" {
		cfg.Binary = DefaultBinary
	}
	if _, err := os.Stat(cfg.Binary); err != nil {
		return nil, fmt.Errorf("virtiofsd: %w (package qemu-system-common; or guest.shared_fs = \"copy\")", err)
	}
	if err := os.MkdirAll(cfg.Dir, 0o700); err != nil {
		return nil, err
	}
	defer func() {
		if retErr != nil {
			Unmount(cfg.Dir)
			os.RemoveAll(cfg.Dir)
		}
	}()
	// The shim listens, virtiofsd serves the listener it inherits: the socket exists
	// before QEMU dials it, with no wait for virtiofsd to create it.
	os.Remove(cfg.Socket)
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: cfg.Socket, Net: "unix"})
	if err != nil {
		return nil, fmt.Errorf("virtiofsd socket: %w", err)
	}
	l.SetUnlinkOnClose(false)
	lf, err := l.File()
	l.Close()
	if err != nil {
		os.Remove(cfg.Socket)
		return nil, err
	}
	defer lf.Close()
	defer func() {
		if retErr != nil {
			os.Remove(cfg.Socket)
		}
	}()
	logf, err := os.OpenFile(cfg.Log, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return nil, err
	}
	defer logf.Close()

	cmd := exec.Command(cfg.Binary,
		"--fd=3",
		"-o", "source="+cfg.Dir,
		"-o", "sandbox=namespace",
		// Host changes (a swapped ConfigMap) reach the guest within a second.
		"-o", "cache=auto",
		"-o", "announce_submounts",
		"-o", "xattr",
		"-o", "log_level=warn",
	)
	cmd.ExtraFiles = []*os.File{lf}
	cmd.Stdout, cmd.Stderr = logf, logf
	// Its own process group; killed with the shim. Pdeathsig fires when the thread
	// that started it ends, so that thread stays locked until virtiofsd has exited
	// (as QEMU's, shim/vmm/qemu).
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	d := &Daemon{cfg: cfg, cmd: cmd, done: make(chan struct{}), shares: map[string][]string{}}
	started := make(chan error)
	go func() {
		runtime.LockOSThread()
		defer runtime.UnlockOSThread()
		if err := cmd.Start(); err != nil {
			started <- err
			return
		}
		started <- nil
		err := cmd.Wait()
		if err == nil {
			err = errors.New("virtiofsd exited")
		}
		d.err = fmt.Errorf("%w%s", err, logTail(cfg.Log))
		close(d.done)
	}()
	if err := <-started; err != nil {
		return nil, fmt.Errorf("start virtiofsd: %w", err)
	}
	log.G(ctx).WithFields(log.Fields{"pid": cmd.Process.Pid, "dir": cfg.Dir}).Debug("virtiofsd started")
	return d, nil
}

// Done is closed when virtiofsd has exited; Err says why.
func (d *Daemon) Done() <-chan struct{} { return d.done }

// Err says why virtiofsd exited (after Done).
func (d *Daemon) Err() error { return d.err }

// Access is how the guest may use a share.
type Access int

const (
	ReadWrite Access = iota
	// ReadOnly makes the share's top mount read-only; mounts below it in the host
	// path keep their own flags (a container's non-recursive "ro").
	ReadOnly
	// RecursiveReadOnly makes the share and every mount below it read-only ("rro").
	RecursiveReadOnly
)

// Share bind-mounts the host path src, with the mounts below it, at name in the
// shared directory for owner, with access, and returns name. src must be a
// directory or a regular file: a socket, FIFO or device cannot cross into a VM.
//
// For a ReadOnly share it also returns the mounts below its top, by path relative to
// it, parents first: in the guest a mount below a virtio-fs share appears when first
// looked up, with the flags of the mount it is looked up through, so a container's
// read-only bind would make them read-only too; the shim mounts each in the
// container itself (shim/task).
func (d *Daemon) Share(owner, name, src string, access Access) (submounts []Submount, retErr error) {
	if filepath.Base(name) != name || name == "." || name == ".." {
		return nil, fmt.Errorf("shared name %q: %w", name, errdefs.ErrInvalidArgument)
	}
	// The copy of src's mounts is made first and its type checked then: src
	// cannot turn into something else in between.
	tree, err := unix.OpenTree(unix.AT_FDCWD, src, unix.OPEN_TREE_CLONE|unix.OPEN_TREE_CLOEXEC|unix.AT_RECURSIVE)
	if err != nil {
		if err == unix.ENOENT {
			return nil, fmt.Errorf("host path %q does not exist: %w", src, errdefs.ErrNotFound)
		}
		return nil, fmt.Errorf("host path %q: %w", src, err)
	}
	defer unix.Close(tree)
	var st unix.Stat_t
	if err := unix.Fstat(tree, &st); err != nil {
		return nil, fmt.Errorf("host path %q: %w", src, err)
	}
	fi := fileMode(st.Mode)
	target := filepath.Join(d.cfg.Dir, name)
	switch m := fi; {
	case m.IsDir():
		err = os.Mkdir(target, 0o700)
	case m.IsRegular():
		var f *os.File
		if f, err = os.OpenFile(target, os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o600); err == nil {
			f.Close()
		}
	default:
		return nil, fmt.Errorf("host path %q is a %s, which a VM cannot share (only directories and regular files): %w",
			src, modeName(m), errdefs.ErrInvalidArgument)
	}
	if err != nil {
		return nil, err
	}
	defer func() {
		if retErr != nil {
			os.Remove(target)
		}
	}()
	if err := d.attach(tree, src, name, access); err != nil {
		return nil, err
	}
	if access == ReadOnly {
		if submounts, err = d.submountsOf(name); err != nil {
			d.detach(name)
			return nil, fmt.Errorf("mounts below the share of %s: %w", src, err)
		}
	}
	d.mu.Lock()
	d.shares[owner] = append(d.shares[owner], name)
	d.mu.Unlock()
	return submounts, nil
}

// Submount is a mount below the top of a share.
type Submount struct {
	Path     string // relative to the share
	ReadOnly bool
}

// submountsOf lists the mounts strictly below the share name, parents first.
func (d *Daemon) submountsOf(name string) ([]Submount, error) {
	f, err := os.Open(fmt.Sprintf("/proc/%d/mountinfo", d.sandboxPid))
	if err != nil {
		return nil, err
	}
	defer f.Close()
	// Mount points as virtiofsd's sandbox sees them, from its root: the shared directory.
	target := "/" + name
	infos, err := mountinfo.GetMountsFromReader(f, mountinfo.PrefixFilter(target))
	if err != nil {
		return nil, err
	}
	// Paths sort parents first; mounts stacked on one path keep their order, the
	// top one last, and only it is seen.
	sort.SliceStable(infos, func(i, j int) bool { return infos[i].Mountpoint < infos[j].Mountpoint })
	var subs []Submount
	for _, m := range infos {
		rel, err := filepath.Rel(target, m.Mountpoint)
		if err != nil || rel == "." {
			continue
		}
		sub := Submount{Path: rel, ReadOnly: slices.Contains(strings.Split(m.Options, ","), "ro")}
		if n := len(subs); n > 0 && subs[n-1].Path == rel {
			subs[n-1] = sub
			continue
		}
		subs = append(subs, sub)
	}
	return subs, nil
}

// Unshare removes owner's shares (the host paths themselves are untouched).
func (d *Daemon) Unshare(owner string) error {
	d.mu.Lock()
	names := d.shares[owner]
	delete(d.shares, owner)
	d.mu.Unlock()
	var errs []error
	for _, n := range names {
		if err := d.detach(n); err != nil {
			errs = append(errs, fmt.Errorf("unmount share %s: %w", n, err))
		}
		// The host's placeholder is empty whatever happened in virtiofsd's namespace.
		if err := os.Remove(filepath.Join(d.cfg.Dir, n)); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// Close stops virtiofsd (it exits by itself once QEMU is gone; after a grace it is
// killed), detaches every share and removes the shared directory and the socket.
func (d *Daemon) Close(ctx context.Context) error {
	select {
	case <-d.done:
	case <-time.After(2 * time.Second):
		d.cmd.Process.Kill()
		<-d.done
	}
	os.Remove(d.cfg.Socket)
	if err := Unmount(d.cfg.Dir); err != nil {
		return err
	}
	return os.RemoveAll(d.cfg.Dir)
}

// Unmount detaches the shared directory dir and every mount under it, so that
// removing dir cannot reach a shared host path. For Close, and for the cleanup
// of a pod whose shim died. The shares themselves are never in the host's
// namespace (mountns.go); this undoes what a shim of an earlier version mounted
// there, and refuses if anything is still mounted below dir.
func Unmount(dir string) error {
	for {
		// The self-bind and the shares under it go at once (MNT_DETACH takes the
		// subtree); repeat while dir is still a mount point (stacked mounts).
		err := unix.Unmount(dir, unix.MNT_DETACH)
		if err == unix.EINVAL || err == unix.ENOENT {
			break
		}
		if err != nil {
			return fmt.Errorf("unmount shared directory %s: %w", dir, err)
		}
	}
	// Anything still mounted below dir (mounted there by other means) would be
	// removed with it: refuse.
	mounts, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return err
	}
	for _, line := range strings.Split(string(mounts), "\n") {
		f := strings.Fields(line)
		if len(f) > 4 && strings.HasPrefix(f[4], dir+"/") {
			return fmt.Errorf("%s is still mounted under the shared directory: %w", f[4], errdefs.ErrFailedPrecondition)
		}
	}
	return nil
}

// fileMode is the type of a stat's mode, as os.FileMode.
func fileMode(mode uint32) os.FileMode {
	switch mode & unix.S_IFMT {
	case unix.S_IFDIR:
		return os.ModeDir
	case unix.S_IFREG:
		return 0
	case unix.S_IFSOCK:
		return os.ModeSocket
	case unix.S_IFIFO:
		return os.ModeNamedPipe
	case unix.S_IFCHR:
		return os.ModeDevice | os.ModeCharDevice
	case unix.S_IFBLK:
		return os.ModeDevice
	case unix.S_IFLNK:
		return os.ModeSymlink
	}
	return os.ModeIrregular
}

func modeName(m os.FileMode) string {
	switch {
	case m&os.ModeSocket != 0:
		return "socket"
	case m&os.ModeNamedPipe != 0:
		return "FIFO"
	case m&os.ModeCharDevice != 0:
		return "character device"
	case m&os.ModeDevice != 0:
		return "block device"
	case m&os.ModeSymlink != 0:
		return "symlink"
	}
	return m.Type().String()
}

// logTail is the end of virtiofsd's log, for errors.
func logTail(path string) string {
	f, err := os.Open(path)
	if err != nil {
		return ""
	}
	defer f.Close()
	if fi, err := f.Stat(); err == nil && fi.Size() > 2048 {
		f.Seek(-2048, io.SeekEnd)
	}
	b, _ := io.ReadAll(f)
	if s := strings.TrimSpace(string(b)); s != "" {
		return ": " + s
	}
	return ""
}
