// Command containerd-shim-caisson-v2 is Caisson's containerd runtime
// (runtime_type "io.containerd.caisson.v2"): each pod runs in a VM.
package main

import (
	"context"

	"github.com/containerd/containerd/v2/pkg/shim"

	_ "github.com/caisson-containers/caisson/plugins/shim"
	"github.com/caisson-containers/caisson/shim/manager"
)

func main() {
	shim.RunShim(context.Background(), manager.New("io.containerd.caisson.v2"))
}
