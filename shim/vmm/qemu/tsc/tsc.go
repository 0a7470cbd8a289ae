// Package tsc measures the host's TSC frequency, which a guest under TCG takes for its
// own: TCG's RDTSC returns the host's TSC, and the guest kernel, finding no frequency in
// CPUID (QEMU's TCG models give none), calibrates it against the emulated PIT and HPET.
// Under TCG on a busy host that calibration can be wrong many times over (a guest here
// took its 2.1 GHz TSC for 154 MHz, "PIT calibration deviates from HPET", so its clock
// ran 13.6 times too fast and every deadline in it expired at once), and the kernel keeps
// a wrong value: its later refinement only corrects errors under 1 %. Given the host's
// frequency (tsc_early_khz), the guest skips the calibration and refines that value.
package tsc

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/containerd/errdefs"
	"golang.org/x/sys/unix"
)

const (
	// samples are measured one after another; their median is the frequency.
	samples = 5
	// window is one sample's length: with readings bracketed within maxBracket, a
	// sample is off by at most 0.2 % (here the samples agreed within 0.02 %), well
	// inside the 1 % the guest's own refinement corrects.
	window = 10 * time.Millisecond
	// maxBracket bounds the host time around one TSC reading; a reading the scheduler
	// interrupted is taken again.
	maxBracket = 20 * time.Microsecond
	// spread bounds the samples' spread: a TSC that does not keep its rate for 50 ms
	// is not one to give a guest (the guest then calibrates as it would anyway).
	spread = 0.005
	// Plausible TSC frequencies, in kHz.
	minKHz, maxKHz = 100_000, 20_000_000
)

// ErrUnsupported is returned where the TSC cannot be read (not amd64).
var ErrUnsupported = fmt.Errorf("reading the TSC on this architecture: %w", errdefs.ErrNotImplemented)

// MeasureKHz measures the TSC's frequency against the host's CLOCK_MONOTONIC_RAW, in
// kHz, in about 50 ms.
func MeasureKHz() (uint64, error) {
	if !supported {
		return 0, ErrUnsupported
	}
	var khz []float64
	for range samples {
		t0, n0, err := reading()
		if err != nil {
			return 0, err
		}
		time.Sleep(window)
		t1, n1, err := reading()
		if err != nil {
			return 0, err
		}
		khz = append(khz, float64(t1-t0)/float64(n1-n0)*1e6)
	}
	slices.Sort(khz)
	med := khz[len(khz)/2]
	if lo, hi := khz[0], khz[len(khz)-1]; (hi-lo)/med > spread {
		return 0, fmt.Errorf("the TSC's rate varied from %.0f to %.0f kHz over %d samples of %v", lo, hi, samples, window)
	}
	if med < minKHz || med > maxKHz {
		return 0, fmt.Errorf("a TSC of %.0f kHz is not plausible", med)
	}
	return uint64(med + 0.5), nil
}

// reading is one TSC value with the host time it was read at (the middle of a bracket
// shorter than maxBracket).
func reading() (tsc uint64, ns int64, _ error) {
	for range 100 {
		a := monotonicRaw()
		tsc = rdtsc()
		b := monotonicRaw()
		if time.Duration(b-a) < maxBracket {
			return tsc, a + (b-a)/2, nil
		}
	}
	return 0, 0, fmt.Errorf("no TSC reading in 100 tries took less than %v", maxBracket)
}

func monotonicRaw() int64 {
	var ts unix.Timespec
	unix.ClockGettime(unix.CLOCK_MONOTONIC_RAW, &ts)
	return ts.Nano()
}

// cached is the file a measurement is kept in.
type cached struct {
	BootID string `json:"boot_id"`
	KHz    uint64 `json:"khz"`
}

// CachedKHz is MeasureKHz measured once per host boot: the first call keeps its result
// in dir and the next ones read it, so that every VM of a boot gets the same value and
// only the first pays the 50 ms. Shims that start at once take turns on a lock in dir.
// A file of another boot, or one that does not parse, is measured again.
func CachedKHz(dir string) (uint64, error) {
	boot, err := os.ReadFile("/proc/sys/kernel/random/boot_id")
	if err != nil {
		return 0, err
	}
	id := strings.TrimSpace(string(boot))
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return 0, err
	}
	lock, err := os.OpenFile(filepath.Join(dir, "tsc-khz.lock"), os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		return 0, err
	}
	defer lock.Close() // and with it the lock
	if err := unix.Flock(int(lock.Fd()), unix.LOCK_EX); err != nil {
		return 0, fmt.Errorf("lock %s: %w", lock.Name(), err)
	}
	path := filepath.Join(dir, "tsc-khz.json")
	if b, err := os.ReadFile(path); err == nil {
		var c cached
		if json.Unmarshal(b, &c) == nil && c.BootID == id && c.KHz >= minKHz && c.KHz <= maxKHz {
			return c.KHz, nil
		}
	} else if !errors.Is(err, os.ErrNotExist) {
		return 0, err
	}
	khz, err := MeasureKHz()
	if err != nil {
		return 0, err
	}
	// Written in place: every reader holds the lock, and a file a crash cut short does
	// not parse, so it is measured again.
	b, _ := json.Marshal(cached{BootID: id, KHz: khz})
	return khz, os.WriteFile(path, b, 0o600)
}
