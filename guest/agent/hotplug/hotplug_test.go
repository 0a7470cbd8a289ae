package hotplug

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	agent "github.com/caisson-containers/caisson/api/agent/v1"
)

// fakeSys makes a /sys and /proc with the given files.
func fakeSys(t *testing.T, files map[string]string) Service {
	t.Helper()
	root := t.TempDir()
	for p, content := range files {
		p = filepath.Join(root, p)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return Service{Sys: filepath.Join(root, "sys"), Proc: filepath.Join(root, "proc")}
}

func read(t *testing.T, s Service, p string) string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(s.Sys, p))
	if err != nil {
		t.Fatal(err)
	}
	return strings.TrimSpace(string(b))
}

func TestResize(t *testing.T) {
	base := map[string]string{
		"sys/devices/system/cpu/cpu0/topology/core_id": "0",
		"sys/devices/system/cpu/cpu1/online":           "0\n",
		"sys/devices/system/cpu/cpu2/online":           "0\n",
		"sys/devices/system/cpu/online":                "0\n",
		"sys/devices/system/memory/block_size_bytes":   "8000000\n",
		"sys/devices/system/memory/memory0/state":      "online\n",
		"sys/devices/system/memory/memory1/state":      "online\n",
		"sys/devices/system/memory/memory40/state":     "offline\n",
		"sys/devices/system/memory/memory41/state":     "online\n",
		"sys/devices/system/memory/auto_online_blocks": "online\n",
		"proc/meminfo": "MemTotal:         612345 kB\nMemFree: 1 kB\n",
	}
	for _, tc := range []struct {
		name    string
		req     *agent.ResizeRequest
		want    *agent.ResizeResponse
		online  []string // cpus online after
		err     string
		timeout time.Duration
	}{
		{
			name:   "every hot-plugged vCPU and memory block onlined",
			req:    &agent.ResizeRequest{Vcpus: 3, MemoryMib: 512},
			want:   &agent.ResizeResponse{OnlineVcpus: 3, MemoryMib: 512, MemTotalKib: 612345},
			online: []string{"cpu1", "cpu2"},
		},
		{
			name:   "less than the guest has: onlines what is there",
			req:    &agent.ResizeRequest{Vcpus: 1, MemoryMib: 128},
			want:   &agent.ResizeResponse{OnlineVcpus: 3, MemoryMib: 512, MemTotalKib: 612345},
			online: []string{"cpu1", "cpu2"},
		},
		{
			name:    "a vCPU that never arrives",
			req:     &agent.ResizeRequest{Vcpus: 4, MemoryMib: 512},
			err:     "resize to 4 vCPUs and 512 MiB: 3 vCPUs and 512 MiB online",
			timeout: 50 * time.Millisecond,
		},
		{
			name:    "memory that never arrives",
			req:     &agent.ResizeRequest{Vcpus: 3, MemoryMib: 1024},
			err:     "3 vCPUs and 512 MiB online",
			timeout: 50 * time.Millisecond,
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := fakeSys(t, base)
			ctx := context.Background()
			if tc.timeout > 0 {
				var cancel context.CancelFunc
				ctx, cancel = context.WithTimeout(ctx, tc.timeout)
				defer cancel()
			}
			got, err := s.Resize(ctx, tc.req)
			if tc.err != "" {
				if err == nil || !strings.Contains(err.Error(), tc.err) || !errors.Is(err, context.DeadlineExceeded) {
					t.Fatalf("error %v, want %q (deadline exceeded)", err, tc.err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if got.OnlineVcpus != tc.want.OnlineVcpus || got.MemoryMib != tc.want.MemoryMib || got.MemTotalKib != tc.want.MemTotalKib {
				t.Errorf("got %v, want %v", got, tc.want)
			}
			for _, c := range tc.online {
				if v := read(t, s, "devices/system/cpu/"+c+"/online"); v != "1" {
					t.Errorf("%s online = %q, want 1", c, v)
				}
			}
			if v := read(t, s, "devices/system/memory/memory40/state"); v != "online" {
				t.Errorf("memory40 state = %q, want online", v)
			}
		})
	}
}

// TestResizeWaitsForHotplug: a vCPU whose hot-plug event arrives during the call is
// onlined by it.
func TestResizeWaitsForHotplug(t *testing.T) {
	s := fakeSys(t, map[string]string{
		"sys/devices/system/cpu/cpu0/topology/core_id": "0",
		"sys/devices/system/memory/block_size_bytes":   "8000000",
		"sys/devices/system/memory/memory0/state":      "online",
		"proc/meminfo": "MemTotal: 100 kB\n",
	})
	arrived := make(chan error, 1)
	go func() {
		time.Sleep(30 * time.Millisecond)
		// Whole, as sysfs shows a new vCPU: made aside and renamed into place.
		tmp := filepath.Join(s.Sys, "devices/system/cpu1.new")
		if err := os.MkdirAll(tmp, 0o755); err != nil {
			arrived <- err
			return
		}
		if err := os.WriteFile(filepath.Join(tmp, "online"), []byte("0\n"), 0o644); err != nil {
			arrived <- err
			return
		}
		arrived <- os.Rename(tmp, filepath.Join(s.Sys, "devices/system/cpu/cpu1"))
	}()
	got, err := s.Resize(context.Background(), &agent.ResizeRequest{Vcpus: 2, MemoryMib: 128})
	if err != nil {
		t.Fatal(err)
	}
	if err := <-arrived; err != nil {
		t.Fatal(err)
	}
	if got.OnlineVcpus != 2 || read(t, s, "devices/system/cpu/cpu1/online") != "1" {
		t.Errorf("got %v, cpu1 online %q: want 2 vCPUs, cpu1 onlined", got, read(t, s, "devices/system/cpu/cpu1/online"))
	}
}
