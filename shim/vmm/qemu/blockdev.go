package qemu

import "os"

// fileDriver is the QEMU protocol driver for a disk's host path: "host_device" for a
// block device (a raw block volume passed to a container), which QEMU's "file" driver
// refuses ("'file' driver requires '/dev/loop0' to be a regular file"); "file" for
// anything else, including a path that does not exist yet (checkDisk reports that).
func fileDriver(path string) string {
	if st, err := os.Stat(path); err == nil && st.Mode().Type() == os.ModeDevice {
		return "host_device"
	}
	return "file"
}
