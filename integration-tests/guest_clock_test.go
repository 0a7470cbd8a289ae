package integration

import (
	"fmt"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/caisson-containers/caisson/integration-tests/harness"
	"github.com/caisson-containers/caisson/shim/vmm/qemu/tsc"
)

// checkGuestTSC: a guest under TCG runs its clock on the host's TSC at the frequency
// the shim measured (tsc_early_khz), not at one it calibrated itself, which on a busy
// host was once 13.6 times too low (shim/vmm/qemu/tsc). The guest's command line has
// the parameter, and its kernel used it: /proc/cpuinfo's bogomips are the loops per
// jiffy the kernel derived from the TSC frequency it started from (khz*1000/HZ loops,
// shown as loops/(500000/HZ), so khz/500 with two decimals whatever HZ divides 1000),
// which a calibrated frequency matches only if it falls in the same 5 kHz. Under KVM the
// guest's clock is kvm-clock and its CPU model the host's: not checked.
func checkGuestTSC(t *testing.T, c *harness.CRI, id string) {
	t.Helper()
	out, errOut, code := c.Exec(t, id, "sh", "-c", "cat /proc/cmdline; grep -m1 '^model name' /proc/cpuinfo; grep -m1 '^bogomips' /proc/cpuinfo")
	if code != 0 {
		t.Fatalf("guest /proc/cmdline and /proc/cpuinfo: %q %s (exit %d)", out, errOut, code)
	}
	if !strings.Contains(out, "QEMU Virtual CPU") {
		return // KVM: the host's CPU model
	}
	khz, err := tsc.CachedKHz(filepath.Join(c.Config.StateDir, "probes"))
	if err != nil {
		t.Fatalf("the host's TSC frequency: %v", err)
	}
	if param := fmt.Sprintf("tsc_early_khz=%d", khz); !slices.Contains(strings.Fields(out), param) {
		t.Errorf("guest says %q, want %s on its command line", out, param)
	}
	if want := fmt.Sprintf("bogomips\t: %d.%02d\n", khz/500, khz/5%100); !strings.Contains(out, want) {
		t.Errorf("guest says %q, want %q (from the host's TSC of %d kHz)", out, want, khz)
	}
}
