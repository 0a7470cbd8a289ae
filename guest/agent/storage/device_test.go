package storage

import (
	"regexp"
	"testing"
)

// The matchers agree with the patterns they replace, on valid and near-miss names.
func TestPCIMatchers(t *testing.T) {
	addr := regexp.MustCompile(`^[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]$`)
	slot := regexp.MustCompile(`^[0-9a-f]{2}\.[0-7]$`)
	for _, s := range []string{
		"0000:00:02.0", "0000:01:1f.7", "abcd:ef:09.3", "0000:00:02.8", "0000:00:02.", "0000:00:2.0",
		"0000:00:02.00", "000:00:02.0", "0000-00:02.0", "0000:00-02.0", "0000:00:02,0", "0000:0g:02.0",
		"0000:00:0A.0", "", "02.0", "1f.7", "ff.0", "02.8", "2.0", "02.", "g2.0", "02-0", "0A.0", "02.0/00.0",
		"pci0000:00", "block", "0000:00:02.0:1",
	} {
		if got, want := isPCIAddr(s), addr.MatchString(s); got != want {
			t.Errorf("isPCIAddr(%q) = %v, want %v", s, got, want)
		}
		if got, want := isPCISlot(s), slot.MatchString(s); got != want {
			t.Errorf("isPCISlot(%q) = %v, want %v", s, got, want)
		}
	}
}
