// Package hotplug brings the vCPUs and memory the VMM hot-plugged into the guest into
// use (the agent's Resources service): the kernel adds a hot-plugged vCPU offline and
// waits for user space to online it (udev would, the initramfs has none), and it adds
// hot-plugged memory as its ACPI event arrives, onlining it itself where
// memhp_default_state says so (the shim's kernel parameters) or here otherwise.
package hotplug

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"time"

	"github.com/containerd/log"
	"k8s.io/utils/cpuset"

	agent "github.com/caisson-containers/caisson/api/agent/v1"
)

// poll is how often Resize looks again while the hot-plug events are still arriving
// (only during a resize: an idle guest never polls).
const poll = 10 * time.Millisecond

// defaultTimeout bounds a Resize whose caller set no deadline.
const defaultTimeout = 30 * time.Second

// Service is the agent's Resources service over the kernel's files under Sys
// (default /sys) and Proc (default /proc).
type Service struct {
	Sys, Proc string
}

var _ agent.ResourcesService = Service{}

// state is what the guest has online.
type state struct {
	vcpus     int
	memoryMiB uint64
	// onlined is how many vCPUs this look onlined.
	onlined int
}

// Resize onlines hot-plugged vCPUs until r.Vcpus are online and waits until the online
// memory reaches r.MemoryMib, as the hot-plug events arrive.
func (s Service) Resize(ctx context.Context, r *agent.ResizeRequest) (*agent.ResizeResponse, error) {
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, defaultTimeout)
		defer cancel()
	}
	onlined := 0
	for {
		st, err := s.online(ctx)
		if err != nil {
			return nil, err
		}
		onlined += st.onlined
		if st.vcpus >= int(r.Vcpus) && st.memoryMiB >= r.MemoryMib {
			if onlined > 0 {
				s.settleCpusets(ctx)
			}
			total, err := s.memTotalKiB()
			if err != nil {
				return nil, err
			}
			return &agent.ResizeResponse{OnlineVcpus: uint32(st.vcpus), MemoryMib: st.memoryMiB, MemTotalKib: total}, nil
		}
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("resize to %d vCPUs and %d MiB: %d vCPUs and %d MiB online: %w",
				r.Vcpus, r.MemoryMib, st.vcpus, st.memoryMiB, ctx.Err())
		case <-time.After(poll):
		}
	}
}

// online onlines every offline vCPU and memory block and says what is online.
func (s Service) online(ctx context.Context) (state, error) {
	var st state
	var err error
	if st.vcpus, st.onlined, err = s.onlineCPUs(ctx); err != nil {
		return st, err
	}
	st.memoryMiB, err = s.onlineMemory(ctx)
	return st, err
}

var cpuDir = regexp.MustCompile(`^cpu([0-9]+)$`)

// onlineCPUs writes 1 to the online file of every offline vCPU and counts the online
// ones. A vCPU without an online file is online only if the kernel's online list says
// so: that is the boot CPU, which cannot go offline, and also a vCPU being added, whose
// directory appears before its online file (device_add makes the directory, then the
// attributes); counting that one would report a vCPU that no one ever onlines. It also
// says how many vCPUs it onlined.
func (s Service) onlineCPUs(ctx context.Context) (online, onlined int, _ error) {
	dir := filepath.Join(s.sys(), "devices/system/cpu")
	entries, err := os.ReadDir(dir)
	if err != nil {
		return 0, 0, err
	}
	var listed cpuset.CPUSet // the kernel's online list, read once if needed
	for _, e := range entries {
		m := cpuDir.FindStringSubmatch(e.Name())
		if m == nil {
			continue
		}
		f := filepath.Join(dir, e.Name(), "online")
		b, err := os.ReadFile(f)
		switch {
		case os.IsNotExist(err):
			if listed.IsEmpty() {
				if listed, err = s.onlineList(dir); err != nil {
					return 0, 0, err
				}
			}
			if cpu, _ := strconv.Atoi(m[1]); listed.Contains(cpu) {
				online++
			}
			continue
		case err != nil:
			return 0, 0, err
		case strings.TrimSpace(string(b)) == "1":
			online++
			continue
		}
		if err := os.WriteFile(f, []byte("1"), 0); err != nil {
			// A vCPU still being added: the next round tries again.
			log.G(ctx).WithError(err).WithField("cpu", e.Name()).Debug("online vCPU")
			continue
		}
		log.G(ctx).WithField("cpu", e.Name()).Info("hot-plugged vCPU online")
		online++
		onlined++
	}
	return online, onlined, nil
}

// settleCgroup is a cgroup of the agent's own, empty, whose cpuset settleCpusets writes.
const settleCgroup = "caisson-settle"

// settleCpusets waits until the cgroups' cpusets have the vCPUs just onlined. Linux
// before 6.10 gives them in a work item after the vCPU is up (cpuset_hotplug_workfn);
// until it has run, a process that joins a container's cgroup gets the old CPUs (nproc
// one short), and the cgroup operations of the pod's next calls run beside it. Writing a
// cpuset's cpus file waits for that work first (cpuset_write_resmask flushes it); the
// empty list written to a cgroup that has none changes nothing. Without a cpuset
// controller there is nothing to wait for.
func (s Service) settleCpusets(ctx context.Context) {
	dir := filepath.Join(s.sys(), "fs/cgroup", settleCgroup)
	if err := os.Mkdir(dir, 0o755); err != nil && !os.IsExist(err) {
		log.G(ctx).WithError(err).Warn("cgroup to wait for the cpusets of hot-plugged vCPUs")
		return
	}
	f := filepath.Join(dir, "cpuset.cpus")
	if _, err := os.Stat(f); err != nil {
		return // no cpuset controller
	}
	if err := os.WriteFile(f, []byte("\n"), 0); err != nil {
		log.G(ctx).WithError(err).Warn("wait for the cpusets of hot-plugged vCPUs")
	}
}

// onlineList is the kernel's list of online CPUs (dir/online, "0-2,4").
func (s Service) onlineList(dir string) (cpuset.CPUSet, error) {
	b, err := os.ReadFile(filepath.Join(dir, "online"))
	if err != nil {
		return cpuset.CPUSet{}, err
	}
	set, err := cpuset.Parse(strings.TrimSpace(string(b)))
	if err != nil {
		return cpuset.CPUSet{}, fmt.Errorf("%s/online: %w", dir, err)
	}
	return set, nil
}

var memoryDir = regexp.MustCompile(`^memory[0-9]+$`)

// onlineMemory onlines every offline memory block (where the kernel did not) and
// returns the online memory.
func (s Service) onlineMemory(ctx context.Context) (uint64, error) {
	dir := filepath.Join(s.sys(), "devices/system/memory")
	b, err := os.ReadFile(filepath.Join(dir, "block_size_bytes"))
	if err != nil {
		return 0, err
	}
	blockSize, err := strconv.ParseUint(strings.TrimSpace(string(b)), 16, 64)
	if err != nil {
		return 0, fmt.Errorf("%s/block_size_bytes: %w", dir, err)
	}
	entries, err := os.ReadDir(dir)
	if err != nil {
		return 0, err
	}
	var blocks uint64
	for _, e := range entries {
		if !memoryDir.MatchString(e.Name()) {
			continue
		}
		f := filepath.Join(dir, e.Name(), "state")
		b, err := os.ReadFile(f)
		switch {
		case os.IsNotExist(err):
			// A block being added: its directory comes before its state file. The
			// next round onlines it.
			continue
		case err != nil:
			return 0, err
		}
		if strings.TrimSpace(string(b)) != "online" {
			if err := os.WriteFile(f, []byte("online"), 0); err != nil {
				log.G(ctx).WithError(err).WithField("block", e.Name()).Debug("online memory block")
				continue
			}
		}
		blocks++
	}
	return blocks * blockSize >> 20, nil
}

// memTotalKiB is /proc/meminfo's MemTotal.
func (s Service) memTotalKiB() (uint64, error) {
	proc := s.Proc
	if proc == "" {
		proc = "/proc"
	}
	b, err := os.ReadFile(filepath.Join(proc, "meminfo"))
	if err != nil {
		return 0, err
	}
	for _, line := range strings.Split(string(b), "\n") {
		if f := strings.Fields(line); len(f) >= 2 && f[0] == "MemTotal:" {
			return strconv.ParseUint(f[1], 10, 64)
		}
	}
	return 0, fmt.Errorf("no MemTotal in %s/meminfo", proc)
}

func (s Service) sys() string {
	if s.Sys == "" {
		return "/sys"
	}
	return s.Sys
}
