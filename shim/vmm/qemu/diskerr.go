package qemu

import (
	"context"
	"encoding/json"
	"sync"
	"time"

	"github.com/containerd/log"

	"github.com/caisson-containers/caisson/shim/vmm/qemu/qmp"
)

// Disk errors. Every virtio-blk device has werror=report and rerror=report (diskDevice):
// a write or read the host cannot complete, a full host filesystem (ENOSPC) included,
// fails in the guest with an I/O error, as on a failing physical disk, and the VM keeps
// running. QEMU's default for writes (auto: enospc) would pause the whole VM on ENOSPC
// instead: every container of the pod frozen, the agent silent, the shim's calls timing
// out, until someone frees space and resumes it by hand. werror=enospc is that default;
// report is what a container on a runc host sees when its disk fills up.
//
// QEMU sends a BLOCK_IO_ERROR event per failed request; the shim logs them rate-limited
// (the first at once, then one summary per diskErrorLogEvery) and counts them. A VM that
// pauses for an I/O error all the same (a device added some other way, or a future
// default) is resumed, with a backoff, so that a full disk does not freeze the pod for
// good: the guest's request is retried, and succeeds once there is space again.
const (
	// diskErrorLogEvery bounds how often disk errors are logged after the first.
	diskErrorLogEvery = 10 * time.Second
	// resumeFirst and resumeMax are the first and the longest wait before resuming a
	// VM paused by an I/O error.
	resumeFirst = 100 * time.Millisecond
	resumeMax   = 10 * time.Second
)

// blockIOError is the data of QEMU's BLOCK_IO_ERROR event.
type blockIOError struct {
	Device    string `json:"device"` // the drive's name; "" for -blockdev nodes
	NodeName  string `json:"node-name"`
	Operation string `json:"operation"` // read or write
	Action    string `json:"action"`    // report, ignore or stop
	NoSpace   bool   `json:"nospace"`
	Reason    string `json:"reason"`
}

// diskErrors counts and logs the VM's disk errors, rate-limited.
type diskErrors struct {
	mu         sync.Mutex
	total      uint64 // every BLOCK_IO_ERROR since start
	unlogged   uint64 // since the last log line
	lastLogged time.Time
	lastNode   string
	pauses     int // VM pauses for an I/O error, for the resume backoff
}

// record counts n errors of the same kind and logs them unless one was logged less
// than diskErrorLogEvery ago (then the next log line counts them).
func (d *diskErrors) record(ev blockIOError, n uint64, now time.Time) {
	d.mu.Lock()
	d.total += n
	d.unlogged += n
	if !d.lastLogged.IsZero() && now.Sub(d.lastLogged) < diskErrorLogEvery && ev.NodeName == d.lastNode {
		d.mu.Unlock()
		return
	}
	count := d.unlogged
	d.unlogged = 0
	d.lastLogged = now
	d.lastNode = ev.NodeName
	d.mu.Unlock()
	log.L.WithFields(log.Fields{
		"node":      ev.NodeName,
		"operation": ev.Operation,
		"action":    ev.Action,
		"nospace":   ev.NoSpace,
		"reason":    ev.Reason,
		"errors":    count,
	}).Warn("disk I/O error on the host, reported to the guest")
}

// DiskErrors is how many disk I/O errors QEMU has reported (BLOCK_IO_ERROR events) since
// Start: each failed a guest request with an I/O error.
func (v *VM) DiskErrors() uint64 {
	v.diskErrs.mu.Lock()
	defer v.diskErrs.mu.Unlock()
	return v.diskErrs.total
}

// onBlockIOError handles a BLOCK_IO_ERROR event (n coalesced ones).
func (v *VM) onBlockIOError(ev qmp.Event) {
	var d blockIOError
	if err := json.Unmarshal(ev.Data, &d); err != nil {
		log.L.WithError(err).Warn("undecodable BLOCK_IO_ERROR event")
	}
	v.diskErrs.record(d, uint64(max(ev.Count, 1)), time.Now())
}

// onStop handles a STOP event: if QEMU paused the VM because of an I/O error, resume
// it after a backoff that grows with each such pause. Pauses of the shim's own (saving
// a template) have another status and are left alone.
func (v *VM) onStop(c *qmp.Client) {
	ctx, cancel := context.WithTimeout(context.Background(), qmpTimeout)
	defer cancel()
	var st struct {
		Status string `json:"status"`
	}
	if err := c.Execute(ctx, "query-status", nil, &st); err != nil || st.Status != "io-error" {
		return
	}
	v.diskErrs.mu.Lock()
	v.diskErrs.pauses++
	wait := resumeFirst << min(v.diskErrs.pauses-1, 10)
	v.diskErrs.mu.Unlock()
	wait = min(wait, resumeMax)
	log.L.WithField("resume_in", wait).Error("the VM paused on a host disk I/O error; resuming it")
	select {
	case <-time.After(wait):
	case <-v.stopCh:
		return
	case <-c.Done():
		return
	}
	if err := c.Execute(ctx, "cont", nil, nil); err != nil {
		log.L.WithError(err).Warn("resuming the VM after a disk I/O error")
	}
}
