package hotplug

import (
	"context"
	"errors"
	"maps"
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

// bootGuest is a guest's files as it boots: one vCPU and one 128 MiB memory block
// online, with more files (or other contents) from more.
func bootGuest(more map[string]string) map[string]string {
	files := map[string]string{
		"sys/devices/system/cpu/cpu0/topology/core_id": "0",
		"sys/devices/system/cpu/online":                "0\n",
		"sys/devices/system/memory/block_size_bytes":   "8000000",
		"sys/devices/system/memory/memory0/state":      "online",
		"proc/meminfo": "MemTotal: 100 kB\n",
	}
	maps.Copy(files, more)
	return files
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

// TestResizeWaitsForHotplug: a vCPU and a memory block whose hot-plug arrives during
// the call are onlined by it. As in sysfs, each one's directory appears before its
// online or state file: until the file is there, the vCPU is not counted online (the
// kernel's online list does not have it) and the block is not an error.
func TestResizeWaitsForHotplug(t *testing.T) {
	s := fakeSys(t, bootGuest(nil))
	cpu1 := filepath.Join(s.Sys, "devices/system/cpu/cpu1")
	memory1 := filepath.Join(s.Sys, "devices/system/memory/memory1")
	for _, d := range []string{cpu1, memory1} {
		if err := os.MkdirAll(filepath.Join(d, "topology"), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	// A sysfs file appears with its content; os.WriteFile creates the file empty and then
	// writes, and a Resize that read it in between would online it before "offline"
	// overwrote that. So each file is written aside and renamed into place.
	appear := func(path, content string) error {
		tmp := path + ".new"
		if err := os.WriteFile(tmp, []byte(content), 0o644); err != nil {
			return err
		}
		return os.Rename(tmp, path)
	}
	arrived := make(chan error, 1)
	go func() {
		time.Sleep(30 * time.Millisecond)
		err := appear(filepath.Join(cpu1, "online"), "0\n")
		if err == nil {
			err = appear(filepath.Join(memory1, "state"), "offline\n")
		}
		arrived <- err
	}()
	got, err := s.Resize(context.Background(), &agent.ResizeRequest{Vcpus: 2, MemoryMib: 256})
	if err != nil {
		t.Fatal(err)
	}
	if err := <-arrived; err != nil {
		t.Fatal(err)
	}
	if got.OnlineVcpus != 2 || got.MemoryMib != 256 {
		t.Errorf("got %v, want 2 vCPUs and 256 MiB", got)
	}
	if v := read(t, s, "devices/system/cpu/cpu1/online"); v != "1" {
		t.Errorf("cpu1 online = %q, want 1", v)
	}
	if v := read(t, s, "devices/system/memory/memory1/state"); v != "online" {
		t.Errorf("memory1 state = %q, want online", v)
	}
}

// TestResizeBadOnlineList: a vCPU without an online file needs the kernel's online list,
// and a list that does not parse is an error, not a guess.
func TestResizeBadOnlineList(t *testing.T) {
	s := fakeSys(t, bootGuest(map[string]string{"sys/devices/system/cpu/online": "zero\n"}))
	if _, err := s.Resize(context.Background(), &agent.ResizeRequest{Vcpus: 1, MemoryMib: 128}); err == nil || !strings.Contains(err.Error(), "online") {
		t.Fatalf("Resize with an online list of %q: %v, want an error naming it", "zero", err)
	}
}

// TestResizeSettlesCpusets: a Resize that onlined a vCPU writes its cgroup's cpuset
// (which waits for the kernel's cpuset update) before it answers; one that onlined none,
// or a guest without a cpuset controller, writes nothing.
func TestResizeSettlesCpusets(t *testing.T) {
	files := bootGuest(map[string]string{"sys/fs/cgroup/" + settleCgroup + "/cpuset.cpus": "untouched"})
	cpuset := "fs/cgroup/" + settleCgroup + "/cpuset.cpus"
	for _, tc := range []struct {
		name    string
		offline bool // cpu1 hot-plugged, offline
		cpuset  bool
		want    string
	}{
		{"a vCPU onlined", true, true, ""},
		{"none onlined", false, true, "untouched"},
		{"no cpuset controller", true, false, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := maps.Clone(files)
			if tc.offline {
				f["sys/devices/system/cpu/cpu1/online"] = "0\n"
			}
			if !tc.cpuset {
				delete(f, "sys/fs/cgroup/"+settleCgroup+"/cpuset.cpus")
			}
			s := fakeSys(t, f)
			if _, err := s.Resize(context.Background(), &agent.ResizeRequest{Vcpus: 1, MemoryMib: 128}); err != nil {
				t.Fatal(err)
			}
			_, err := os.Stat(filepath.Join(s.Sys, cpuset))
			switch {
			case !tc.cpuset:
				if err == nil {
					t.Errorf("%s made where the guest has no cpuset controller", cpuset)
				}
			default:
				if got := read(t, s, cpuset); got != tc.want {
					t.Errorf("%s = %q, want %q", cpuset, got, tc.want)
				}
			}
		})
	}
}
