// Command caisson is Caisson's operator CLI.
package main

import (
	"fmt"
	"os"

	"github.com/urfave/cli/v2"

	"github.com/caisson-containers/caisson/version"
)

func main() {
	app := &cli.App{
		Name:     "caisson",
		Usage:    "operate Caisson, VM-isolated containers for containerd",
		Version:  version.Version + " " + version.Revision,
		Commands: []*cli.Command{checkCommand, configCommand, templateCommand, warmCommand},
	}
	if err := app.Run(os.Args); err != nil {
		fmt.Fprintln(os.Stderr, "caisson:", err)
		os.Exit(1)
	}
}
