// Package client is the small Go client of a snakepit node that spctl and Go
// programs use: it dials a node and maps gRPC errors back to what they mean.
// It depends only on grpc and the generated API, never on the daemon's
// packages.
package client

import (
	"fmt"
	"os"
	"strings"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	snakepitv1 "github.com/snakepit/snakepit/proto/snakepit/v1"
)

// DefaultAddress is where a node listens unless configured otherwise, and
// where spctl looks for one.
const DefaultAddress = "127.0.0.1:7420"

// EnvAddress is the environment variable that names the node spctl talks to.
const EnvAddress = "SNAKEPIT_ADDR"

// Address resolves the node address: the flag's value, else $SNAKEPIT_ADDR,
// else DefaultAddress.
func Address(flag string) string {
	if flag != "" {
		return flag
	}
	if a := os.Getenv(EnvAddress); a != "" {
		return a
	}
	return DefaultAddress
}

// Conn is a connection to one node.
type Conn struct {
	*grpc.ClientConn
	Snakepit snakepitv1.SnakepitClient
}

// Dial connects to the node at addr ("host:port" or "unix:///path").
// It does not wait for the connection; the first call does.
func Dial(addr string, opts ...grpc.DialOption) (*Conn, error) {
	target := addr
	if !strings.Contains(addr, "://") && !strings.HasPrefix(addr, "unix:") {
		target = "passthrough:///" + addr
	}
	opts = append([]grpc.DialOption{grpc.WithTransportCredentials(insecure.NewCredentials())}, opts...)
	cc, err := grpc.NewClient(target, opts...)
	if err != nil {
		return nil, fmt.Errorf("connect to %s: %w", addr, err)
	}
	return &Conn{ClientConn: cc, Snakepit: snakepitv1.NewSnakepitClient(cc)}, nil
}
