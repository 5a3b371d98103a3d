// Package client is the small Go client of a snakepit node that spctl and Go
// programs use: it dials a node and maps gRPC errors back to what they mean.
// It depends only on grpc and the generated API, never on the daemon's
// packages.
package client

import (
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"

	snakepitv1 "github.com/snakepit/snakepit/proto/snakepit/v1"
)

// DefaultAddress is where a node listens unless configured otherwise, and
// where spctl looks for one.
const DefaultAddress = "127.0.0.1:7420"

// EnvAddress is the environment variable that names the node spctl talks to.
const EnvAddress = "SNAKEPIT_ADDR"

// EnvAdminSocket names the admin socket spctl's admin verbs use.
const EnvAdminSocket = "SNAKEPIT_ADMIN_SOCKET"

// EnvTokenFile names a file holding the bearer token for admin verbs over
// TCP.
const EnvTokenFile = "SNAKEPIT_TOKEN_FILE"

// SystemdAdminSocket is where a node run by the shipped systemd unit
// (RuntimeDirectory=snakepitd) puts its admin socket.
const SystemdAdminSocket = "/run/snakepitd/admin.sock"

// DefaultStateDir is where a node keeps its state when none is configured:
// $STATE_DIRECTORY (set by systemd's StateDirectory=), else
// $XDG_STATE_HOME/snakepitd, else ~/.local/state/snakepitd.
func DefaultStateDir() string {
	if d := os.Getenv("STATE_DIRECTORY"); d != "" {
		return strings.Split(d, ":")[0]
	}
	if d := os.Getenv("XDG_STATE_HOME"); d != "" {
		return filepath.Join(d, "snakepitd")
	}
	if home, err := os.UserHomeDir(); err == nil {
		return filepath.Join(home, ".local", "state", "snakepitd")
	}
	return filepath.Join(os.TempDir(), fmt.Sprintf("snakepitd-%d", os.Getuid()))
}

// AdminSocket resolves the admin socket: the flag's value, else
// $SNAKEPIT_ADMIN_SOCKET, else the systemd unit's socket when it exists,
// else the one of a node with the default state directory (make run).
func AdminSocket(flag string) string {
	if flag != "" {
		return flag
	}
	if s := os.Getenv(EnvAdminSocket); s != "" {
		return s
	}
	if _, err := os.Stat(SystemdAdminSocket); err == nil {
		return SystemdAdminSocket
	}
	return filepath.Join(DefaultStateDir(), "admin.sock")
}

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

// Flow-control windows of snakepit's gRPC connections, fixed on both sides
// (daemon servers, peer connections and this client). Any fixed window
// turns off grpc-go's bandwidth-delay estimation, which sends a PING (and
// gets its ACK) with nearly every small message received: twice the
// packets, wake-ups and system calls of a unary call on a LAN or loopback.
// Measured on loopback (docs/benchmarks.md): a no-op call's p50 drops by
// about 35 us, a forwarded one's by about 55 us. The sizes are what the
// estimation would grow to for large messages: a 16 MiB request or result
// needs a handful of window updates.
const (
	// StreamWindow is the receive window of each call.
	StreamWindow = 4 << 20
	// ConnWindow is the receive window of each connection.
	ConnWindow = 16 << 20
)

// FlowControl returns the dial options that fix the windows. Dial applies
// them first, so a caller's own window options win.
func FlowControl() []grpc.DialOption {
	return []grpc.DialOption{grpc.WithInitialWindowSize(StreamWindow), grpc.WithInitialConnWindowSize(ConnWindow)}
}

// Conn is a connection to one node.
type Conn struct {
	*grpc.ClientConn
	Snakepit snakepitv1.SnakepitClient
	Admin    snakepitv1.AdminClient
}

// Dial connects to the node at addr ("host:port" or "unix:///path").
// It does not wait for the connection; the first call does.
func Dial(addr string, opts ...grpc.DialOption) (*Conn, error) {
	target := addr
	if !strings.Contains(addr, "://") && !strings.HasPrefix(addr, "unix:") {
		target = "passthrough:///" + addr
	}
	opts = append(append([]grpc.DialOption{grpc.WithTransportCredentials(insecure.NewCredentials())}, FlowControl()...), opts...)
	cc, err := grpc.NewClient(target, opts...)
	if err != nil {
		return nil, fmt.Errorf("connect to %s: %w", addr, err)
	}
	return &Conn{ClientConn: cc, Snakepit: snakepitv1.NewSnakepitClient(cc), Admin: snakepitv1.NewAdminClient(cc)}, nil
}

// TLS returns dial options for a node serving TLS: trust caFile (empty: the
// system's roots) and present certFile/keyFile as client certificate when
// given.
func TLS(caFile, certFile, keyFile string) (grpc.DialOption, error) {
	cfg := &tls.Config{MinVersion: tls.VersionTLS12}
	if caFile != "" {
		b, err := os.ReadFile(caFile)
		if err != nil {
			return nil, fmt.Errorf("--tls-ca: %w", err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(b) {
			return nil, fmt.Errorf("--tls-ca %s holds no PEM certificate", caFile)
		}
		cfg.RootCAs = pool
	}
	if certFile != "" || keyFile != "" {
		c, err := tls.LoadX509KeyPair(certFile, keyFile)
		if err != nil {
			return nil, fmt.Errorf("--tls-cert/--tls-key: %w", err)
		}
		cfg.Certificates = []tls.Certificate{c}
	}
	return grpc.WithTransportCredentials(credentials.NewTLS(cfg)), nil
}
