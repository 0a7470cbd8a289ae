package task

import (
	"slices"
	"sync"
	"time"

	"google.golang.org/protobuf/types/known/anypb"

	agent "github.com/caisson-containers/caisson/api/agent/v1"
	"github.com/caisson-containers/caisson/shim/config"
)

// A container's Stats reply from the guest is kept, and given again instead of asking the
// guest, while the guest cannot have changed it by more than the runtime configuration's
// guest.stats_reuse_vcpu_time: every figure in it (the container's cgroup's CPU time,
// memory, I/O, pids, pressure) changes only by what the guest executes, and the VM's vCPU
// threads' run time on the host (vmm.VM.VCPUTime) bounds that from above. An idle guest
// then sleeps through containerd's stats collection (every second in containerd 2.x, each
// call a few ms of emulation under TCG), as cAdvisor's dynamic housekeeping samples an
// unchanging container less often. A reply is never older than config.StatsReuseMaxAge.
//
// A call into the guest also reads the pod's other containers that someone asked about
// within config.StatsReuseMaxAge (the collector asks for every app container each
// second, the pause container never), and keeps their replies with the same vCPU
// reading: one wake-up answers for the pod, where each container's own call would count
// against the others' budget.
//
// The vCPU reading is taken once the reply is back, so what the container ran after the
// guest read its cgroup and before the reply left (a reply is written right after the
// reads) is the one thing a reused reply misses beyond the bound; it shows, like the rest,
// in the next reply the guest gives.

// keptStats is a container's last Stats reply from the guest.
type keptStats struct {
	mu      sync.Mutex
	metrics *anypb.Any
	vcpu    time.Duration // the VM's vCPU time once the reply was back
	at      time.Time
	asked   time.Time // when its stats were last asked for
}

// ask records that the container's stats are asked for now.
func (k *keptStats) ask(now time.Time) {
	k.mu.Lock()
	defer k.mu.Unlock()
	k.asked = now
}

// wanted says whether the container's stats were asked for within
// config.StatsReuseMaxAge before now: a call about another container reads them too.
func (k *keptStats) wanted(now time.Time) bool {
	k.mu.Lock()
	defer k.mu.Unlock()
	return young(k.asked, now)
}

// young says whether t is at most config.StatsReuseMaxAge before now (and not after it:
// a clock set back makes nothing young).
func young(t, now time.Time) bool {
	return !now.Before(t) && now.Sub(t) < config.StatsReuseMaxAge
}

// reuse returns the kept reply if it may stand for a new one now, the VM's vCPUs having
// run for vcpu in all: less than budget since the reply, which is younger than
// config.StatsReuseMaxAge. nil: ask the guest.
func (k *keptStats) reuse(budget, vcpu time.Duration, now time.Time) *anypb.Any {
	k.mu.Lock()
	defer k.mu.Unlock()
	if k.metrics == nil || budget <= 0 || vcpu < k.vcpu || vcpu-k.vcpu >= budget || !young(k.at, now) {
		return nil
	}
	return k.metrics
}

// keep records the guest's reply m, the VM's vCPUs having run for vcpu in all once it
// came. ok false (the vCPU time is unknown) forgets the kept reply instead.
func (k *keptStats) keep(m *anypb.Any, vcpu time.Duration, ok bool, now time.Time) {
	k.mu.Lock()
	defer k.mu.Unlock()
	if !ok || m == nil {
		k.metrics = nil
		return
	}
	k.metrics, k.vcpu, k.at = m, vcpu, now
}

// statsReuseBudget is the pod's guest.stats_reuse_vcpu_time (0 before the pod runs).
func (s *service) statsReuseBudget() time.Duration {
	s.podMu.Lock()
	defer s.podMu.Unlock()
	return time.Duration(s.cfg.Guest.StatsReuseVCPUTime)
}

// statsAlso are the pod's containers other than id whose stats were asked for lately
// (keptStats.wanted): a call into the guest about id reads them too.
func (s *service) statsAlso(id string, now time.Time) []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	var also []string
	for other, c := range s.containers {
		if other != id && c.stats.wanted(now) {
			also = append(also, other)
		}
	}
	slices.Sort(also)
	return also
}

// keepStats keeps the replies of a call into the guest: c's, and those of the other
// containers it read (StatsResponse.Also), with the VM's vCPU time read once they came.
func (s *service) keepStats(c *container, resp *agent.StatsResponse, vcpu time.Duration, ok bool, now time.Time) {
	c.stats.keep(resp.GetMetrics(), vcpu, ok, now)
	for id, m := range resp.GetAlso() {
		if other, err := s.container(id); err == nil && other != c {
			other.stats.keep(m, vcpu, ok, now)
		}
	}
}
