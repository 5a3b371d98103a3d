// Command spctl is the operator's CLI for snakepit nodes. It talks gRPC to
// one node (--addr, $SNAKEPIT_ADDR, or the local default) and imports only
// the generated API and pkg/client.
package main

import (
	"context"
	"os"
)

func main() {
	os.Exit(run(context.Background(), os.Args[1:], os.Stdout, os.Stderr))
}
