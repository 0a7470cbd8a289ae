package integration

import (
	"bytes"
	"fmt"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
	runtime "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/caisson-containers/caisson/integration-tests/harness"
	"github.com/caisson-containers/caisson/shim/podid"
)

// TestCRIBlockDevices: a raw block volume (a CRI container's devices, as the kubelet
// passes a volumeDevices PVC) backed by a host loop device. Written and read through
// with dd from the container at its container path, the data reaches the host file; a
// read-only one ("r") refuses writes and, in the VM, is a read-only disk; runc is the
// control. In the VM the device is a virtio-blk disk hot-plugged for the container and
// unplugged when it is removed: QEMU holds the host device only meanwhile, and the
// pod's other container sees the disk come and go.
func TestCRIBlockDevices(t *testing.T) {
	c := harness.StartCRI(t, harness.Options{})
	for _, handler := range []string{harness.RuncHandler, harness.Handler} {
		t.Run(handler, func(t *testing.T) {
			image := c.Pull(t, c.BusyboxRef, handler)
			loop, file := newLoopDevice(t)
			cfg := c.PodConfig("blockdev-"+handler, nil)
			podID := c.RunPod(t, cfg, handler)
			defer c.RemovePod(t, podID)
			vm := handler == harness.Handler
			watch := c.StartContainer(t, podID, cfg, harness.ContainerConfig("watch", image, "sleep", "3600"))
			disksBefore := partitions(t, c, watch)

			data := "caisson-raw-block-" + handler
			rw := harness.ContainerConfig("rw", image, "sleep", "3600")
			rw.Devices = []*runtime.Device{{ContainerPath: "/dev/xvdb", HostPath: loop, Permissions: "rwm"}}
			id := c.StartContainer(t, podID, cfg, rw)
			// The node has the container path and the host node's mode and owner.
			var st unix.Stat_t
			if err := unix.Stat(loop, &st); err != nil {
				t.Fatal(err)
			}
			want := fmt.Sprintf("block special file %o %d %d", st.Mode&0o7777, st.Uid, st.Gid)
			if out, _, _ := c.Exec(t, id, "stat", "-c", "%F %a %u %g", "/dev/xvdb"); strings.TrimSpace(out) != want {
				t.Errorf("/dev/xvdb in the container: %q, want %q", out, want)
			}
			writeDevice(t, c, id, "/dev/xvdb", data)
			if out := readDevice(t, c, id, "/dev/xvdb", len(data)); out != data {
				t.Errorf("read back through /dev/xvdb: %q, want %q", out, data)
			}
			if vm {
				if !qemuHolds(t, c, podID, loop) {
					t.Errorf("QEMU does not hold %s while the container uses it", loop)
				}
				disk := guestDisk(t, c, id, "/dev/xvdb")
				if readFile(t, c, id, "/sys/dev/block/"+disk+"/ro") != "0" {
					t.Errorf("the guest disk %s of a writable device is read-only", disk)
				}
				// A disk of its own, which the pod's other container sees in the VM.
				if name := partitionTable(t, c, watch)[disk]; name == "" || slices.Contains(disksBefore, name) {
					t.Errorf("the device's guest disk %s is not a new disk of the VM (%q; before: %v)", disk, name, disksBefore)
				}
			}
			removeContainer(t, c, id)
			if b := readHead(t, file, len(data)); b != data {
				t.Errorf("the host file after the container is removed starts with %q, want %q", b, data)
			}
			if vm {
				expectDetached(t, c, podID, watch, loop, disksBefore, "the container was removed")
			}

			ro := harness.ContainerConfig("ro", image, "sleep", "3600")
			ro.Devices = []*runtime.Device{{ContainerPath: "/dev/xvdb", HostPath: loop, Permissions: "r"}}
			id = c.StartContainer(t, podID, cfg, ro)
			if out := readDevice(t, c, id, "/dev/xvdb", len(data)); out != data {
				t.Errorf("read through a read-only /dev/xvdb: %q, want %q", out, data)
			}
			if out, errOut, code := c.Exec(t, id, "dd", "if=/dev/zero", "of=/dev/xvdb", "bs=512", "count=1"); code == 0 {
				t.Errorf("a write to a read-only /dev/xvdb succeeded: %s%s", out, errOut)
			} else {
				t.Logf("write to a read-only device: exit %d: %s", code, strings.TrimSpace(errOut))
			}
			if vm {
				if disk := guestDisk(t, c, id, "/dev/xvdb"); readFile(t, c, id, "/sys/dev/block/"+disk+"/ro") != "1" {
					t.Errorf("the guest disk %s of a read-only device is writable", disk)
				}
			}
			removeContainer(t, c, id)
			if b := readHead(t, file, len(data)); b != data {
				t.Errorf("the host file after the read-only container starts with %q, want %q", b, data)
			}
			if vm {
				expectDetached(t, c, podID, watch, loop, disksBefore, "the read-only container was removed")
			}
		})
	}
	if left := c.Leftovers(); len(left) > 0 {
		t.Errorf("left after the pods: %v", left)
	}
}

// TestCRIBlockDevicesBadInput: devices that cannot be passed fail CreateContainer (or,
// for runc, StartContainer) with an error naming them, and leave nothing behind: the
// VM has the disks it had and QEMU holds no host device, and the pod keeps running
// containers. runc is the control; the difference is a host character device other than
// the virtual ones the guest kernel has too, which runc passes and a VM cannot.
func TestCRIBlockDevicesBadInput(t *testing.T) {
	c := harness.StartCRI(t, harness.Options{})
	notDevice := filepath.Join(t.TempDir(), "not-a-device")
	if err := os.WriteFile(notDevice, []byte("data"), 0o644); err != nil {
		t.Fatal(err)
	}
	// A host character device no VM has: /dev/kvm where the host has it (the guest kernel
	// has no KVM driver loaded), else the loop devices' control node.
	char := "/dev/kvm"
	if _, err := os.Stat(char); err != nil {
		char = "/dev/loop-control"
	}
	var st unix.Stat_t
	if err := unix.Stat(char, &st); err != nil {
		t.Fatal(err)
	}
	charSays := fmt.Sprintf("device %s (char %d:%d) cannot be passed into a VM", char, unix.Major(st.Rdev), unix.Minor(st.Rdev))
	for _, handler := range []string{harness.RuncHandler, harness.Handler} {
		t.Run(handler, func(t *testing.T) {
			ctx := c.Ctx(t)
			image := c.Pull(t, c.BusyboxRef, handler)
			loop, _ := newLoopDevice(t)
			cfg := c.PodConfig("blockdev-bad-"+handler, nil)
			podID := c.RunPod(t, cfg, handler)
			defer c.RemovePod(t, podID)
			vm := handler == harness.Handler
			watch := c.StartContainer(t, podID, cfg, harness.ContainerConfig("watch", image, "sleep", "3600"))
			disksBefore := partitions(t, c, watch)
			for _, tc := range []struct {
				name    string
				devices []*runtime.Device
				cmd     []string
				words   []string
				// runcAccepts: the control runs the container.
				runcAccepts bool
			}{{
				name:    "not a device",
				devices: []*runtime.Device{{ContainerPath: "/dev/xvdb", HostPath: notDevice, Permissions: "rwm"}},
				words:   []string{notDevice, "not a device"},
			}, {
				name:        "char device no VM has",
				devices:     []*runtime.Device{{ContainerPath: char, HostPath: char, Permissions: "rwm"}},
				words:       []string{charSays},
				runcAccepts: true,
			}, {
				name: "a block device with a char device no VM has",
				devices: []*runtime.Device{
					{ContainerPath: "/dev/xvdb", HostPath: loop, Permissions: "rwm"},
					{ContainerPath: char, HostPath: char, Permissions: "rwm"},
				},
				words:       []string{charSays},
				runcAccepts: true,
			}, {
				// Fails in the guest, after the disk was hot-plugged.
				name:    "a block device for a command that does not exist",
				devices: []*runtime.Device{{ContainerPath: "/dev/xvdb", HostPath: loop, Permissions: "rwm"}},
				cmd:     []string{"/no/such/command"},
				words:   []string{"/no/such/command"},
			}} {
				t.Run(tc.name, func(t *testing.T) {
					cmd := tc.cmd
					if cmd == nil {
						cmd = []string{"sleep", "3600"}
					}
					cc := harness.ContainerConfig("bad", image, cmd...)
					cc.Devices = tc.devices
					id, err := c.CreateContainer(ctx, podID, cfg, cc)
					if err == nil {
						_, err = c.Runtime.StartContainer(ctx, &runtime.StartContainerRequest{ContainerId: id})
						c.Runtime.RemoveContainer(ctx, &runtime.RemoveContainerRequest{ContainerId: id})
					}
					if tc.runcAccepts && !vm {
						if err != nil {
							t.Errorf("runc refused it (%v): Caisson's refusal is no longer a difference", err)
						}
						return
					}
					expectSays(t, err, tc.words)
					if vm {
						expectDetached(t, c, podID, watch, loop, disksBefore, "the failure")
					}
				})
			}
			// The pod still runs a container, with the device.
			good := harness.ContainerConfig("good", image, "sleep", "3600")
			good.Devices = []*runtime.Device{{ContainerPath: "/dev/xvdb", HostPath: loop, Permissions: "r"}}
			id := c.StartContainer(t, podID, cfg, good)
			if out, errOut, code := c.Exec(t, id, "dd", "if=/dev/xvdb", "of=/dev/null", "bs=512", "count=1"); code != 0 {
				t.Errorf("read the device after the failures: exit %d: %s%s", code, out, errOut)
			}
		})
	}
	if left := c.Leftovers(); len(left) > 0 {
		t.Errorf("left after the pods: %v", left)
	}
}

// nohostdevHandler is the caisson runtime with containerd's privileged_without_host_devices.
const nohostdevHandler = "caisson-nohostdev"

// TestCRIPrivilegedDevices: a privileged container sees the devices of the machine it
// runs on. On runc (the control) that is the host: containerd adds every host device
// (its /dev/kvm and loop devices among them). In a Caisson VM it is the VM: the
// container has a node for each of the VM's disks (its layers' pmem and its writable
// disks, which the host does not have) and can read them (the device cgroup allows every
// device), and none of the host's devices the guest lacks, such as /dev/kvm. A raw block
// volume still reaches it at its container path. With containerd's
// privileged_without_host_devices, the privileged container gets neither the host's
// devices nor the VM's, only the standard ones, and still its volume.
func TestCRIPrivilegedDevices(t *testing.T) {
	c := harness.StartCRI(t, harness.Options{ContainerdConfig: func(cfg map[string]any) {
		runtimes := subMapOf(subMapOf(subMapOf(subMapOf(cfg, "plugins"), "io.containerd.cri.v1.runtime"), "containerd"), "runtimes")
		nohostdev := maps.Clone(subMapOf(runtimes, harness.Handler))
		nohostdev["privileged_without_host_devices"] = true
		runtimes[nohostdevHandler] = nohostdev
	}})
	hostHas := func(name string) bool { _, err := os.Stat(name); return err == nil }
	for _, handler := range []string{harness.RuncHandler, harness.Handler, nohostdevHandler} {
		t.Run(handler, func(t *testing.T) {
			image := c.Pull(t, c.BusyboxRef, handler)
			loop, _ := newLoopDevice(t)
			privileged := func(p *runtime.PodSandboxConfig) {
				p.Linux.SecurityContext = &runtime.LinuxSandboxSecurityContext{Privileged: true}
			}
			cfg := c.PodConfig("privileged-"+handler, privileged)
			podID := c.RunPod(t, cfg, handler)
			defer c.RemovePod(t, podID)
			cc := harness.ContainerConfig("priv", image, "sleep", "3600")
			cc.Linux.SecurityContext = &runtime.LinuxContainerSecurityContext{Privileged: true}
			cc.Devices = []*runtime.Device{{ContainerPath: "/dev/xvdb", HostPath: loop, Permissions: "rwm"}}
			id := c.StartContainer(t, podID, cfg, cc)

			devs := strings.Fields(execOK(t, c, id, "ls", "/dev"))
			disks := partitions(t, c, id) // the machine's: the host's for runc, the VM's for Caisson
			t.Logf("/dev: %v; disks: %v", devs, disks)
			hostLoop := filepath.Base(loop)
			switch handler {
			case harness.RuncHandler:
				if hostHas("/dev/kvm") && !slices.Contains(devs, "kvm") {
					t.Errorf("runc's privileged container has no /dev/kvm: %v", devs)
				}
				if !slices.Contains(devs, hostLoop) {
					t.Errorf("runc's privileged container has no /dev/%s: %v", hostLoop, devs)
				}
			case harness.Handler:
				if slices.Contains(devs, "kvm") {
					t.Errorf("the privileged container in a VM has the host's /dev/kvm: %v", devs)
				}
				if !slices.ContainsFunc(disks, func(d string) bool { return strings.HasPrefix(d, "pmem") || strings.HasPrefix(d, "vd") }) {
					t.Fatalf("the VM has no disks of its own in /proc/partitions: %v", disks)
				}
			case nohostdevHandler:
				if slices.Contains(devs, "kvm") || slices.Contains(devs, hostLoop) {
					t.Errorf("privileged_without_host_devices: the container has host devices: %v", devs)
				}
			}
			if handler != nohostdevHandler {
				// A node for each of the machine's disks, with its numbers, and it reads.
				for _, d := range disks {
					if !slices.Contains(devs, d) {
						t.Errorf("no /dev/%s in the privileged container", d)
						continue
					}
					if handler == harness.RuncHandler && !canRead("/dev/"+d) {
						// This test's own host may deny it the host's disks (its device
						// cgroup): runc's container cannot have more.
						t.Logf("the test cannot read the host's /dev/%s itself: not read through runc either", d)
						continue
					}
					if out, errOut, code := c.Exec(t, id, "dd", "if=/dev/"+d, "of=/dev/null", "bs=512", "count=1"); code != 0 {
						t.Errorf("read /dev/%s: exit %d: %s%s", d, code, out, errOut)
					}
				}
			} else {
				for _, d := range disks {
					if slices.Contains(devs, d) {
						t.Errorf("privileged_without_host_devices: the container has the VM's /dev/%s", d)
					}
				}
			}
			// The volume, at its container path.
			data := "privileged-" + handler
			writeDevice(t, c, id, "/dev/xvdb", data)
			if out := readDevice(t, c, id, "/dev/xvdb", len(data)); out != data {
				t.Errorf("read back through /dev/xvdb: %q, want %q", out, data)
			}
		})
	}
	if left := c.Leftovers(); len(left) > 0 {
		t.Errorf("left after the pods: %v", left)
	}
}

// canRead reports whether this process can open a host file for reading.
func canRead(path string) bool {
	f, err := os.Open(path)
	if err != nil {
		return false
	}
	f.Close()
	return true
}

// newLoopDevice attaches a loop device to a new 16 MiB file and returns the device and
// the file; the device is detached when the test ends.
func newLoopDevice(t *testing.T) (dev, file string) {
	t.Helper()
	file = filepath.Join(t.TempDir(), "disk.img")
	if err := os.WriteFile(file, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(file, 16<<20); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command("losetup", "--find", "--show", file).CombinedOutput()
	if err != nil {
		t.Fatalf("losetup: %v: %s", err, out)
	}
	dev = strings.TrimSpace(string(out))
	t.Cleanup(func() {
		if out, err := exec.Command("losetup", "-d", dev).CombinedOutput(); err != nil {
			t.Errorf("losetup -d %s: %v: %s", dev, err, out)
		}
	})
	return dev, file
}

// expectDetached fails the test unless the pod's VM has the disks it had before (as its
// container watch sees them) and its QEMU no longer holds the host device dev.
func expectDetached(t *testing.T, c *harness.CRI, podID, watch, dev string, before []string, after string) {
	t.Helper()
	if qemuHolds(t, c, podID, dev) {
		t.Errorf("QEMU still holds %s after %s", dev, after)
	}
	if now := partitions(t, c, watch); !slices.Equal(now, before) {
		t.Errorf("the VM's disks after %s: %v, before: %v", after, now, before)
	}
}

// writeDevice writes data (no shell metacharacters) at the start of a device in the
// container, synced to it.
func writeDevice(t *testing.T, c *harness.CRI, id, dev, data string) {
	t.Helper()
	execOK(t, c, id, "sh", "-c", fmt.Sprintf("printf %s | dd of=%s bs=512 count=1 conv=sync,fsync", data, dev))
}

// readDevice reads the first n bytes of a device in the container.
func readDevice(t *testing.T, c *harness.CRI, id, dev string, n int) string {
	t.Helper()
	return execOK(t, c, id, "sh", "-c", fmt.Sprintf("dd if=%s bs=512 count=1 2>/dev/null | head -c %d", dev, n))
}

// readHead reads the first n bytes of a host file.
func readHead(t *testing.T, file string, n int) string {
	t.Helper()
	b, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	return string(b[:min(n, len(b))])
}

// execOK runs cmd in the container and returns its stdout; it must succeed.
func execOK(t *testing.T, c *harness.CRI, id string, cmd ...string) string {
	t.Helper()
	out, errOut, code := c.Exec(t, id, cmd...)
	if code != 0 {
		t.Fatalf("%v: exit %d: %s%s", cmd, code, out, errOut)
	}
	return out
}

// readFile is a file's content in the container, trimmed.
func readFile(t *testing.T, c *harness.CRI, id, path string) string {
	t.Helper()
	return strings.TrimSpace(execOK(t, c, id, "cat", path))
}

// partitions are the disk names in /proc/partitions as the container sees it: the VM's
// in a Caisson pod, the host's under runc.
func partitions(t *testing.T, c *harness.CRI, id string) []string {
	t.Helper()
	names := slices.Collect(maps.Values(partitionTable(t, c, id)))
	slices.Sort(names)
	return names
}

// partitionTable is /proc/partitions in the container: the disk names by MAJ:MIN.
func partitionTable(t *testing.T, c *harness.CRI, id string) map[string]string {
	t.Helper()
	disks := map[string]string{}
	for _, line := range strings.Split(execOK(t, c, id, "cat", "/proc/partitions"), "\n") {
		if f := strings.Fields(line); len(f) == 4 && f[0] != "major" {
			disks[f[0]+":"+f[1]] = f[3]
		}
	}
	return disks
}

// guestDisk is the MAJ:MIN of a block device node in the container.
func guestDisk(t *testing.T, c *harness.CRI, id, node string) string {
	t.Helper()
	out := strings.TrimSpace(execOK(t, c, id, "stat", "-c", "%t %T", node))
	var major, minor uint32
	if _, err := fmt.Sscanf(out, "%x %x", &major, &minor); err != nil {
		t.Fatalf("stat %s: %q: %v", node, out, err)
	}
	return fmt.Sprintf("%d:%d", major, minor)
}

// qemuHolds reports whether the QEMU of the pod has the host file or device path open.
func qemuHolds(t *testing.T, c *harness.CRI, podID, path string) bool {
	t.Helper()
	dir := []byte(podid.StateDir(c.StateDir, "k8s.io", podID))
	entries, _ := os.ReadDir("/proc")
	found := false
	for _, en := range entries {
		b, err := os.ReadFile(filepath.Join("/proc", en.Name(), "cmdline"))
		if err != nil || !bytes.Contains(b, []byte("qemu")) || !bytes.Contains(b, dir) {
			continue
		}
		found = true
		fds, _ := os.ReadDir(filepath.Join("/proc", en.Name(), "fd"))
		for _, fd := range fds {
			if target, _ := os.Readlink(filepath.Join("/proc", en.Name(), "fd", fd.Name())); target == path {
				return true
			}
		}
	}
	if !found {
		t.Fatalf("no QEMU process of pod %s", podID)
	}
	return false
}

// subMapOf is m[key] as a table, made if missing.
func subMapOf(m map[string]any, key string) map[string]any {
	if s, ok := m[key].(map[string]any); ok {
		return s
	}
	s := map[string]any{}
	m[key] = s
	return s
}

// removeContainer stops and removes a container.
func removeContainer(t *testing.T, c *harness.CRI, id string) {
	t.Helper()
	ctx := c.Ctx(t)
	if _, err := c.Runtime.StopContainer(ctx, &runtime.StopContainerRequest{ContainerId: id}); err != nil {
		t.Errorf("StopContainer %s: %v", id, err)
	}
	if _, err := c.Runtime.RemoveContainer(ctx, &runtime.RemoveContainerRequest{ContainerId: id}); err != nil {
		t.Errorf("RemoveContainer %s: %v", id, err)
	}
}
