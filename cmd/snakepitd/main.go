// Command snakepitd is the snakepit node daemon. It is wiring only: it turns
// flags, the environment and the config file into an agent.Config and runs
// agent.Serve until a signal stops it.
package main

import (
	"context"
	"os"
)

func main() {
	os.Exit(run(context.Background(), os.Args[1:], os.Stdout, os.Stderr))
}
