// Package rootfs is the mount contract (docs/mounts.md, contract 2) between
// the snapshotter and the shim: the overlay options a rootfs may carry into
// the guest, and the parser that turns the mounts a snapshotter returns for a
// container into what the shim hands the VM (the files to attach as devices,
// and how the agent builds the rootfs from them). Both sides import it, so
// neither imports the other; nothing here mounts anything on the host.
package rootfs

import (
	"fmt"
	"path"
	"regexp"
	"slices"
	"strconv"
	"strings"

	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/errdefs"
	"github.com/docker/go-units"
)

// Device is one host file the rootfs needs in the VM.
type Device struct {
	// Source is the host file (a layer image or a writable image).
	Source string
	// FSType is "erofs" or "ext4".
	FSType string
	// ReadOnly devices are attached read-only and mounted "ro".
	ReadOnly bool
	// Mkfs, when set, says how to create Source if it does not exist yet.
	Mkfs *Mkfs
}

// Mkfs is a `mkfs/<fs>` mount's formatting request (containerd's X-containerd.mkfs.* options).
type Mkfs struct {
	FS   string
	Size int64
	UUID string
}

// Ref is a directory inside one of the plan's devices.
type Ref struct {
	// Device indexes Plan.Devices.
	Device int
	// Path is relative to the device's root; "" is the root.
	Path string
}

// Plan is a container's rootfs: devices, and how the agent assembles them.
//   - Lower only: read-only (an overlay of Lower, or the single lower itself);
//   - Upper and Work with Lower: a writable overlay;
//   - Upper alone: a read-write bind of Upper;
//   - TmpfsUpper with Lower: a writable overlay whose upper layer is a tmpfs in the
//     guest, gone with the container (WithTmpfsUpper).
type Plan struct {
	Devices []Device
	// Lower are the read-only layers, top-most first (overlayfs lowerdir order).
	Lower       []Ref
	Upper, Work *Ref
	TmpfsUpper  bool
	// Options are the overlay options to pass on, from OverlayOptions.
	Options []string
}

// WithTmpfsUpper returns the plan with its writable layer in guest memory instead of on
// its snapshot's writable image, which is then neither formatted nor attached: for a
// container whose writes no one reads: a CRI pod's pause container (its sandbox
// snapshot is never committed or diffed, and goes with the pod), or one whose rootfs
// stays read-only (shim/task's writesUnread). A plan with no lower layers or no
// writable layer is returned as it is.
func (p *Plan) WithTmpfsUpper() *Plan {
	if p == nil || p.Upper == nil || len(p.Lower) == 0 {
		return p
	}
	out := &Plan{Options: p.Options, TmpfsUpper: true}
	index := map[int]int{} // p's device index to out's
	for _, r := range p.Lower {
		i, ok := index[r.Device]
		if !ok {
			i = len(out.Devices)
			index[r.Device] = i
			out.Devices = append(out.Devices, p.Devices[r.Device])
		}
		out.Lower = append(out.Lower, Ref{Device: i, Path: r.Path})
	}
	return out
}

// OverlayOptions are the overlay options a rootfs may carry into the guest.
// Everything else is refused: the guest kernel must not be handed options it
// was not tested with, nor host paths.
var OverlayOptions = []string{"index=", "redirect_dir=", "metacopy=", "volatile", "userxattr", "ro"}

// OverlayOptionAllowed reports whether an overlay option may reach the guest.
func OverlayOptionAllowed(o string) bool {
	for _, a := range OverlayOptions {
		if o == a || (strings.HasSuffix(a, "=") && strings.HasPrefix(o, a)) {
			return true
		}
	}
	return false
}

func invalid(format string, args ...any) error {
	return fmt.Errorf(format+": %w", append(args, errdefs.ErrInvalidArgument)...)
}

// Parse plans the rootfs of mounts. Host mounts of the snapshotter (mount_mode
// "host") are first rewritten into the template mounts of the same snapshot
// (fromHostMounts). Every mount but the last must be a device
// (erofs, ext4, mkfs/ext4); the last may also be the overlay or bind that
// assembles them (format/[mkdir/]overlay, format/[mkdir/]bind). A lone device
// mount is the rootfs itself.
func Parse(mounts []mount.Mount) (*Plan, error) {
	if len(mounts) == 0 {
		return nil, invalid("no rootfs mounts")
	}
	if tm, ok, err := fromHostMounts(mounts); err != nil {
		return nil, err
	} else if ok {
		mounts = tm
	}
	p := &Plan{}
	for i, m := range mounts {
		last := i == len(mounts)-1
		kind := m.Type
		switch {
		case kind == "erofs" || kind == "ext4" || strings.HasPrefix(kind, "mkfs/"):
			d, err := parseDevice(m)
			if err != nil {
				return nil, fmt.Errorf("mount %d: %w", i, err)
			}
			p.Devices = append(p.Devices, d)
		case last && (kind == "format/mkdir/overlay" || kind == "format/overlay"):
			if err := p.parseOverlay(m); err != nil {
				return nil, fmt.Errorf("mount %d (%s): %w", i, kind, err)
			}
			return p, nil
		case last && (kind == "format/mkdir/bind" || kind == "format/bind"):
			if err := p.parseBind(m); err != nil {
				return nil, fmt.Errorf("mount %d (%s): %w", i, kind, err)
			}
			return p, nil
		case kind == "bind" || kind == "overlay" || kind == "rbind":
			return nil, invalid("mount %d: mount type %q needs a host directory, which cannot reach a Caisson VM (no shared filesystem)", i, kind)
		default:
			return nil, invalid("mount %d: mount type %q is not supported by Caisson (docs/mounts.md)", i, kind)
		}
	}
	// Only devices: a single one is the rootfs.
	if len(p.Devices) != 1 {
		return nil, invalid("%d device mounts without an overlay to assemble them", len(p.Devices))
	}
	if p.Devices[0].ReadOnly {
		p.Lower = []Ref{{Device: 0}}
	} else {
		p.Upper = &Ref{Device: 0}
	}
	return p, nil
}

func parseDevice(m mount.Mount) (Device, error) {
	d := Device{Source: m.Source}
	if !path.IsAbs(m.Source) {
		return d, invalid("source %q is not an absolute path", m.Source)
	}
	fs := m.Type
	if after, ok := strings.CutPrefix(m.Type, "mkfs/"); ok {
		fs = after
		d.Mkfs = &Mkfs{FS: after}
	}
	if fs != "erofs" && fs != "ext4" {
		return d, invalid("filesystem %q is not supported (erofs, ext4)", fs)
	}
	d.FSType = fs
	d.ReadOnly = fs == "erofs"
	for _, o := range m.Options {
		switch {
		case o == "ro":
			d.ReadOnly = true
		case o == "rw":
			if fs == "erofs" {
				return d, invalid("erofs is read-only; option rw")
			}
		case o == "loop", o == "noload":
			// loop is how the host would mount it; the VM gets a device instead.
			// noload (ext4: skip the journal) is implied by a read-only mount.
		case strings.HasPrefix(o, "X-containerd.mkfs."):
			if d.Mkfs == nil {
				return d, invalid("option %q on a %s mount without the mkfs transform", o, m.Type)
			}
			if err := d.Mkfs.set(strings.TrimPrefix(o, "X-containerd.mkfs.")); err != nil {
				return d, err
			}
		default:
			return d, invalid("option %q of a %s mount is not supported", o, m.Type)
		}
	}
	if d.Mkfs != nil {
		if d.Mkfs.Size <= 0 {
			return d, invalid("%s needs X-containerd.mkfs.size", m.Type)
		}
		if d.Mkfs.FS != "ext4" {
			return d, invalid("mkfs of %q is not supported (ext4)", d.Mkfs.FS)
		}
	}
	return d, nil
}

func (m *Mkfs) set(opt string) error {
	key, value, _ := strings.Cut(opt, "=")
	switch key {
	case "fs":
		if value != m.FS {
			return invalid("X-containerd.mkfs.fs=%s contradicts mount type mkfs/%s", value, m.FS)
		}
	case "size":
		n, err := units.RAMInBytes(value)
		if err != nil {
			return invalid("X-containerd.mkfs.size=%s: %v", value, err)
		}
		m.Size = n
	case "uuid":
		m.UUID = value
	default:
		return invalid("unknown mkfs option %q", opt)
	}
	return nil
}

func (p *Plan) parseOverlay(m mount.Mount) error {
	var mkdirs []Ref
	for _, o := range m.Options {
		key, value, _ := strings.Cut(o, "=")
		switch key {
		case "lowerdir":
			refs, err := p.lowerRefs(value)
			if err != nil {
				return err
			}
			p.Lower = refs
		case "upperdir", "workdir":
			r, err := p.ref(value)
			if err != nil {
				return fmt.Errorf("%s: %w", key, err)
			}
			if p.Devices[r.Device].ReadOnly {
				return invalid("%s %q is on a read-only device", key, value)
			}
			if key == "upperdir" {
				p.Upper = &r
			} else {
				p.Work = &r
			}
		case "X-containerd.mkdir.path":
			r, err := p.mkdirRef(value)
			if err != nil {
				return err
			}
			mkdirs = append(mkdirs, r)
		default:
			if !OverlayOptionAllowed(o) {
				return invalid("overlay option %q is not allowed (allowed: %s)", o, strings.Join(OverlayOptions, " "))
			}
			p.Options = append(p.Options, o)
		}
	}
	if len(p.Lower) == 0 {
		return invalid("overlay without lowerdir")
	}
	if (p.Upper == nil) != (p.Work == nil) {
		return invalid("overlay needs both upperdir and workdir, or neither")
	}
	// What overlayfs would refuse in the guest, at the first container start.
	if u, w := p.Upper, p.Work; u != nil {
		if u.Device != w.Device {
			return invalid("upperdir (device %d) and workdir (device %d) must be on one device", u.Device, w.Device)
		}
		if within(u.Path, w.Path) || within(w.Path, u.Path) {
			return invalid("upperdir %q and workdir %q must be separate directories", u.Path, w.Path)
		}
	}
	// The agent creates upper and work; no other directory may be asked for.
	for _, r := range mkdirs {
		if !refIn(r, p.Upper, p.Work) {
			return invalid("X-containerd.mkdir.path of %q in device %d is neither upperdir nor workdir", r.Path, r.Device)
		}
	}
	return nil
}

func (p *Plan) parseBind(m mount.Mount) error {
	r, err := p.ref(m.Source)
	if err != nil {
		return fmt.Errorf("source: %w", err)
	}
	readOnly := p.Devices[r.Device].ReadOnly
	var mkdirs []Ref
	for _, o := range m.Options {
		switch {
		case o == "ro":
			readOnly = true
		case o == "rw", o == "rbind", o == "bind":
		case strings.HasPrefix(o, "X-containerd.mkdir.path="):
			mr, err := p.mkdirRef(strings.TrimPrefix(o, "X-containerd.mkdir.path="))
			if err != nil {
				return err
			}
			mkdirs = append(mkdirs, mr)
		default:
			return invalid("bind option %q is not supported", o)
		}
	}
	if readOnly {
		p.Lower = []Ref{r}
	} else {
		if p.Devices[r.Device].ReadOnly {
			return invalid("read-write bind of read-only device %d", r.Device)
		}
		p.Upper = &r
	}
	for _, mr := range mkdirs {
		if mr != r {
			return invalid("X-containerd.mkdir.path of %q is not the bind source", mr.Path)
		}
	}
	return nil
}

var (
	mountRef   = regexp.MustCompile(`^\{\{\s*mount\s+(\d+)\s*\}\}(/.*)?$`)
	overlayRef = regexp.MustCompile(`^\{\{\s*overlay\s+(\d+)\s+(\d+)\s*\}\}$`)
)

// ref resolves "{{ mount N }}[/sub/dir]".
func (p *Plan) ref(s string) (Ref, error) {
	m := mountRef.FindStringSubmatch(s)
	if m == nil {
		return Ref{}, invalid("%q is not a {{ mount N }} reference (host paths cannot reach the VM)", s)
	}
	n, _ := strconv.Atoi(m[1])
	if n >= len(p.Devices) {
		return Ref{}, invalid("%q names mount %d of %d device mounts", s, n, len(p.Devices))
	}
	sub := strings.TrimPrefix(m[2], "/")
	if sub != "" && (path.Clean(sub) != sub || path.IsAbs(sub) || sub == ".." || strings.HasPrefix(sub, "../")) {
		return Ref{}, invalid("%q: sub-directory %q is not a clean relative path", s, sub)
	}
	return Ref{Device: n, Path: sub}, nil
}

func (p *Plan) mkdirRef(value string) (Ref, error) {
	// path[:mode[:uid:gid]]; the agent creates upper and work 0755 root:root.
	dir, _, _ := strings.Cut(value, ":")
	r, err := p.ref(dir)
	if err != nil {
		return Ref{}, fmt.Errorf("X-containerd.mkdir.path: %w", err)
	}
	return r, nil
}

// lowerRefs resolves "{{ overlay A B }}" or a ":"-list of mount references.
func (p *Plan) lowerRefs(s string) ([]Ref, error) {
	if m := overlayRef.FindStringSubmatch(s); m != nil {
		a, _ := strconv.Atoi(m[1])
		b, _ := strconv.Atoi(m[2])
		step := 1
		if a > b {
			step = -1
		}
		var refs []Ref
		for i := a; ; i += step {
			if i >= len(p.Devices) {
				return nil, invalid("lowerdir %q names mount %d of %d device mounts", s, i, len(p.Devices))
			}
			refs = append(refs, Ref{Device: i})
			if i == b {
				return p.checkLower(refs)
			}
		}
	}
	var refs []Ref
	for _, part := range strings.Split(s, ":") {
		r, err := p.ref(part)
		if err != nil {
			return nil, fmt.Errorf("lowerdir: %w", err)
		}
		refs = append(refs, r)
	}
	return p.checkLower(refs)
}

func (p *Plan) checkLower(refs []Ref) ([]Ref, error) {
	for _, r := range refs {
		if !p.Devices[r.Device].ReadOnly {
			return nil, invalid("lower layer %d (%s) is not read-only", r.Device, p.Devices[r.Device].Source)
		}
	}
	return refs, nil
}

// within reports whether the device directory b is a or inside it ("" is the root).
func within(a, b string) bool {
	return a == "" || a == b || strings.HasPrefix(b, a+"/")
}

func refIn(r Ref, refs ...*Ref) bool {
	return slices.ContainsFunc(refs, func(x *Ref) bool { return x != nil && *x == r })
}
