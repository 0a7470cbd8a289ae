// containerd-caisson is containerd (v2, with its usual built-in plugins) plus
// Caisson's block snapshotter built in as the "caisson" snapshot plugin, for
// hosts that prefer one daemon to a proxy plugin.
package main

import (
	"context"
	"fmt"
	"os"

	"github.com/containerd/containerd/v2/cmd/containerd/command"

	_ "github.com/containerd/containerd/v2/cmd/containerd/builtins"

	_ "github.com/caisson-containers/caisson/plugins/snapshotter"
)

func main() {
	if err := command.App().Run(context.Background(), os.Args); err != nil {
		fmt.Fprintln(os.Stderr, "containerd:", err)
		os.Exit(1)
	}
}
