// Command containerd-shim-caisson-v2 is Caisson's containerd runtime
// (runtime_type "io.containerd.caisson.v2"): each pod runs in a VM. One binary
// serves containerd 1.7 through 2.4 (shim/launch, shim/taskv2).
package main

import (
	"context"
	"os"

	"github.com/containerd/containerd/v2/pkg/shim"

	_ "github.com/caisson-containers/caisson/plugins/shim"
	"github.com/caisson-containers/caisson/shim/launch"
	"github.com/caisson-containers/caisson/shim/manager"
)

func main() {
	if len(os.Args) > 1 && os.Args[1] == manager.WarmAction {
		// A warm shim: it returns once a pod claimed it, as that pod's shim.
		manager.RunWarm(context.Background(), os.Args[2:])
	}
	launch.Run(context.Background(), manager.New("io.containerd.caisson.v2"), func(c *shim.Config) {
		// The shim waits for each child it starts (QEMU, mkfs, logging binaries) through
		// os/exec. containerd's implicit reaper would wait4(-1) on SIGCHLD and steal
		// those exit statuses ("waitid: no child processes"); and as a subreaper the shim
		// would inherit orphans nobody waits for. Orphans go to init instead.
		c.NoReaper = true
		c.NoSubreaper = true
	})
}
