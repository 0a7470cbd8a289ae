package task

import (
	"errors"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	"github.com/containerd/errdefs"
	"github.com/opencontainers/runtime-spec/specs-go"

	"github.com/caisson-containers/caisson/shim/pod"
)

func TestGuestDevices(t *testing.T) {
	if _, err := os.Stat("/dev/null"); err != nil {
		t.Skip("no /dev/null on this host")
	}
	sys := t.TempDir()
	for class, devs := range map[string]map[string]string{
		"block": {"7:0": "loop0", "7:1": "loop1"},
		"char":  {"10:232": "kvm", "1:3": "null"},
	} {
		for num, name := range devs {
			dir := filepath.Join(sys, class, num)
			if err := os.MkdirAll(dir, 0o755); err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(filepath.Join(dir, "uevent"), []byte("MAJOR=x\nDEVNAME="+name+"\n"), 0o644); err != nil {
				t.Fatal(err)
			}
		}
	}
	// loop1 has no file: size 0.
	if err := os.WriteFile(filepath.Join(sys, "block", "7:1", "size"), []byte("0\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	h := deviceHost{SysDev: sys}
	i64 := func(v int64) *int64 { return &v }
	denyAll := specs.LinuxDeviceCgroup{Allow: false, Access: "rwm"}
	allowAll := specs.LinuxDeviceCgroup{Allow: true, Access: "rwm"}
	allow := func(typ string, major, minor int64, access string) specs.LinuxDeviceCgroup {
		return specs.LinuxDeviceCgroup{Allow: true, Type: typ, Major: i64(major), Minor: i64(minor), Access: access}
	}
	xvdb := specs.LinuxDevice{Path: "/dev/xvdb", Type: "b", Major: 7, Minor: 0}
	null := specs.LinuxDevice{Path: "/dev/null", Type: "c", Major: 1, Minor: 3}

	for _, tc := range []struct {
		name    string
		devices []specs.LinuxDevice
		rules   []specs.LinuxDeviceCgroup
		// want are the paths left in the guest spec.
		want         []string
		blocks       []pod.BlockDevice
		guestDevices bool
		err          error
		says         string
	}{{
		name: "no devices",
	}, {
		name:    "standard char device stays",
		devices: []specs.LinuxDevice{{Path: "/dev/mynull", Type: "c", Major: 1, Minor: 3}},
		rules:   []specs.LinuxDeviceCgroup{denyAll, allow("c", 1, 3, "rwm")},
		want:    []string{"/dev/mynull"},
	}, {
		name:    "other char device refused by name",
		devices: []specs.LinuxDevice{{Path: "/dev/kvm", Type: "c", Major: 10, Minor: 232}},
		rules:   []specs.LinuxDeviceCgroup{denyAll, allow("c", 10, 232, "rwm")},
		err:     errdefs.ErrInvalidArgument,
		says:    "device /dev/kvm (char 10:232) cannot be passed into a VM",
	}, {
		name:    "char device at another path names the host's",
		devices: []specs.LinuxDevice{{Path: "/dev/accel", Type: "c", Major: 10, Minor: 232}},
		err:     errdefs.ErrInvalidArgument,
		says:    "device /dev/accel (char 10:232, the host's /dev/kvm) cannot be passed",
	}, {
		name:    "writable block device",
		devices: []specs.LinuxDevice{xvdb},
		rules:   []specs.LinuxDeviceCgroup{denyAll, allow("b", 7, 0, "rwm")},
		want:    []string{"/dev/xvdb"},
		blocks:  []pod.BlockDevice{{Index: 0, Path: "/dev/loop0"}},
	}, {
		name:    "read-only block device",
		devices: []specs.LinuxDevice{xvdb},
		rules:   []specs.LinuxDeviceCgroup{denyAll, allow("b", 7, 0, "r")},
		want:    []string{"/dev/xvdb"},
		blocks:  []pod.BlockDevice{{Index: 0, Path: "/dev/loop0", ReadOnly: true}},
	}, {
		name:    "a later deny of writes makes it read-only",
		devices: []specs.LinuxDevice{xvdb},
		rules:   []specs.LinuxDeviceCgroup{denyAll, allow("b", 7, 0, "rwm"), {Allow: false, Type: "b", Access: "w"}},
		want:    []string{"/dev/xvdb"},
		blocks:  []pod.BlockDevice{{Index: 0, Path: "/dev/loop0", ReadOnly: true}},
	}, {
		name:    "block device the host does not have",
		devices: []specs.LinuxDevice{{Path: "/dev/xvdc", Type: "b", Major: 7, Minor: 99}},
		err:     errdefs.ErrNotFound,
		says:    "device /dev/xvdc (block 7:99)",
	}, {
		name:    "block device without media",
		devices: []specs.LinuxDevice{{Path: "/dev/xvdc", Type: "b", Major: 7, Minor: 1}},
		err:     errdefs.ErrFailedPrecondition,
		says:    "device /dev/xvdc (block 7:1, the host's /dev/loop1) has no media",
	}, {
		name:         "privileged: the host's devices go, the asked-for one stays",
		devices:      []specs.LinuxDevice{{Path: "/dev/mynull", Type: "c", Major: 1, Minor: 3}, xvdb, null},
		rules:        []specs.LinuxDeviceCgroup{denyAll, allowAll},
		want:         []string{"/dev/mynull", "/dev/xvdb"},
		blocks:       []pod.BlockDevice{{Index: 1, Path: "/dev/loop0"}},
		guestDevices: true,
	}, {
		name:         "privileged: a device asked for at its host path comes twice, once stays",
		devices:      []specs.LinuxDevice{null, null},
		rules:        []specs.LinuxDeviceCgroup{denyAll, allowAll},
		want:         []string{"/dev/null"},
		guestDevices: true,
	}, {
		name:    "privileged without host devices: nothing is the host's",
		devices: []specs.LinuxDevice{xvdb},
		rules:   []specs.LinuxDeviceCgroup{denyAll, allowAll},
		want:    []string{"/dev/xvdb"},
		blocks:  []pod.BlockDevice{{Index: 0, Path: "/dev/loop0"}},
	}, {
		name:    "host devices without every device allowed are not privileged",
		devices: []specs.LinuxDevice{null},
		rules:   []specs.LinuxDeviceCgroup{denyAll, allow("c", 1, 3, "rwm")},
		want:    []string{"/dev/null"},
	}} {
		t.Run(tc.name, func(t *testing.T) {
			g := &specs.Spec{Linux: &specs.Linux{Devices: tc.devices, Resources: &specs.LinuxResources{Devices: tc.rules}}}
			orig := append([]specs.LinuxDevice(nil), tc.devices...)
			plan, err := h.guestDevices(g)
			if tc.err != nil {
				if !errors.Is(err, tc.err) || !strings.Contains(err.Error(), tc.says) {
					t.Fatalf("error %v, want %v saying %q", err, tc.err, tc.says)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			var paths []string
			for _, d := range g.Linux.Devices {
				paths = append(paths, d.Path)
			}
			if !reflect.DeepEqual(paths, tc.want) || !reflect.DeepEqual(plan.blocks, tc.blocks) || plan.guestDevices != tc.guestDevices {
				t.Errorf("devices %v, blocks %+v, guest devices %v; want %v, %+v, %v", paths, plan.blocks, plan.guestDevices, tc.want, tc.blocks, tc.guestDevices)
			}
			if !reflect.DeepEqual(tc.devices, orig) {
				t.Errorf("the host spec's devices changed: %v", tc.devices)
			}
		})
	}
}
