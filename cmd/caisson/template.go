package main

import (
	"context"
	"fmt"
	"os"
	"os/signal"
	"text/tabwriter"
	"time"

	"github.com/urfave/cli/v2"

	"github.com/caisson-containers/caisson/shim/pod"
	"github.com/caisson-containers/caisson/shim/template"
	"github.com/caisson-containers/caisson/shim/vmm/hypervisor"
)

var templateCommand = &cli.Command{
	Name:  "template",
	Usage: "VM templates pod VMs start from (hypervisor.template)",
	Subcommands: []*cli.Command{
		{
			Name:  "create",
			Usage: "make the template of the configured pod VM now, rather than with the first pod",
			Flags: []cli.Flag{configFlag},
			Action: func(c *cli.Context) error {
				cfg, err := loadConfig(c)
				if err != nil {
					return err
				}
				ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
				defer stop()
				start := time.Now()
				hv, err := hypervisor.New(cfg)
				if err != nil {
					return err
				}
				dir, err := pod.Template(ctx, cfg, hv)
				if err != nil {
					return err
				}
				fmt.Printf("%s (%.1f s)\n", dir, time.Since(start).Seconds())
				if !cfg.Hypervisor.Template {
					fmt.Fprintln(os.Stderr, "note: hypervisor.template is off in this configuration: pods boot and do not use it")
				}
				return nil
			},
		},
		{
			Name:  "list",
			Usage: "list the templates",
			Flags: []cli.Flag{configFlag},
			Action: func(c *cli.Context) error {
				cfg, err := loadConfig(c)
				if err != nil {
					return err
				}
				infos, err := template.List(pod.TemplatesRoot(cfg))
				if err != nil {
					return err
				}
				w := tabwriter.NewWriter(os.Stdout, 0, 4, 2, ' ', 0)
				fmt.Fprintln(w, "DIR\tVCPUS\tMEMORY\tRESIDENT\tMADE\tINITRAMFS")
				for _, i := range infos {
					fmt.Fprintf(w, "%s\t%d\t%d MiB\t%d MiB\t%s\t%s\n", i.Dir, i.VCPUs, i.MemoryMiB, i.Resident>>20, i.Made.Format(time.RFC3339), i.Initramfs)
				}
				return w.Flush()
			},
		},
		{
			Name:  "remove",
			Usage: "remove every template (running VMs made from them keep running)",
			Flags: []cli.Flag{configFlag},
			Action: func(c *cli.Context) error {
				cfg, err := loadConfig(c)
				if err != nil {
					return err
				}
				busy, err := template.RemoveAll(pod.TemplatesRoot(cfg))
				if err != nil {
					return err
				}
				if len(busy) > 0 {
					return fmt.Errorf("being made right now, left: %v", busy)
				}
				return nil
			},
		},
	},
}
