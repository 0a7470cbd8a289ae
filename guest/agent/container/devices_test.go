package container

import (
	"path/filepath"
	"reflect"
	"testing"

	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"
)

func TestUseBlockDevices(t *testing.T) {
	dir := t.TempDir()
	node := func(name string, major, minor uint32) string {
		p := filepath.Join(dir, name)
		if err := unix.Mknod(p, unix.S_IFBLK|0o600, int(unix.Mkdev(major, minor))); err != nil {
			t.Skipf("mknod needs CAP_MKNOD: %v", err)
		}
		return p
	}
	vda := node("vda", 254, 16)
	// The second guest disk has the first host device's numbers: its rule must not be
	// rewritten twice.
	vdb := node("vdb", 7, 0)
	i64 := func(v int64) *int64 { return &v }
	rule := func(typ string, major, minor int64, access string) specs.LinuxDeviceCgroup {
		return specs.LinuxDeviceCgroup{Allow: true, Type: typ, Major: i64(major), Minor: i64(minor), Access: access}
	}
	spec := &specs.Spec{Linux: &specs.Linux{
		Devices: []specs.LinuxDevice{
			{Path: "/dev/null", Type: "c", Major: 1, Minor: 3},
			{Path: "/dev/xvdb", Type: "b", Major: 7, Minor: 0},
			{Path: "/dev/xvdc", Type: "b", Major: 7, Minor: 1},
		},
		Resources: &specs.LinuxResources{Devices: []specs.LinuxDeviceCgroup{
			{Allow: false, Access: "rwm"}, rule("c", 1, 3, "rwm"), rule("b", 7, 0, "rw"), rule("b", 7, 1, "r"),
		}},
	}}
	if err := UseBlockDevices(spec, []BlockDevice{{Index: 1, Node: vda}, {Index: 2, Node: vdb}}); err != nil {
		t.Fatal(err)
	}
	var got [][2]int64
	for _, d := range spec.Linux.Devices {
		got = append(got, [2]int64{d.Major, d.Minor})
	}
	if want := [][2]int64{{1, 3}, {254, 16}, {7, 0}}; !reflect.DeepEqual(got, want) {
		t.Errorf("device numbers %v, want %v", got, want)
	}
	want := []specs.LinuxDeviceCgroup{{Allow: false, Access: "rwm"}, rule("c", 1, 3, "rwm"), rule("b", 254, 16, "rw"), rule("b", 7, 0, "r")}
	if !reflect.DeepEqual(spec.Linux.Resources.Devices, want) {
		t.Errorf("rules %+v, want %+v", spec.Linux.Resources.Devices, want)
	}

	for name, devs := range map[string][]BlockDevice{
		"index out of range": {{Index: 3, Node: vda}},
		"not a block entry":  {{Index: 0, Node: vda}},
		"node is not a disk": {{Index: 1, Node: dir}},
	} {
		if err := UseBlockDevices(spec, devs); err == nil {
			t.Errorf("%s: no error", name)
		}
	}
}
