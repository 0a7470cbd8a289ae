package boot

import (
	"context"
	"maps"
	"testing"
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
	m, err := LoadModules(ctx, t.TempDir(), []string{"virtio_console"})
	if err != nil {
		t.Fatal(err)
	}
	if err := m.Wait(ctx); err != nil || m.n != 0 {
		t.Fatalf("a kernel with everything built in: %d, %v", m.n, err)
	}
}

func TestModuleName(t *testing.T) {
	for in, want := range map[string]string{
		"kernel/drivers/char/hw_random/virtio-rng.ko": "virtio_rng",
		"kernel/fs/erofs/erofs.ko.xz":                 "erofs",
	} {
		if got := moduleName(in); got != want {
			t.Errorf("moduleName(%q) = %q, want %q", in, got, want)
		}
	}
}
