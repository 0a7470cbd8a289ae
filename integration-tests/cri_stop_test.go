package integration

import (
	"context"
	"os"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	runtime "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/caisson-containers/caisson/integration-tests/harness"
)

// stopMargin is what a stop may take beyond its grace period: the SIGKILL, the exit
// travelling from the guest and containerd's handling of it, on a loaded 2-core machine
// under TCG. The behaviour tested is a deadline, so it has a bound, with room.
const stopMargin = 5 * time.Second

// sigkilled is the exit status runc reports for a process killed by SIGKILL.
const sigkilled = 128 + int32(syscall.SIGKILL)

// termIgnorers are containers whose PID 1 does not end on SIGTERM.
// It marks /ready once the trap is set: a SIGTERM sent before would end the shell (the
// kubelet does not stop containers that just started, but a test would).
var termIgnorers = map[string][]string{
	"trap-term": {"sh", "-c", `trap "" TERM; touch /ready; while :; do sleep 1; done`},
}

// startTermIgnorer starts the trap-term container and waits until it ignores SIGTERM.
func startTermIgnorer(t *testing.T, c *harness.CRI, pod string, cfg *runtime.PodSandboxConfig, image, name string) string {
	t.Helper()
	id := c.StartContainer(t, pod, cfg, harness.ContainerConfig(name, image, termIgnorers["trap-term"]...))
	deadline := time.Now().Add(time.Minute)
	for {
		if _, _, code := c.Exec(t, id, "sh", "-c", "[ -f /ready ]"); code == 0 {
			return id
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s did not set its trap within a minute", name)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// TestCRIStopContainerTimeout: StopContainer of a container that ignores SIGTERM sends
// SIGKILL when the timeout ends, and the container is reported exited (137) within the
// timeout and a margin, not sooner than the timeout; then StopPodSandbox of a pod whose
// containers ignore SIGTERM completes, and nothing is left. runc first, as the control.
func TestCRIStopContainerTimeout(t *testing.T) {
	c := harness.StartCRI(t, harness.Options{})
	for _, handler := range []string{harness.RuncHandler, harness.Handler} {
		t.Run(handler, func(t *testing.T) {
			image := c.Pull(t, c.BusyboxRef, handler)
			cfg := c.PodConfig("stop-"+handler, nil)
			pod := c.RunPod(t, cfg, handler)
			ids := map[string]string{}
			for name := range termIgnorers {
				ids[name] = startTermIgnorer(t, c, pod, cfg, image, name)
			}
			// Both at once, as the kubelet stops a pod's containers.
			timeout := int64(stopTimeout(t))
			var wg sync.WaitGroup
			for name, id := range ids {
				wg.Add(1)
				go func() {
					defer wg.Done()
					start := time.Now()
					_, err := c.Runtime.StopContainer(c.Ctx(t), &runtime.StopContainerRequest{ContainerId: id, Timeout: timeout})
					took := time.Since(start)
					if err != nil {
						t.Errorf("%s: StopContainer: %v (after %s)", name, err, took)
						return
					}
					t.Logf("%s: StopContainer with timeout %ds took %s", name, timeout, took.Round(time.Millisecond))
					if took < time.Duration(timeout)*time.Second-500*time.Millisecond {
						t.Errorf("%s: stopped after %s, before its %ds timeout: SIGTERM ended it, so this does not test the SIGKILL", name, took, timeout)
					}
					if took > time.Duration(timeout)*time.Second+stopMargin {
						t.Errorf("%s: StopContainer took %s, over its %ds timeout + %s", name, took, timeout, stopMargin)
					}
				}()
			}
			wg.Wait()
			for name, id := range ids {
				checkExited(t, c, name, id, sigkilled)
			}

			// StopPodSandbox stops the containers with no grace at all (SIGKILL).
			id := startTermIgnorer(t, c, pod, cfg, image, "trap-term-2")
			start := time.Now()
			if _, err := c.Runtime.StopPodSandbox(c.Ctx(t), &runtime.StopPodSandboxRequest{PodSandboxId: pod}); err != nil {
				t.Fatalf("StopPodSandbox: %v", err)
			}
			took := time.Since(start)
			t.Logf("StopPodSandbox took %s", took.Round(time.Millisecond))
			if took > stopMargin+5*time.Second {
				t.Errorf("StopPodSandbox took %s", took)
			}
			checkExited(t, c, "trap-term-2", id, sigkilled)
			c.RemovePod(t, pod)
			if left := c.Leftovers(); len(left) > 0 {
				t.Errorf("left after the pod: %v", left)
			}
		})
	}
}

// stopTimeout is the StopContainer timeout TestCRIStopContainerTimeout uses:
// CAISSON_TEST_STOP_TIMEOUT seconds (the kubelet's default grace period is 30), default 5.
func stopTimeout(t *testing.T) int {
	if v := os.Getenv("CAISSON_TEST_STOP_TIMEOUT"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n <= 0 {
			t.Fatalf("CAISSON_TEST_STOP_TIMEOUT=%q: want seconds", v)
		}
		return n
	}
	return 5
}

// checkExited checks the CRI reports the container exited with code.
func checkExited(t *testing.T, c *harness.CRI, name, id string, code int32) {
	t.Helper()
	st, err := c.Runtime.ContainerStatus(c.Ctx(t), &runtime.ContainerStatusRequest{ContainerId: id})
	if err != nil {
		t.Errorf("%s: ContainerStatus: %v", name, err)
		return
	}
	if s := st.GetStatus(); s.GetState() != runtime.ContainerState_CONTAINER_EXITED || s.GetExitCode() != code {
		t.Errorf("%s: %s, exit code %d (%s); want exited, %d", name, s.GetState(), s.GetExitCode(), s.GetReason(), code)
	}
}

// TestCRIStopExecSyncTimeout: ExecSync with a timeout returns when it ends and kills the
// exec'd process. With Caisson its children go too (runc kills the exec's own process
// only: for runc, what is left of the children is logged, not checked).
func TestCRIStopExecSyncTimeout(t *testing.T) {
	c := harness.StartCRI(t, harness.Options{})
	for _, handler := range []string{harness.RuncHandler, harness.Handler} {
		t.Run(handler, func(t *testing.T) {
			image := c.Pull(t, c.BusyboxRef, handler)
			cfg := c.PodConfig("execsync-"+handler, nil)
			pod := c.RunPod(t, cfg, handler)
			id := c.StartContainer(t, pod, cfg, harness.ContainerConfig("sleeper", image, "sleep", "100000"))
			// A child that holds no stream of the exec (one that did would keep runc's ExecSync
			// waiting for the streams' end, past its timeout), and the exec's own process,
			// which holds them.
			const timeout = 3
			start := time.Now()
			resp, err := c.Runtime.ExecSync(c.Ctx(t), &runtime.ExecSyncRequest{ContainerId: id, Timeout: timeout,
				Cmd: []string{"sh", "-c", `sleep 100001 </dev/null >/dev/null 2>&1 & exec sleep 100002`}})
			took := time.Since(start)
			t.Logf("ExecSync with timeout %ds: %v, %v after %s", timeout, resp, err, took.Round(time.Millisecond))
			if err == nil {
				t.Errorf("ExecSync past its timeout succeeded: %v", resp)
			}
			if took > timeout*time.Second+stopMargin {
				t.Errorf("ExecSync took %s, over its %ds timeout + %s", took, timeout, stopMargin)
			}
			procs, _, _ := c.Exec(t, id, "sh", "-c", `for p in /proc/[0-9]*; do echo "$(tr '\0' ' ' < $p/cmdline 2>/dev/null)"; done`)
			t.Logf("processes in the container after the timeout:\n%s", procs)
			if strings.Contains(procs, "sleep 100002") {
				t.Errorf("the exec's process still runs after its timeout:\n%s", procs)
			}
			if handler == harness.Handler && strings.Contains(procs, "sleep 100001") {
				t.Errorf("a child of the exec still runs after its timeout:\n%s", procs)
			}
			c.RemovePod(t, pod)
			if left := c.Leftovers(); len(left) > 0 {
				t.Errorf("left after the pod: %v", left)
			}
		})
	}
}

// freezeQEMU stops the pod VM's QEMU with SIGSTOP, which freezes the guest: its agent
// answers nothing, as a hung guest would. The test's end continues it, should the shim
// not have killed it.
func freezeQEMU(t *testing.T, e *harness.Env) int {
	t.Helper()
	// QEMUs lists the pod's virtiofsd too, when it has one.
	var qemus []int
	for _, p := range e.QEMUs() {
		comm, _ := os.ReadFile("/proc/" + p + "/comm")
		if strings.HasPrefix(string(comm), "qemu-system") {
			pid, _ := strconv.Atoi(p)
			qemus = append(qemus, pid)
		}
	}
	if len(qemus) != 1 {
		t.Fatalf("want one QEMU, have %v (of %v)", qemus, e.QEMUs())
	}
	pid := qemus[0]
	if err := syscall.Kill(pid, syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { syscall.Kill(pid, syscall.SIGCONT) })
	return pid
}

// TestCRIStopSilentGuest: a pod whose guest stops answering (its QEMU frozen) is stopped
// all the same: StopContainer with a grace period, then StopPodSandbox, end within the
// grace period + 10 s with QEMU gone and the containers exited 137 (the VM was killed);
// RemovePodSandbox leaves nothing (CNI teardown ran).
func TestCRIStopSilentGuest(t *testing.T) {
	c := harness.StartCRI(t, harness.Options{})
	image := c.Pull(t, c.BusyboxRef, harness.Handler)
	cfg := c.PodConfig("silent", nil)
	pod := c.RunPod(t, cfg, harness.Handler)
	id := startTermIgnorer(t, c, pod, cfg, image, "trap-term")
	freezeQEMU(t, c.Env)

	const grace = 2
	limit := grace*time.Second + 10*time.Second
	ctx, cancel := context.WithTimeout(c.Ctx(t), 3*limit) // a hang fails the test, not the suite
	defer cancel()
	start := time.Now()
	// Whether StopContainer succeeds (the shim killed the VM) or fails (the guest could
	// not be asked), the kubelet goes on to StopPodSandbox.
	_, err := c.Runtime.StopContainer(ctx, &runtime.StopContainerRequest{ContainerId: id, Timeout: grace})
	t.Logf("StopContainer with timeout %ds: %v after %s", grace, err, time.Since(start).Round(time.Millisecond))
	if _, err := c.Runtime.StopPodSandbox(ctx, &runtime.StopPodSandboxRequest{PodSandboxId: pod}); err != nil {
		t.Fatalf("StopPodSandbox of a silent guest: %v after %s", err, time.Since(start))
	}
	took := time.Since(start)
	t.Logf("StopContainer + StopPodSandbox of a silent guest took %s", took.Round(time.Millisecond))
	if took > limit {
		t.Errorf("stopping a silent guest took %s, over the grace period + 10 s (%s)", took, limit)
	}
	if q := c.QEMUs(); len(q) > 0 {
		t.Errorf("QEMU still runs after StopPodSandbox: %v", q)
	}
	checkExited(t, c, "trap-term", id, sigkilled)
	if _, err := c.Runtime.RemovePodSandbox(c.Ctx(t), &runtime.RemovePodSandboxRequest{PodSandboxId: pod}); err != nil {
		t.Fatalf("RemovePodSandbox: %v", err)
	}
	if left := c.Leftovers(); len(left) > 0 {
		t.Errorf("left after the pod: %v", left)
	}
}

// TestCRIStopCtrKill: `ctr task kill -s SIGKILL` then `ctr task delete` of a container
// whose PID 1 ignores SIGTERM (runc first, as the control, then Caisson), and then of a
// Caisson container whose guest is silent (QEMU frozen), which must end with the VM
// killed, the task exited 137, and nothing left.
func TestCRIStopCtrKill(t *testing.T) {
	c := harness.StartCRI(t, harness.Options{})
	run := func(t *testing.T, rt testRuntime, id string) {
		t.Helper()
		if out, errOut, code := c.Ctr(t, "images", "pull", "--plain-http", "--snapshotter", rt.snapshotter, c.BusyboxRef); code != 0 {
			t.Fatalf("ctr images pull (exit %d):\n%s%s", code, out, errOut)
		}
		if out, errOut, code := c.Ctr(t, "run", "-d", "--runtime", rt.runtime, "--snapshotter", rt.snapshotter,
			c.BusyboxRef, id, "sh", "-c", `trap "" TERM; sleep 100000`); code != 0 {
			t.Fatalf("ctr run (exit %d):\n%s%s", code, out, errOut)
		}
		t.Cleanup(func() {
			c.Ctr(t, "task", "delete", "-f", id)
			c.Ctr(t, "containers", "delete", id)
		})
	}
	killDelete := func(t *testing.T, id string, limit time.Duration) {
		t.Helper()
		start := time.Now()
		if out, errOut, code := c.Ctr(t, "task", "kill", "-s", "SIGKILL", id); code != 0 {
			t.Errorf("ctr task kill -s SIGKILL (exit %d): %s%s", code, out, errOut)
		}
		// The exit is asynchronous: delete once the task is stopped.
		var status string
		for time.Since(start) < limit {
			out, _, _ := c.Ctr(t, "task", "ls")
			for _, l := range strings.Split(out, "\n") {
				if f := strings.Fields(l); len(f) == 3 && f[0] == id {
					status = f[2]
				}
			}
			if status == "STOPPED" {
				break
			}
			time.Sleep(200 * time.Millisecond)
		}
		// ctr task delete warns of a non-zero exit status.
		out, errOut, code := c.Ctr(t, "task", "delete", id)
		took := time.Since(start)
		t.Logf("kill -s SIGKILL + delete took %s: exit %d %s%s", took.Round(time.Millisecond), code, out, errOut)
		if status != "STOPPED" || code != 0 {
			t.Fatalf("task %s after SIGKILL, then ctr task delete exited %d: %s%s", status, code, out, errOut)
		}
		if !strings.Contains(errOut, "exit code 137") {
			t.Errorf("ctr task delete: %q; want the exit status, 137", errOut)
		}
		if took > limit {
			t.Errorf("kill + delete took %s, over %s", took, limit)
		}
		if out, errOut, code := c.Ctr(t, "containers", "delete", id); code != 0 {
			t.Errorf("ctr containers delete (exit %d): %s%s", code, out, errOut)
		}
	}
	for _, rt := range []testRuntime{runcControl, caissonRuntime} {
		t.Run(rt.name, func(t *testing.T) {
			id := "ctr-kill-" + rt.name
			run(t, rt, id)
			killDelete(t, id, stopMargin)
			if left := c.Leftovers(); len(left) > 0 {
				t.Errorf("left after the container: %v", left)
			}
		})
	}
	t.Run("caisson-silent", func(t *testing.T) {
		id := "ctr-kill-silent"
		run(t, caissonRuntime, id)
		freezeQEMU(t, c.Env)
		killDelete(t, id, 10*time.Second)
		if q := c.QEMUs(); len(q) > 0 {
			t.Errorf("QEMU still runs after kill and delete: %v", q)
		}
		if left := c.Leftovers(); len(left) > 0 {
			t.Errorf("left after the container: %v", left)
		}
	})
}
