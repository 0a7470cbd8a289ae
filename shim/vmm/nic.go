package vmm

import "os"

// NIC is a network card whose host end is a tap device the caller opened (in the pod's
// network namespace, see package shim/network). The VMM uses the descriptor as it is and
// never creates or configures host network devices itself.
type NIC struct {
	// ID names the device; unique within a VM.
	ID string
	// MAC is the guest NIC's address, e.g. "0a:58:0a:58:00:05".
	MAC string
	// Tap is the open tap device (IFF_TAP|IFF_NO_PI). The caller keeps it open until
	// Start returns and closes its copy afterwards.
	Tap *os.File
}
