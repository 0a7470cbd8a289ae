package accel

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
)

// Cache remembers probe results in a directory for the current host boot: a
// result is keyed by the boot id and by the size and modification time of the
// binaries involved, so a reboot, a QEMU upgrade or a new kernel probes again.
// A nil *Cache remembers nothing.
type Cache struct {
	Dir string
}

type cached struct {
	Usable bool   `json:"usable"`
	Reason string `json:"reason,omitempty"`
}

func (c *Cache) remember(what string, files []string, probe func() error) error {
	if c == nil || c.Dir == "" {
		return probe()
	}
	path := filepath.Join(c.Dir, "probe-"+what+"-"+fingerprint(files)+".json")
	if b, err := os.ReadFile(path); err == nil {
		var r cached
		if json.Unmarshal(b, &r) == nil {
			if r.Usable {
				return nil
			}
			return fmt.Errorf("%s (cached in %s)", r.Reason, path)
		}
	}
	err := probe()
	r := cached{Usable: err == nil}
	if err != nil {
		r.Reason = err.Error()
	}
	if os.MkdirAll(c.Dir, 0o700) == nil {
		b, _ := json.Marshal(r)
		tmp := path + ".tmp"
		if os.WriteFile(tmp, b, 0o600) == nil {
			os.Rename(tmp, path)
		}
	}
	return err
}

func fingerprint(files []string) string {
	h := sha256.New()
	boot, _ := os.ReadFile("/proc/sys/kernel/random/boot_id")
	h.Write([]byte(strings.TrimSpace(string(boot))))
	for _, f := range files {
		fmt.Fprintf(h, "\x00%s", f)
		if st, err := os.Stat(f); err == nil {
			fmt.Fprintf(h, ":%d:%d", st.Size(), st.ModTime().UnixNano())
		} else if !errors.Is(err, os.ErrNotExist) {
			fmt.Fprintf(h, ":%v", err)
		}
	}
	return hex.EncodeToString(h.Sum(nil))[:16]
}
