package hostcheck

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/caisson-containers/caisson/internal/testutil"
)

// caisson check must say which kernels QEMU cannot boot before a pod finds out: QEMU
// refuses an ELF without the PVH note only when a VM starts.
func TestKernelFormat(t *testing.T) {
	g := testutil.RequireGuest(t)
	dir := t.TempDir()
	write := func(name string, b []byte) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, b, 0o644); err != nil {
			t.Fatal(err)
		}
		return p
	}
	bzImage := filepath.Join(testutil.RepoRoot(t), "_output", "guest", "kernel", "vmlinuz") // the package's, vmlinux's source
	if _, err := os.Stat(bzImage); err != nil {
		t.Skipf("no bzImage from `make guest`: %v", err)
	}
	for _, tc := range []struct {
		name, path, want, wantErr string
	}{
		{name: "vmlinux", path: g.Kernel, want: "ELF, PVH direct boot at 0x"},
		{name: "bzImage", path: bzImage, want: "bzImage: boots through the firmware"},
		{name: "ELF without the PVH note", path: testutil.RequireBinary(t, "busybox"), wantErr: "no PVH entry note"},
		{name: "neither", path: write("text", []byte(strings.Repeat("not a kernel\n", 100))), wantErr: "neither an ELF kernel nor a bzImage"},
		{name: "short", path: write("short", []byte("\x7fELF")), wantErr: "too short for a kernel"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := kernelFormat(tc.path)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("kernelFormat(%s) = %q, %v; want an error with %q", tc.path, got, err, tc.wantErr)
				}
				return
			}
			if err != nil || !strings.HasPrefix(got, tc.want) {
				t.Fatalf("kernelFormat(%s) = %q, %v; want %q…", tc.path, got, err, tc.want)
			}
		})
	}
}
