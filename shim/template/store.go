package template

import (
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/caisson-containers/caisson/shim/vmm"
)

// Info describes a template in the store.
type Info struct {
	Dir       string
	Kernel    string
	Initramfs string
	VCPUs     int
	MemoryMiB int
	Made      time.Time
	// Resident is how much host memory its memory file holds (a tmpfs file is sparse
	// until written).
	Resident int64
}

// List returns the templates under root.
func List(root string) ([]Info, error) {
	entries, err := os.ReadDir(root)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var out []Info
	for _, e := range entries {
		if !e.IsDir() || strings.HasSuffix(e.Name(), ".tmp") {
			continue
		}
		dir := filepath.Join(root, e.Name())
		b, err := os.ReadFile(filepath.Join(dir, "shape.json"))
		if err != nil {
			continue
		}
		var sh shape
		if err := json.Unmarshal(b, &sh); err != nil {
			continue
		}
		st, err := os.Stat(filepath.Join(dir, vmm.TemplateState))
		if err != nil {
			continue
		}
		info := Info{Dir: dir, Kernel: sh.Kernel.Path, Initramfs: sh.Initramfs.Path, VCPUs: sh.VCPUs, MemoryMiB: sh.MemoryMiB, Made: st.ModTime()}
		if mst, err := os.Stat(filepath.Join(dir, vmm.TemplateMemory)); err == nil {
			if sys, ok := mst.Sys().(*syscall.Stat_t); ok {
				info.Resident = sys.Blocks * 512
			}
		}
		out = append(out, info)
	}
	return out, nil
}

// RemoveAll removes every template under root. VMs made from them keep running: they hold
// their mapping of the memory file. A template some shim is making right now is left, and
// returned in busy. The (empty) lock files stay: removing a lock file another process may
// have open would let two processes make one template at once.
func RemoveAll(root string) (busy []string, err error) {
	entries, err := os.ReadDir(root)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	for _, e := range entries {
		name, ok := strings.CutSuffix(e.Name(), ".lock")
		if !ok {
			continue
		}
		lock, err := os.OpenFile(filepath.Join(root, e.Name()), os.O_RDWR, 0)
		if err != nil {
			continue
		}
		if err := unix.Flock(int(lock.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
			lock.Close()
			busy = append(busy, filepath.Join(root, name))
			continue
		}
		rerr := errors.Join(os.RemoveAll(filepath.Join(root, name)), os.RemoveAll(filepath.Join(root, name+".tmp")))
		lock.Close()
		if rerr != nil {
			return busy, rerr
		}
	}
	return busy, nil
}
