package main

import (
	"os"

	"github.com/urfave/cli/v2"

	"github.com/caisson-containers/caisson/cmd/caisson/hostcheck"
	"github.com/caisson-containers/caisson/shim/vmm/qemu/accel"
)

var checkCommand = &cli.Command{
	Name:  "check",
	Usage: "probe what this host offers Caisson and say which accelerator and transport it will use",
	Description: `Every item is decided by a real probe: guests are booted under each accelerator with a
timeout, a loop device attached, EROFS and overlay mounted, a tap device created.
Exits non-zero when Caisson cannot run here.`,
	Flags: []cli.Flag{
		configFlag,
		&cli.StringFlag{Name: "state-root", Value: "/var/lib/caisson", Usage: "where Caisson keeps its data; its free space is reported"},
		&cli.DurationFlag{Name: "probe-timeout", Value: accel.DefaultTimeout, Usage: "how long a probe guest may take before its accelerator counts as hung"},
		&cli.StringFlag{Name: "containerd-address", Value: "/run/containerd/containerd.sock", Usage: "containerd's socket: its version is checked against the snapshotter's mount_mode (\"\" skips)"},
		&cli.StringFlag{Name: "snapshotter-config", Value: "/etc/caisson/snapshotter.toml", Usage: "caisson-snapshotter's configuration file"},
	},
	Action: func(c *cli.Context) error {
		cfg, err := loadConfig(c)
		if err != nil {
			return err
		}
		results, verdict := hostcheck.Run(c.Context, hostcheck.Options{
			Config:       cfg,
			StateRoot:    c.String("state-root"),
			ProbeTimeout: c.Duration("probe-timeout"),

			ContainerdAddress: c.String("containerd-address"),
			SnapshotterConfig: c.String("snapshotter-config"),
		})
		hostcheck.Print(os.Stdout, results, verdict)
		if !verdict.CanRun {
			return cli.Exit("", 1)
		}
		return nil
	},
}
