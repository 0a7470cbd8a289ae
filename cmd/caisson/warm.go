package main

import (
	"fmt"
	"os"
	"text/tabwriter"
	"time"

	"github.com/urfave/cli/v2"

	"github.com/caisson-containers/caisson/shim/pod"
	"github.com/caisson-containers/caisson/shim/warm"
)

var warmCommand = &cli.Command{
	Name:  "warm",
	Usage: "warm VMs waiting for pods (hypervisor.warm_vms)",
	Subcommands: []*cli.Command{
		{
			Name:  "list",
			Usage: "list the warm VMs' shims, waiting or serving the pod that claimed them",
			Flags: []cli.Flag{configFlag},
			Action: func(c *cli.Context) error {
				cfg, err := loadConfig(c)
				if err != nil {
					return err
				}
				pools, err := warm.Pools(cfg.StateDir)
				if err != nil {
					return err
				}
				w := tabwriter.NewWriter(os.Stdout, 0, 4, 2, ' ', 0)
				fmt.Fprintln(w, "SLOT\tPID\tSTATE\tBUNDLE")
				for _, p := range pools {
					slots, err := p.Slots()
					if err != nil {
						return err
					}
					for _, s := range slots {
						fmt.Fprintf(w, "%s\t%d\t%s\t%s\n", s.Dir, s.Pid, slotState(s), s.Claimed)
					}
				}
				return w.Flush()
			},
		},
		{
			Name:  "remove",
			Usage: "end every waiting warm VM (claimed ones serve pods and stay); pods started later fill the pool again",
			Flags: []cli.Flag{configFlag},
			Action: func(c *cli.Context) error {
				cfg, err := loadConfig(c)
				if err != nil {
					return err
				}
				n, err := warm.Drain(cfg.StateDir, 10*time.Second, pod.ReleaseWarmSlot)
				fmt.Printf("ended %d waiting warm VMs\n", n)
				return err
			},
		},
	},
}

func slotState(s warm.Slot) string {
	switch {
	case !s.Live:
		return "dead"
	case s.Claimed != "":
		return "claimed"
	case s.Ready:
		return "waiting"
	}
	return "warming"
}
