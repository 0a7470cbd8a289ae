// caisson-snapshotter serves Caisson's block snapshotter, and Caisson's differ
// (snapshotter/differ), to containerd as proxy plugins on one socket:
//
//	[proxy_plugins.caisson]
//	  type = "snapshot"
//	  address = "/run/caisson/snapshotter.sock"
//	[proxy_plugins.caisson-diff]
//	  type = "diff"
//	  address = "/run/caisson/snapshotter.sock"
//
// The differ reads layers from containerd's content store: it dials containerd at
// --containerd-address when it first needs to.
//
// It stops gracefully on SIGTERM or SIGINT.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"

	"github.com/containerd/log"

	"github.com/caisson-containers/caisson/snapshotter"
	"github.com/caisson-containers/caisson/snapshotter/config"
	"github.com/caisson-containers/caisson/snapshotter/differ"
	"github.com/caisson-containers/caisson/snapshotter/service"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "caisson-snapshotter:", err)
		os.Exit(1)
	}
}

func run() error {
	var (
		root       = flag.String("root", "", "snapshotter root directory (overrides the config's root; default "+config.DefaultRoot+")")
		address    = flag.String("address", "/run/caisson/snapshotter.sock", "unix socket to serve the snapshots API on")
		configPath = flag.String("config", "", "TOML config file (see contrib/snapshotter/config.toml)")
		logLevel   = flag.String("log-level", "info", "log level: trace, debug, info, warn, error")
		ctrAddress = flag.String("containerd-address", "/run/containerd/containerd.sock", "containerd's gRPC socket, whose content store the differ reads layers from")
	)
	flag.Parse()
	if flag.NArg() > 0 {
		return fmt.Errorf("unexpected arguments %q", flag.Args())
	}
	if err := log.SetLevel(*logLevel); err != nil {
		return err
	}

	cfg := config.Default()
	if *configPath != "" {
		var err error
		if cfg, err = config.Load(*configPath); err != nil {
			return err
		}
	}
	if *root != "" {
		cfg.Root = *root
	}
	resolved, err := cfg.Resolve()
	if err != nil {
		return fmt.Errorf("config: %w", err)
	}

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()

	sn, err := snapshotter.New(ctx, resolved)
	if err != nil {
		return err
	}
	defer sn.Close()
	// Whatever a crash left behind goes before the first request.
	if err := sn.Cleanup(ctx); err != nil {
		log.G(ctx).WithError(err).Warn("cleanup at start")
	}
	// The differ's own mount manager (for what it hands to containerd's
	// applier) keeps its state beside the snapshots.
	d, err := differ.NewRemote(ctx, *ctrAddress, filepath.Join(resolved.Root, "mm"), resolved.Root, []differ.LayerWriter{sn})
	if err != nil {
		return err
	}
	defer d.Close()
	return service.Serve(ctx, sn, d, *address)
}
