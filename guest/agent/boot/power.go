package boot

import (
	"bufio"
	"context"
	"os"
	"strings"

	"github.com/containerd/log"
	"golang.org/x/sys/unix"
)

// PowerOff syncs the filesystems, unmounts everything it can (innermost first), and
// powers the VM off. It returns only if the reboot system call fails.
func PowerOff(ctx context.Context) error {
	unix.Sync()
	UnmountAll(ctx)
	unix.Sync()
	return unix.Reboot(unix.LINUX_REBOOT_CMD_POWER_OFF)
}

// UnmountAll unmounts every mount of the mount namespace except the base ones, in the
// reverse of /proc/mounts order, so that the writable ext4 layers are clean.
func UnmountAll(ctx context.Context) {
	f, err := os.Open("/proc/self/mounts")
	if err != nil {
		return
	}
	var targets []string
	s := bufio.NewScanner(f)
	for s.Scan() {
		fields := strings.Fields(s.Text())
		if len(fields) < 2 {
			continue
		}
		targets = append(targets, unescapeMount(fields[1]))
	}
	f.Close()
	base := map[string]bool{"/": true}
	for _, m := range baseMounts {
		base[m.target] = true
	}
	for i := len(targets) - 1; i >= 0; i-- {
		if base[targets[i]] {
			continue
		}
		if err := unix.Unmount(targets[i], 0); err != nil {
			log.G(ctx).WithError(err).WithField("target", targets[i]).Warn("unmount at power-off; detaching")
			_ = unix.Unmount(targets[i], unix.MNT_DETACH)
		}
	}
}

// unescapeMount undoes the octal escapes (\040 for a space) of /proc/mounts fields.
func unescapeMount(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			v := (int(s[i+1]-'0') << 6) | (int(s[i+2]-'0') << 3) | int(s[i+3]-'0')
			b.WriteByte(byte(v))
			i += 3
			continue
		}
		b.WriteByte(s[i])
	}
	return b.String()
}
