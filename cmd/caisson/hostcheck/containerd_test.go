package hostcheck

import (
	"context"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"

	versionapi "github.com/containerd/containerd/api/services/version/v1"
	"google.golang.org/grpc"
	"google.golang.org/protobuf/types/known/emptypb"
)

type fakeVersion struct {
	versionapi.UnimplementedVersionServer
	version string
}

func (f fakeVersion) Version(context.Context, *emptypb.Empty) (*versionapi.VersionResponse, error) {
	return &versionapi.VersionResponse{Version: f.version}, nil
}

// serveVersion is a containerd that answers only its version.
func serveVersion(t *testing.T, version string) string {
	t.Helper()
	sock := filepath.Join(t.TempDir(), "containerd.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	s := grpc.NewServer()
	versionapi.RegisterVersionServer(s, fakeVersion{version: version})
	go s.Serve(l)
	t.Cleanup(s.Stop)
	return sock
}

func TestContainerdStatus(t *testing.T) {
	dir := t.TempDir()
	host := filepath.Join(dir, "host.toml")
	os.WriteFile(host, []byte("mount_mode = \"host\"\n"), 0o644)
	template := filepath.Join(dir, "template.toml")
	os.WriteFile(template, []byte("root = \"/var/lib/containerd/io.containerd.snapshotter.v1.caisson\"\n"), 0o644)
	bad := filepath.Join(dir, "bad.toml")
	os.WriteFile(bad, []byte("mount_mod = \"host\"\n"), 0o644)
	missing := filepath.Join(dir, "missing.toml") // defaults: template
	for _, tc := range []struct {
		name, version, config string
		want                  Status
		says                  string
	}{
		{"1.7 with host mounts", "v1.7.29", host, OK, `mount_mode "host"`},
		{"1.7 with template mounts", "v1.7.29", template, Fail, `set mount_mode = "host" in ` + template},
		{"2.1 with the default", "v2.1.6", missing, Fail, `set mount_mode = "host"`},
		{"2.2 with template mounts", "v2.2.9", template, OK, `mount_mode "template"`},
		{"2.4 with host mounts", "v2.4.2", host, Warn, "keeps every layer mounted on the host"},
		{"1.6", "v1.6.36", host, Fail, "needs containerd 1.7 or later"},
		{"a bad snapshotter config", "v2.4.2", bad, Warn, "mount_mod"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := containerdStatus(context.Background(), serveVersion(t, tc.version), tc.config)
			if r.Status != tc.want || !strings.Contains(r.Detail, tc.says) {
				t.Errorf("%s %q; want %s saying %q", r.Status, r.Detail, tc.want, tc.says)
			}
		})
	}
	r := containerdStatus(context.Background(), filepath.Join(dir, "nothing.sock"), host)
	if r.Status != Absent || !strings.Contains(r.Detail, "none answers") {
		t.Errorf("no containerd: %s %q", r.Status, r.Detail)
	}
}
