package boot

import (
	"context"
	"errors"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/caisson-containers/caisson/guest/initramfs/moddep"
)

func TestParseCmdline(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want map[string]string
	}{
		{"console=ttyS0 quiet", map[string]string{}},
		{"console=ttyS0 caisson.debug caisson.transport=vsock:1024", map[string]string{"debug": "", "transport": "vsock:1024"}},
		{"caisson.debug_console caisson.x=a=b\n", map[string]string{"debug_console": "", "x": "a=b"}},
	} {
		if got := ParseCmdline(tc.in); !maps.Equal(got, tc.want) {
			t.Errorf("ParseCmdline(%q) = %v, want %v", tc.in, got, tc.want)
		}
	}
}

func TestUnescapeMount(t *testing.T) {
	for in, want := range map[string]string{
		"/run/caisson":          "/run/caisson",
		`/mnt/with\040space`:    "/mnt/with space",
		`/a\011tab\134slash\ok`: "/a\ttab\\slash\\ok",
	} {
		if got := unescapeMount(in); got != want {
			t.Errorf("unescapeMount(%q) = %q, want %q", in, got, want)
		}
	}
}

func TestLoadModulesWithoutList(t *testing.T) {
	ctx := context.Background()
	m, err := LoadModules(ctx, t.TempDir(), []string{"virtio_console"}, []string{"vsock"})
	if err != nil {
		t.Fatal(err)
	}
	if err := m.LoadRest(ctx); err != nil || m.n != 0 {
		t.Fatalf("a kernel with everything built in: %d, %v", m.n, err)
	}
}

func TestBackground(t *testing.T) {
	ctx := context.Background()
	var ran []int
	failed := errors.New("job 2 failed")
	job := func(i int, err error) func(context.Context) error {
		return func(context.Context) error {
			ran = append(ran, i)
			return err
		}
	}
	b := StartBackground(ctx, job(1, nil), job(2, failed), job(3, nil))
	if err := b.Wait(ctx); !errors.Is(err, failed) {
		t.Fatalf("Wait: %v, want %v", err, failed)
	}
	if !slices.Equal(ran, []int{1, 2}) {
		t.Errorf("ran %v, want jobs 1 and 2 in order", ran)
	}
	if err := b.Wait(ctx); !errors.Is(err, failed) {
		t.Errorf("second Wait: %v", err)
	}

	// A job that has not ended: Wait ends with the caller's context.
	release := make(chan struct{})
	defer close(release)
	stuck := StartBackground(ctx, func(ctx context.Context) error { <-release; return nil })
	cctx, cancel := context.WithCancel(ctx)
	cancel()
	if err := stuck.Wait(cctx); !errors.Is(err, context.Canceled) {
		t.Errorf("Wait with a canceled context: %v", err)
	}
}

func TestModulePlan(t *testing.T) {
	// The image's modules.dep, as the builder writes it (the Debian cloud kernel's graph).
	const image = `kernel/drivers/virtio/virtio_ring.ko:
kernel/drivers/virtio/virtio.ko:
kernel/drivers/virtio/virtio_pci_modern_dev.ko:
kernel/drivers/virtio/virtio_pci_legacy_dev.ko:
kernel/drivers/virtio/virtio_pci.ko: kernel/drivers/virtio/virtio_pci_legacy_dev.ko kernel/drivers/virtio/virtio_pci_modern_dev.ko kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/char/virtio_console.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/net/vmw_vsock/vsock.ko:
kernel/net/vmw_vsock/vmw_vsock_virtio_transport_common.ko: kernel/net/vmw_vsock/vsock.ko
kernel/net/vmw_vsock/vmw_vsock_virtio_transport.ko: kernel/net/vmw_vsock/vmw_vsock_virtio_transport_common.ko kernel/net/vmw_vsock/vsock.ko kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/block/virtio_blk.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/lib/libcrc32c.ko:
kernel/fs/erofs/erofs.ko: kernel/lib/libcrc32c.ko
`
	dep, err := moddep.Parse(strings.NewReader(image))
	if err != nil {
		t.Fatal(err)
	}
	names := func(paths []string) []string {
		var out []string
		for _, p := range paths {
			out = append(out, moddep.Name(p))
		}
		return out
	}
	for _, tc := range []struct {
		name        string
		now, skip   []string
		first, rest []string
	}{
		{
			name:  "serial",
			now:   []string{"virtio_pci", "virtio_console"},
			skip:  []string{"virtio_pci", "vmw_vsock_virtio_transport"},
			first: []string{"virtio_ring", "virtio", "virtio_pci_modern_dev", "virtio_pci_legacy_dev", "virtio_pci", "virtio_console"},
			rest:  []string{"libcrc32c", "erofs", "virtio_blk"},
		},
		{
			name:  "vsock",
			now:   []string{"virtio_pci", "vmw_vsock_virtio_transport"},
			skip:  []string{"virtio_pci", "virtio_console"},
			first: []string{"virtio_ring", "virtio", "virtio_pci_modern_dev", "virtio_pci_legacy_dev", "virtio_pci", "vsock", "vmw_vsock_virtio_transport_common", "vmw_vsock_virtio_transport"},
			rest:  []string{"libcrc32c", "erofs", "virtio_blk"},
		},
		{
			name:  "built-in channel",
			now:   []string{"virtio_pci", "hvc_console"},
			first: []string{"virtio_ring", "virtio", "virtio_pci_modern_dev", "virtio_pci_legacy_dev", "virtio_pci"},
			rest:  []string{"libcrc32c", "erofs", "virtio_blk", "virtio_console", "vsock", "vmw_vsock_virtio_transport_common", "vmw_vsock_virtio_transport"},
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			first, rest, err := plan(dep, tc.now, tc.skip)
			if err != nil {
				t.Fatal(err)
			}
			if got := names(first); !slices.Equal(got, tc.first) {
				t.Errorf("first %v, want %v", got, tc.first)
			}
			if got := names(rest); !slices.Equal(got, tc.rest) {
				t.Errorf("rest %v, want %v", got, tc.rest)
			}
		})
	}
}

func TestTimeline(t *testing.T) {
	var tl Timeline
	tl.MarkAt("main", 2100*time.Millisecond)
	tl.MarkAt("mounts", 2130*time.Millisecond)
	tl.MarkAt("exec", 1900*time.Millisecond)
	if got, want := tl.String(), "exec=1900 main=2100(+200) mounts=2130(+30)"; got != want {
		t.Errorf("got %q, want %q", got, want)
	}
}

func TestStaticNodes(t *testing.T) {
	if os.Getuid() != 0 {
		t.Skip("mknod needs root")
	}
	dir := t.TempDir()
	devname := filepath.Join(dir, "modules.devname")
	if err := os.WriteFile(devname, []byte("# Device nodes\ntun net/tun c10:200\nloop loop-control c10:237\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	dev := filepath.Join(dir, "dev")
	if err := os.MkdirAll(dev, 0o755); err != nil {
		t.Fatal(err)
	}
	// One node is there already: it is kept.
	if err := os.WriteFile(filepath.Join(dev, "loop-control"), nil, 0o600); err != nil {
		t.Fatal(err)
	}
	n, err := staticNodes(devname, dev)
	if err != nil || n != 1 {
		t.Fatalf("made %d, %v; want 1", n, err)
	}
	var st unix.Stat_t
	if err := unix.Stat(filepath.Join(dev, "net/tun"), &st); err != nil {
		t.Fatal(err)
	}
	if st.Mode&unix.S_IFMT != unix.S_IFCHR || unix.Major(st.Rdev) != 10 || unix.Minor(st.Rdev) != 200 || st.Mode&0o777 != 0o666 {
		t.Errorf("net/tun: mode %o rdev %d:%d", st.Mode, unix.Major(st.Rdev), unix.Minor(st.Rdev))
	}
	if n, err := staticNodes(filepath.Join(dir, "none"), dev); n != 0 || err != nil {
		t.Errorf("no modules.devname: %d, %v", n, err)
	}
}

func TestLinkModprobe(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "sbin", "modprobe")
	for i := 0; i < 2; i++ { // made, then found in place
		if err := linkModprobe(path, "/init"); err != nil {
			t.Fatalf("link %d: %v", i, err)
		}
		if to, err := os.Readlink(path); err != nil || to != "/init" {
			t.Fatalf("link %d: %q, %v; want /init", i, to, err)
		}
	}
	// Something else in its place is an error, not taken for the link.
	other := filepath.Join(dir, "other")
	if err := os.WriteFile(other, nil, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := linkModprobe(other, "/init"); err == nil {
		t.Error("a file in the link's place: no error")
	}
}

func TestAbsentDeviceModules(t *testing.T) {
	for _, tc := range []struct {
		name    string
		devices map[string]string // virtio device -> its "device" file
		want    []string
	}{
		{name: "no virtio bus", devices: nil, want: []string{"virtio_balloon", "virtio_rng", "virtiofs"}},
		{name: "console and disks", devices: map[string]string{"virtio0": "0x0003\n", "virtio1": "0x001b\n", "virtio2": "0x0002\n"},
			want: []string{"virtio_balloon", "virtio_rng", "virtiofs"}},
		{name: "balloon and shared fs", devices: map[string]string{"virtio0": "0x0003\n", "virtio1": "0x0005\n", "virtio2": "0x001a\n"},
			want: []string{"virtio_rng"}},
		{name: "all", devices: map[string]string{"virtio0": "0x0004\n", "virtio1": "0x0005\n", "virtio2": "0x001a\n"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := filepath.Join(t.TempDir(), "devices")
			for dev, id := range tc.devices {
				if err := os.MkdirAll(filepath.Join(dir, dev), 0o755); err != nil {
					t.Fatal(err)
				}
				if err := os.WriteFile(filepath.Join(dir, dev, "device"), []byte(id), 0o644); err != nil {
					t.Fatal(err)
				}
			}
			got, err := absentDeviceModules(dir)
			if err != nil || !slices.Equal(got, tc.want) {
				t.Errorf("got %v, %v; want %v", got, err, tc.want)
			}
		})
	}
	// A device whose id cannot be read is an error, not an absent device.
	dir := t.TempDir()
	if err := os.MkdirAll(filepath.Join(dir, "virtio0"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "virtio0", "device"), []byte("net\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := absentDeviceModules(dir); err == nil {
		t.Error("unreadable device id: no error")
	}
}
