package rootfs

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strings"
)

// Format creates d's writable image if it has a mkfs request and the file does
// not exist yet, exactly as containerd's mount manager does on the host (a
// sparse file of the requested size, then mkfs -q), so that whichever side
// activates the snapshot first formats it and the other finds it ready.
func Format(ctx context.Context, d Device) error {
	if unmade, err := Unformatted(d); err != nil || !unmade {
		return err
	}
	// Build it aside and rename, so that a crash never leaves a half-formatted image
	// that a later activation would take for a good one.
	tmp := d.Source + ".mkfs"
	f, err := os.OpenFile(tmp, os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o640)
	if err != nil {
		return fmt.Errorf("create writable image: %w", err)
	}
	err = f.Truncate(d.Mkfs.Size)
	f.Close()
	if err != nil {
		os.Remove(tmp)
		return fmt.Errorf("size writable image: %w", err)
	}
	args := []string{"-q", "-F"}
	if d.Mkfs.UUID != "" {
		args = append(args, "-U", d.Mkfs.UUID)
	}
	if out, err := exec.CommandContext(ctx, "mkfs."+d.Mkfs.FS, append(args, tmp)...).CombinedOutput(); err != nil {
		os.Remove(tmp)
		return fmt.Errorf("mkfs.%s %s: %v: %s", d.Mkfs.FS, d.Source, err, strings.TrimSpace(string(out)))
	}
	if err := os.Rename(tmp, d.Source); err != nil {
		os.Remove(tmp)
		return fmt.Errorf("install writable image: %w", err)
	}
	return nil
}

// Unformatted reports whether Format has an image to make for d: a mkfs request for a
// file that does not exist yet.
func Unformatted(d Device) (bool, error) {
	if d.Mkfs == nil {
		return false, nil
	}
	if _, err := os.Stat(d.Source); err == nil {
		return false, nil
	} else if !errors.Is(err, os.ErrNotExist) {
		return false, fmt.Errorf("writable image %s: %w", d.Source, err)
	}
	return true, nil
}
