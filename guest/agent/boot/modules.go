package boot

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/containerd/log"
	"golang.org/x/sys/unix"
)

// ModulesDir is where the initramfs keeps the modules of the running kernel.
func ModulesDir() (string, error) {
	var u unix.Utsname
	if err := unix.Uname(&u); err != nil {
		return "", err
	}
	return filepath.Join("/lib/modules", unix.ByteSliceToString(u.Release[:])), nil
}

// LoadModules loads, in order, the modules listed in dir/modules.load (paths relative to
// dir, dependencies first, as the initramfs builder writes them). A module that is
// already loaded is not an error. It returns how many modules it loaded.
func LoadModules(ctx context.Context, dir string) (int, error) {
	f, err := os.Open(filepath.Join(dir, "modules.load"))
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return 0, nil // a kernel with everything built in
		}
		return 0, err
	}
	defer f.Close()
	n := 0
	s := bufio.NewScanner(f)
	for s.Scan() {
		rel := strings.TrimSpace(s.Text())
		if rel == "" {
			continue
		}
		if err := loadModule(filepath.Join(dir, rel)); err != nil {
			return n, err
		}
		n++
	}
	if err := s.Err(); err != nil {
		return n, err
	}
	log.G(ctx).WithField("count", n).Debug("kernel modules loaded")
	return n, nil
}

func loadModule(path string) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	if err := unix.FinitModule(int(f.Fd()), "", 0); err != nil && !errors.Is(err, unix.EEXIST) {
		return fmt.Errorf("load module %s: %w", filepath.Base(path), err)
	}
	return nil
}
