// Command caisson-agent is the guest's init: it prepares the VM, runs the pod's containers
// and serves the shim's API. See package guest/agent.
package main

import (
	"context"
	"fmt"
	"os"

	"github.com/opencontainers/runc/libcontainer"
	_ "github.com/opencontainers/runc/libcontainer/nsenter"

	"github.com/caisson-containers/caisson/guest/agent"
)

func init() {
	// libcontainer starts every container process as "/proc/self/exe init": the nsenter
	// constructor has set up the namespaces before the Go runtime started; this finishes
	// the container's setup and execs its process. It does not return.
	if len(os.Args) > 1 && os.Args[1] == "init" {
		libcontainer.Init()
	}
}

func main() {
	if err := agent.Main(context.Background()); err != nil {
		fmt.Fprintln(os.Stderr, "caisson-agent:", err)
		os.Exit(1)
	}
}
