package config

import (
	"path/filepath"
	"strings"
	"testing"

	"github.com/containerd/errdefs"

	"github.com/caisson-containers/caisson/internal/testutil"
)

func TestDecode(t *testing.T) {
	for _, tc := range []struct {
		name    string
		toml    string
		want    Resolved
		wantErr string
	}{
		{
			name: "defaults",
			want: Resolved{Root: DefaultRoot, DefaultWritableSize: 10 << 30, LayerFilesystem: "erofs", DAXAlignment: 2 << 20},
		},
		{
			name: "all keys",
			toml: `root = "/srv/snap"
default_writable_size = "512MiB"
layer_filesystem = "ext4"
dax_alignment = "0"
mkfs_options = ["-T0"]
overlay_options = ["redirect_dir=on", "index=off", "volatile"]
mount_mode = "host"`,
			want: Resolved{Root: "/srv/snap", DefaultWritableSize: 512 << 20, LayerFilesystem: "ext4",
				MkfsOptions: []string{"-T0"}, OverlayOptions: []string{"redirect_dir=on", "index=off", "volatile"}, HostMounts: true},
		},
		{name: "template mounts", toml: `mount_mode = "template"`, want: Resolved{Root: DefaultRoot, DefaultWritableSize: 10 << 30, LayerFilesystem: "erofs", DAXAlignment: 2 << 20}},
		{name: "bad mount mode", toml: `mount_mode = "fuse"`, wantErr: `mount_mode "fuse": must be "template" (containerd 2.2 and later) or "host"`},
		{name: "unknown key", toml: "root = \"/x\"\nwritable_size = \"1GiB\"\n[extra]\nkey = 1", wantErr: `unknown configuration key "writable_size" (line 2, column 1), "extra"`},
		{name: "bad size", toml: `default_writable_size = "lots"`, wantErr: `default_writable_size "lots"`},
		{name: "small size", toml: `default_writable_size = "1MiB"`, wantErr: "16MiB minimum"},
		{name: "bad fs", toml: `layer_filesystem = "btrfs"`, wantErr: `layer_filesystem "btrfs"`},
		{name: "bad alignment", toml: `dax_alignment = "1000"`, wantErr: "multiple of 4KiB"},
		{name: "relative root", toml: `root = "snap"`, wantErr: "absolute"},
		{name: "overlay option the shim refuses", toml: `overlay_options = ["lowerdir=/etc"]`, wantErr: `"lowerdir=/etc" is not one of`},
		{name: "wrong type", toml: `mkfs_options = "-T0"`, wantErr: "decode"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c, err := Decode([]byte(tc.toml))
			var r Resolved
			if err == nil {
				r, err = c.Resolve()
			}
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) || !errdefs.IsInvalidArgument(err) {
					t.Fatalf("got %v, want an InvalidArgument error containing %q", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if r.Root != tc.want.Root || r.DefaultWritableSize != tc.want.DefaultWritableSize || r.LayerFilesystem != tc.want.LayerFilesystem ||
				r.DAXAlignment != tc.want.DAXAlignment || strings.Join(r.MkfsOptions, ",") != strings.Join(tc.want.MkfsOptions, ",") ||
				strings.Join(r.OverlayOptions, ",") != strings.Join(tc.want.OverlayOptions, ",") || r.HostMounts != tc.want.HostMounts {
				t.Fatalf("got %+v, want %+v", r, tc.want)
			}
		})
	}
}

// TestContribConfig loads the example config shipped in contrib/snapshotter, so
// that it cannot drift from what the code accepts.
func TestContribConfig(t *testing.T) {
	c, err := Load(filepath.Join(testutil.RepoRoot(t), "contrib", "snapshotter", "config.toml"))
	if err != nil {
		t.Fatal(err)
	}
	r, err := c.Resolve()
	if err != nil {
		t.Fatal(err)
	}
	if r.Root != DefaultRoot || r.LayerFilesystem != LayerEROFS || r.DAXAlignment != 2<<20 || r.DefaultWritableSize != 10<<30 {
		t.Fatalf("contrib config resolved to %+v; its comments say it holds the defaults", r)
	}
	if strings.Join(r.OverlayOptions, ",") != "redirect_dir=on" {
		t.Fatalf("overlay_options = %v", r.OverlayOptions)
	}
}
