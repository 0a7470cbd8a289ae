package task

import (
	"context"
	"testing"
)

// A compromised guest reports OOM kills of containers that are not its pod's, and floods
// them for its own: only its own pass, at a bounded rate.
func TestOOMFilter(t *testing.T) {
	own := map[string]bool{"mine": true, "other-of-mine": true}
	for _, tc := range []struct {
		name   string
		events []string
		want   int // published
	}{
		{"own container", []string{"mine"}, 1},
		{"each own container", []string{"mine", "other-of-mine"}, 2},
		{"another pod's container", []string{"someone-elses"}, 0},
		{"no id", []string{""}, 0},
		{"a path for an id", []string{"../mine"}, 0},
		{"a flood for an own container", repeat("mine", 10_000), oomEventBurst},
		{"a flood for others", repeat("victim", 10_000), 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := newOOMFilter(func(id string) bool { return own[id] })
			got := 0
			for _, id := range tc.events {
				if f.allow(context.Background(), id) {
					got++
				}
			}
			// The burst, plus what the rate refilled while the loop ran (well under a second).
			if got < tc.want || got > tc.want+int(oomEventRate) {
				t.Fatalf("%d of %d events published, want %d", got, len(tc.events), tc.want)
			}
		})
	}
}

func TestOOMFilterForgetsDeletedContainers(t *testing.T) {
	own := map[string]bool{"c": true}
	f := newOOMFilter(func(id string) bool { return own[id] })
	f.allow(context.Background(), "c")
	delete(own, "c")
	if f.allow(context.Background(), "c") {
		t.Fatal("event of a deleted container published")
	}
	if len(f.limits) != 0 {
		t.Fatalf("limiters of deleted containers kept: %v", f.limits)
	}
}

func repeat(s string, n int) []string {
	out := make([]string, n)
	for i := range out {
		out[i] = s
	}
	return out
}
