package modprobe

import (
	"errors"
	"os"
	"path/filepath"
	"slices"
	"testing"

	"github.com/containerd/errdefs"
)

func writeTree(t *testing.T, files map[string]string) string {
	dir := t.TempDir()
	for name, content := range files {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return dir
}

func TestResolve(t *testing.T) {
	tree, err := Open(writeTree(t, map[string]string{
		"modules.dep": `kernel/net/llc/llc.ko:
kernel/net/802/stp.ko: kernel/net/llc/llc.ko
kernel/net/bridge/bridge.ko: kernel/net/802/stp.ko kernel/net/llc/llc.ko
kernel/drivers/net/tun.ko:
kernel/net/8021q/8021q.ko: kernel/net/802/stp.ko kernel/net/llc/llc.ko
`,
		"modules.alias": `alias rtnl-link-bridge bridge
alias char-major-10-200 tun
alias rtnl-link-vlan 8021q
alias fs-tmpfs tmpfs
alias rtnl-link-gone gone
`,
		"modules.builtin": "kernel/mm/tmpfs.ko\nkernel/fs/binfmt_script.ko\n",
	}))
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name    string
		want    []string
		wantErr error
	}{
		{name: "bridge", want: []string{"bridge"}},
		{name: "rtnl-link-bridge", want: []string{"bridge"}},
		{name: "char-major-10-200", want: []string{"tun"}},
		{name: "rtnl-link-vlan", want: []string{"8021q"}},
		{name: "binfmt-script"}, // built in
		{name: "fs-tmpfs"},      // an alias of a built-in module
		{name: "rtnl-link-nope", wantErr: errdefs.ErrNotFound},
		{name: "rtnl-link-gone", wantErr: errdefs.ErrNotFound}, // alias of a module not in the tree
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := tree.Resolve(tc.name)
			if tc.wantErr != nil {
				if !errors.Is(err, tc.wantErr) {
					t.Fatalf("err %v, want %v", err, tc.wantErr)
				}
				return
			}
			if err != nil || !slices.Equal(got, tc.want) {
				t.Fatalf("got %v, %v; want %v", got, err, tc.want)
			}
		})
	}
}

func TestOpenInitramfsTree(t *testing.T) {
	// The initramfs has a modules.dep only: its modules resolve, nothing else does.
	tree, err := Open(writeTree(t, map[string]string{"modules.dep": "kernel/fs/erofs/erofs.ko:\n"}))
	if err != nil {
		t.Fatal(err)
	}
	if got, err := tree.Resolve("erofs"); err != nil || !slices.Equal(got, []string{"erofs"}) {
		t.Errorf("erofs: %v, %v", got, err)
	}
	if _, err := tree.Resolve("rtnl-link-bridge"); !errdefs.IsNotFound(err) {
		t.Errorf("rtnl-link-bridge: %v", err)
	}
}

func TestMainUsage(t *testing.T) {
	for _, args := range [][]string{nil, {"-q"}, {"-r", "bridge"}, {"-q", "--"}} {
		if got := Main(args); got != 1 {
			t.Errorf("Main(%q) = %d, want 1", args, got)
		}
	}
}
