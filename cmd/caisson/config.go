package main

import (
	"os"

	"github.com/urfave/cli/v2"

	"github.com/caisson-containers/caisson/shim/config"
)

// configFlag names the runtime configuration a command works with.
var configFlag = &cli.StringFlag{Name: "config", Usage: "runtime config file (default: $CAISSON_CONFIG, then " + config.DefaultPath + ")"}

// loadConfig loads the configuration configFlag names.
func loadConfig(c *cli.Context) (config.Config, error) {
	cfg, _, err := config.Load(c.String(configFlag.Name))
	return cfg, err
}

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
