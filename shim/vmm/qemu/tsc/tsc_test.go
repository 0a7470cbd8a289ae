package tsc

import (
	"encoding/json"
	"errors"
	"math"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
)

func TestMeasureKHz(t *testing.T) {
	a, err := MeasureKHz()
	if errors.Is(err, ErrUnsupported) {
		t.Skip(err)
	}
	if err != nil {
		t.Fatal(err)
	}
	b, err := MeasureKHz()
	if err != nil {
		t.Fatal(err)
	}
	if a < minKHz || a > maxKHz {
		t.Errorf("TSC %d kHz: not plausible", a)
	}
	if d := math.Abs(float64(a)-float64(b)) / float64(a); d > spread {
		t.Errorf("two measurements %d and %d kHz differ by %.2f %%", a, b, d*100)
	}
}

func TestCachedKHz(t *testing.T) {
	if !supported {
		t.Skip(ErrUnsupported)
	}
	boot, err := os.ReadFile("/proc/sys/kernel/random/boot_id")
	if err != nil {
		t.Skip(err)
	}
	id := strings.TrimSpace(string(boot))
	dir := filepath.Join(t.TempDir(), "probes")
	path := filepath.Join(dir, "tsc-khz.json")
	measured, err := CachedKHz(dir)
	if err != nil {
		t.Fatal(err)
	}
	var c cached
	if b, err := os.ReadFile(path); err != nil || json.Unmarshal(b, &c) != nil || c != (cached{BootID: id, KHz: measured}) {
		t.Fatalf("after the first call, %s holds %+v (%v), want this boot's %d kHz", path, c, err, measured)
	}
	const planted = 1_234_567 // not what the host measures: tells a read from a measurement
	for _, tc := range []struct {
		name, content string
		reads         bool
	}{
		{"this boot's value is read", `{"boot_id":"` + id + `","khz":1234567}`, true},
		{"another boot's is measured again", `{"boot_id":"x","khz":1234567}`, false},
		{"an implausible value is measured again", `{"boot_id":"` + id + `","khz":5}`, false},
		{"a file that does not parse is measured again", `{"boot_id":`, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if err := os.WriteFile(path, []byte(tc.content), 0o600); err != nil {
				t.Fatal(err)
			}
			got, err := CachedKHz(dir)
			if err != nil {
				t.Fatal(err)
			}
			if (got == planted) != tc.reads {
				t.Errorf("CachedKHz = %d with %s in the cache; read the cache: %v, want %v", got, tc.content, got == planted, tc.reads)
			}
		})
	}
	entries, _ := os.ReadDir(dir)
	if len(entries) != 2 {
		t.Errorf("cache dir holds %v, want only tsc-khz.json and its lock", entries)
	}
}

// TestCachedKHzAtOnce: VMs that start at once, the first of a boot, get one value.
func TestCachedKHzAtOnce(t *testing.T) {
	if !supported {
		t.Skip(ErrUnsupported)
	}
	dir := t.TempDir()
	got := make([]uint64, 8)
	var wg sync.WaitGroup
	for i := range got {
		wg.Go(func() {
			var err error
			if got[i], err = CachedKHz(dir); err != nil {
				t.Error(err)
			}
		})
	}
	wg.Wait()
	for _, k := range got[1:] {
		if k != got[0] {
			t.Fatalf("CachedKHz called at once gave %v, want one value", got)
		}
	}
}
