// Command spbench measures snakepit against floors measured in the same run:
// `make bench` runs it. See internal/bench.
package main

import (
	"context"
	"os"

	"github.com/snakepit/snakepit/internal/bench"
)

func main() {
	os.Exit(bench.Main(context.Background(), os.Args[1:], os.Stdout, os.Stderr))
}
