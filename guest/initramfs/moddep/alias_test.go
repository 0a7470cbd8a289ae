package moddep

import (
	"errors"
	"slices"
	"strings"
	"testing"

	"github.com/containerd/errdefs"
)

func TestAliases(t *testing.T) {
	a, err := ParseAliases(strings.NewReader(`# Aliases extracted from modules themselves.
alias rtnl-link-bridge bridge
alias char-major-10-200 tun
alias devname:net/tun tun
alias pci:v00001AF4d00001005sv*sd*bc*sc*i* virtio-rng
alias fs-* catchall
alias rtnl-link-bridge other_bridge
alias net-pf-16-proto-12 nfnetlink
`))
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name string
		want []string
	}{
		{"rtnl-link-bridge", []string{"bridge", "other_bridge"}},
		{"char-major-10-200", []string{"tun"}},
		{"devname:net/tun", []string{"tun"}},
		{"pci:v00001AF4d00001005sv00001AF4sd00000004bc00scFFi00", []string{"virtio_rng"}},
		{"fs-overlay", []string{"catchall"}},
		{"rtnl-link-vlan", nil},
		{"net-pf-16-proto-1", nil},
	} {
		if got := a.Lookup(tc.name); !slices.Equal(got, tc.want) {
			t.Errorf("Lookup(%q) = %v, want %v", tc.name, got, tc.want)
		}
	}
	if _, err := ParseAliases(strings.NewReader("alias only-two\n")); !errors.Is(err, errdefs.ErrInvalidArgument) {
		t.Errorf("a short alias line: %v", err)
	}
}

func TestSoftdeps(t *testing.T) {
	if _, err := ParseSoftdeps(strings.NewReader("softdep\n")); !errors.Is(err, errdefs.ErrInvalidArgument) {
		t.Errorf("a softdep without a module: %v", err)
	}
	s, err := ParseSoftdeps(strings.NewReader("# comment\nsoftdep nfsd pre: crypto-md5\nsoftdep a-b pre: x y post: z\nsoftdep cifs gcm\n"))
	if err != nil {
		t.Fatal(err)
	}
	if d, ok := s["cifs"]; !ok || d.Pre != nil || d.Post != nil {
		t.Errorf("cifs, whose one module stands before pre: and post: (ignored): %+v", d)
	}
	if d := s["a_b"]; !slices.Equal(d.Pre, []string{"x", "y"}) || !slices.Equal(d.Post, []string{"z"}) {
		t.Errorf("a_b: %+v", d)
	}
	if d := s["nfsd"]; !slices.Equal(d.Pre, []string{"crypto-md5"}) || d.Post != nil {
		t.Errorf("nfsd: %+v", d)
	}
}

func TestBuiltinAndDevnames(t *testing.T) {
	b, err := ParseBuiltin(strings.NewReader("kernel/fs/binfmt_script.ko\nkernel/arch/x86/events/amd/amd-uncore.ko\n"))
	if err != nil || !b["binfmt_script"] || !b["amd_uncore"] || len(b) != 2 {
		t.Errorf("builtin: %v, %v", b, err)
	}
	d, err := ParseDevnames(strings.NewReader("# Device nodes\ntun net/tun c10:200\ndm-mod mapper/control c10:236\n"))
	if err != nil {
		t.Fatal(err)
	}
	want := []Devname{{"tun", "net/tun", 'c', 10, 200}, {"dm_mod", "mapper/control", 'c', 10, 236}}
	if !slices.Equal(d, want) {
		t.Errorf("devnames %+v, want %+v", d, want)
	}
	for _, bad := range []string{"tun net/tun x10:200\n", "tun ../etc/x c10:200\n", "tun /abs c1:2\n", "tun net/tun c10\n", "tun net/tun\n"} {
		if _, err := ParseDevnames(strings.NewReader(bad)); !errors.Is(err, errdefs.ErrInvalidArgument) {
			t.Errorf("%q: %v", bad, err)
		}
	}
}
