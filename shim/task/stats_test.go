package task

import (
	"errors"
	"testing"
	"time"

	taskAPI "github.com/containerd/containerd/api/runtime/task/v3"
	"google.golang.org/protobuf/types/known/anypb"

	"github.com/caisson-containers/caisson/shim/config"
	"github.com/caisson-containers/caisson/shim/internal/fakevm"
)

func TestKeptStatsReuse(t *testing.T) {
	const budget = 5 * time.Millisecond
	t0 := time.Date(2026, 12, 5, 12, 0, 0, 0, time.UTC)
	reply := &anypb.Any{TypeUrl: "kept"}
	for _, tc := range []struct {
		name   string
		keep   bool // a reply was kept at t0, the VM's vCPUs at 1 s
		budget time.Duration
		vcpu   time.Duration
		now    time.Time
		reuse  bool
	}{
		{name: "nothing kept", budget: budget, vcpu: time.Second, now: t0},
		{name: "the guest did not run", keep: true, budget: budget, vcpu: time.Second, now: t0.Add(time.Second), reuse: true},
		{name: "the guest ran less than the budget", keep: true, budget: budget, vcpu: time.Second + budget - 1, now: t0.Add(time.Second), reuse: true},
		{name: "the guest ran the budget", keep: true, budget: budget, vcpu: time.Second + budget, now: t0.Add(time.Second)},
		{name: "the vCPU time went back (another VM)", keep: true, budget: budget, vcpu: time.Second - 1, now: t0.Add(time.Second)},
		{name: "just younger than the oldest", keep: true, budget: budget, vcpu: time.Second, now: t0.Add(config.StatsReuseMaxAge - 1), reuse: true},
		{name: "as old as the oldest", keep: true, budget: budget, vcpu: time.Second, now: t0.Add(config.StatsReuseMaxAge)},
		{name: "the clock went back", keep: true, budget: budget, vcpu: time.Second, now: t0.Add(-time.Millisecond)},
		{name: "reuse off", keep: true, budget: 0, vcpu: time.Second, now: t0.Add(time.Second)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var k keptStats
			if tc.keep {
				k.keep(reply, time.Second, true, t0)
			}
			got := k.reuse(tc.budget, tc.vcpu, tc.now)
			if tc.reuse && got != reply || !tc.reuse && got != nil {
				t.Errorf("reuse = %v, want the kept reply: %v", got, tc.reuse)
			}
		})
	}

	t.Run("an unknown vCPU time forgets the reply", func(t *testing.T) {
		var k keptStats
		k.keep(reply, time.Second, true, t0)
		k.keep(&anypb.Any{TypeUrl: "new"}, 0, false, t0.Add(time.Second))
		if got := k.reuse(budget, time.Second, t0.Add(time.Second)); got != nil {
			t.Errorf("reuse = %v after a reply whose vCPU time is unknown", got)
		}
	})
	t.Run("asked lately", func(t *testing.T) {
		var k keptStats
		if k.wanted(t0) {
			t.Error("wanted before anyone asked")
		}
		k.ask(t0)
		if !k.wanted(t0.Add(config.StatsReuseMaxAge-1)) || k.wanted(t0.Add(config.StatsReuseMaxAge)) || k.wanted(t0.Add(-1)) {
			t.Error("wanted: want it for StatsReuseMaxAge after the last ask, and only then")
		}
	})
	t.Run("no reply forgets the kept one", func(t *testing.T) {
		var k keptStats
		k.keep(reply, time.Second, true, t0)
		k.keep(nil, time.Second, true, t0)
		if got := k.reuse(budget, time.Second, t0.Add(time.Second)); got != nil {
			t.Errorf("reuse = %v after an empty reply", got)
		}
	})
}

// The task service answers Stats from the guest, then with that reply while the VM's
// vCPUs run less than guest.stats_reuse_vcpu_time.
func TestStatsReuseOnFakeVM(t *testing.T) {
	h := newHarnessWithTables(t, `stats_reuse_vcpu_time = "5ms"`, "")
	h.startPod("pod1", "c1")
	vm := h.vm()
	vm.SetVCPUTime(time.Second)

	h.wantStats("c1", "1") // asks the guest
	h.wantStats("c1", "1") // the guest did not run
	vm.SetVCPUTime(time.Second + 4*time.Millisecond)
	h.wantStats("c1", "1")
	vm.SetVCPUTime(time.Second + 5*time.Millisecond)
	h.wantStats("c1", "2") // the guest ran the budget since c1's reply
	h.wantStats("c1", "2")
	if got := h.hv.Agent.Count("Containers.Stats", ""); got != 2 {
		t.Errorf("the agent had %d Stats calls, want 2", got)
	}

	// A failed call keeps nothing; the next asks again.
	h.hv.Agent.Fail("Containers.Stats", errors.New("the guest is busy"))
	vm.SetVCPUTime(2 * time.Second)
	if _, err := h.s.Stats(h.ctx, &taskAPI.StatsRequest{ID: "c1"}); err == nil {
		t.Error("Stats succeeded while the agent's failed")
	}
	h.hv.Agent.Fail("Containers.Stats", nil)
	h.wantStats("c1", "4")

	// Without the vCPU time, every call asks the guest, and none fails for it.
	h.hv.Fail(fakevm.OpVCPUTime, errors.New("no schedstat"))
	h.wantStats("c1", "5")
	h.wantStats("c1", "6")
	h.hv.Fail(fakevm.OpVCPUTime, nil)
	h.wantStats("c1", "7")
	h.wantStats("c1", "7")
}

// A call into the guest reads the pod's other containers whose stats were asked for
// lately, and their replies are given again like their own; the pause container, which
// no one asks about, is not read.
func TestStatsOfAPodInOneCall(t *testing.T) {
	h := newHarnessWithTables(t, `stats_reuse_vcpu_time = "5ms"`, "")
	h.startPod("pod1", "c1")
	req, _ := h.createRequest("c2", containerAnnotations("pod1"))
	h.mustCreate(req)
	h.mustStart("c2", "")
	vm := h.vm()
	vm.SetVCPUTime(time.Second)

	h.wantStats("c1", "1") // no one asked about c2 yet
	h.wantStats("c2", "2") // and c1 with it
	h.wantStats("c1", "2")
	vm.SetVCPUTime(time.Second + 5*time.Millisecond)
	h.wantStats("c2", "3") // and c1 with it
	h.wantStats("c1", "3")
	if got := h.hv.Agent.Count("Containers.Stats", ""); got != 3 {
		t.Errorf("the agent had %d Stats calls, want 3", got)
	}
	if got := h.hv.Agent.Count(fakevm.StatsAlso, "c1"); got != 2 {
		t.Errorf("c1 was read along %d times, want 2", got)
	}
	if got := h.hv.Agent.Count(fakevm.StatsAlso, "sb"); got != 0 {
		t.Errorf("the pause container was read along %d times, want never", got)
	}
}

func TestStatsReuseOff(t *testing.T) {
	h := newHarnessWithTables(t, `stats_reuse_vcpu_time = "0"`, "")
	h.startPod("pod1", "c1")
	h.vm().SetVCPUTime(time.Second)
	for _, want := range []string{"1", "2", "3"} {
		h.wantStats("c1", want)
	}
}

// startPod creates and starts pod's sandbox container "sb" and container id in it.
func (h *harness) startPod(pod, id string) {
	h.t.Helper()
	sbReq, _ := h.createRequest("sb", sandboxAnnotations(pod))
	h.mustCreate(sbReq)
	h.mustStart("sb", "")
	req, _ := h.createRequest(id, containerAnnotations(pod))
	h.mustCreate(req)
	h.mustStart(id, "")
}

// wantStats checks that Stats of container id answers with the fake agent's reply to its
// nth Stats call (fakevm.StatsTypeURL).
func (h *harness) wantStats(id, nth string) {
	h.t.Helper()
	r, err := h.s.Stats(h.ctx, &taskAPI.StatsRequest{ID: id})
	if err != nil {
		h.t.Fatal(err)
	}
	if got := r.GetStats(); got.GetTypeUrl() != fakevm.StatsTypeURL || string(got.GetValue()) != nth {
		h.t.Errorf("Stats of %s = %q %q, want the reply to the guest's call %s", id, got.GetTypeUrl(), got.GetValue(), nth)
	}
}
