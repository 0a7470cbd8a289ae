package service

import (
	"testing"

	"golang.org/x/sys/unix"
)

func TestBootTimeReadsBootClock(t *testing.T) {
	var before, after unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_BOOTTIME, &before); err != nil {
		t.Fatal(err)
	}
	got, err := bootTime()
	if err != nil {
		t.Fatal(err)
	}
	if err := unix.ClockGettime(unix.CLOCK_BOOTTIME, &after); err != nil {
		t.Fatal(err)
	}
	if got.Nano() < before.Nano() || got.Nano() > after.Nano() {
		t.Fatalf("boot clock %d, want between %d and %d", got.Nano(), before.Nano(), after.Nano())
	}
}
