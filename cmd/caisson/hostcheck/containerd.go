package hostcheck

import (
	"context"
	"errors"
	"fmt"
	"os"
	"time"

	versionapi "github.com/containerd/containerd/api/services/version/v1"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/protobuf/types/known/emptypb"

	snapconfig "github.com/caisson-containers/caisson/snapshotter/config"
)

// containerdStatus says whether the containerd at address can run Caisson with the
// snapshotter configured in snapshotterConfig (docs/compat.md): containerd 1.7 to 2.1
// mount a container's rootfs on the host themselves and need the snapshotter's
// mount_mode "host"; 2.2 and later work with the default, "template".
func containerdStatus(ctx context.Context, address, snapshotterConfig string) Result {
	r := Result{Item: "containerd"}
	version, err := containerdVersion(ctx, address)
	if err != nil {
		r.Status, r.Detail = Absent, fmt.Sprintf("none answers at %s (%v); Caisson works with containerd 1.7 to 2.4", address, err)
		return r
	}
	var major, minor int
	if _, err := fmt.Sscanf(version, "v%d.%d", &major, &minor); err != nil {
		fmt.Sscanf(version, "%d.%d", &major, &minor)
	}
	older := func(ma, mi int) bool { return major < ma || major == ma && minor < mi }
	if major == 0 || older(1, 7) {
		r.Status, r.Detail = Fail, fmt.Sprintf("%s at %s: Caisson needs containerd 1.7 or later", version, address)
		return r
	}
	want := snapconfig.MountsTemplate
	if older(2, 2) {
		want = snapconfig.MountsHost
	}
	mode, err := snapshotterMountMode(snapshotterConfig)
	switch {
	case err != nil:
		r.Status, r.Detail = Warn, fmt.Sprintf("%s at %s needs the snapshotter's mount_mode = %q; its configuration %s: %v", version, address, want, snapshotterConfig, err)
	case mode == want:
		r.Status, r.Detail = OK, fmt.Sprintf("%s at %s, snapshotter mount_mode %q (docs/compat.md)", version, address, mode)
	case want == snapconfig.MountsHost:
		r.Status, r.Detail = Fail, fmt.Sprintf("%s at %s mounts a container's rootfs on the host itself, which the snapshotter's mount_mode %q cannot give it: "+
			"set mount_mode = \"host\" in %s (docs/compat.md)", version, address, mode, snapshotterConfig)
	default:
		r.Status, r.Detail = Warn, fmt.Sprintf("%s at %s works with mount_mode %q, but %s keeps every layer mounted on the host: \"template\" mounts none (docs/compat.md)",
			version, address, want, snapshotterConfig)
	}
	return r
}

func containerdVersion(ctx context.Context, address string) (string, error) {
	if _, err := os.Stat(address); err != nil {
		return "", err
	}
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	conn, err := grpc.NewClient("unix://"+address, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return "", err
	}
	defer conn.Close()
	v, err := versionapi.NewVersionClient(conn).Version(ctx, &emptypb.Empty{})
	if err != nil {
		return "", err
	}
	return v.GetVersion(), nil
}

// snapshotterMountMode is the mount_mode of the snapshotter configuration at path
// (the default when the file does not exist, as caisson-snapshotter does).
func snapshotterMountMode(path string) (string, error) {
	c, err := snapconfig.Load(path)
	if errors.Is(err, os.ErrNotExist) {
		return snapconfig.DefaultMountMode, nil
	}
	if err != nil {
		return "", err
	}
	if c.MountMode == "" {
		return snapconfig.DefaultMountMode, nil
	}
	return c.MountMode, nil
}
