package main

import (
	"os"

	"github.com/urfave/cli/v2"

	"github.com/caisson-containers/caisson/shim/config"
)

var configCommand = &cli.Command{
	Name:  "config",
	Usage: "runtime configuration",
	Subcommands: []*cli.Command{{
		Name:  "default",
		Usage: "print the complete default configuration, commented, with this installation's guest paths",
		Action: func(*cli.Context) error {
			return config.Default(config.DefaultArtifactsDir()).Write(os.Stdout)
		},
	}},
}
