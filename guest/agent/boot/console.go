package boot

import (
	"os"

	"golang.org/x/sys/unix"
)

// AttachConsole makes /dev/console the agent's stdin, stdout and stderr. The kernel opens
// it for init only if the initramfs has a /dev/console node; ours has no device nodes,
// so the agent does it once devtmpfs is mounted. Everything the agent logs goes there:
// the serial console the shim records.
func AttachConsole() error {
	f, err := os.OpenFile("/dev/console", os.O_RDWR|unix.O_NOCTTY, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	for fd := 0; fd <= 2; fd++ {
		if err := unix.Dup3(int(f.Fd()), fd, 0); err != nil {
			return err
		}
	}
	return nil
}
