package bench

import (
	"bufio"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"runtime"
	"strings"
	"time"

	"google.golang.org/grpc"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	"github.com/snakepit/snakepit/pkg/client"
)

// The relay floor: what one more process in a gRPC call's path costs with
// nothing of snakepit in it. spbench starts itself twice as bare gRPC
// servers of the health service ("relay-serve"): a leaf that answers at
// once, and a relay whose handler makes the same call to the leaf over a
// client connection and returns its answer, with the server options and
// windows the daemon uses. Calls to the relay against calls to the leaf,
// measured in the same run, give the cost of a hop through a forwarding
// process: the floor of what the router's hop adds.

// relayServeCmd is the hidden first argument that makes spbench a relay
// server.
const relayServeCmd = "relay-serve"

// relayServe serves the health service on a free loopback port, prints the
// address on stdout, and forwards each Check to -upstream when set. It
// serves until stdin closes (the parent spbench exited).
func relayServe(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet(relayServeCmd, flag.ContinueOnError)
	fs.SetOutput(stderr)
	upstream := fs.String("upstream", "", "address to forward each call to; empty answers at once")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	var up healthpb.HealthClient
	if *upstream != "" {
		c, err := client.Dial(*upstream)
		if err != nil {
			fmt.Fprintln(stderr, err)
			return 1
		}
		defer c.Close()
		up = healthpb.NewHealthClient(c)
	}
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		fmt.Fprintln(stderr, err)
		return 1
	}
	srv := grpc.NewServer(
		grpc.InitialWindowSize(client.StreamWindow),
		grpc.InitialConnWindowSize(client.ConnWindow),
		grpc.NumStreamWorkers(uint32(runtime.GOMAXPROCS(0))),
	)
	healthpb.RegisterHealthServer(srv, &relayHealth{up: up})
	go func() { _ = srv.Serve(lis) }()
	fmt.Fprintln(stdout, lis.Addr().String())
	_, _ = io.Copy(io.Discard, os.Stdin)
	srv.Stop()
	return 0
}

type relayHealth struct {
	healthpb.UnimplementedHealthServer
	up healthpb.HealthClient
}

func (h *relayHealth) Check(ctx context.Context, req *healthpb.HealthCheckRequest) (*healthpb.HealthCheckResponse, error) {
	if h.up != nil {
		return h.up.Check(ctx, req)
	}
	return &healthpb.HealthCheckResponse{Status: healthpb.HealthCheckResponse_SERVING}, nil
}

// relayProc is a relay-serve child.
type relayProc struct {
	cmd  *exec.Cmd
	in   io.WriteCloser
	addr string
}

// startRelay starts spbench relay-serve (forwarding to upstream when not
// empty) and returns once it listens.
func startRelay(ctx context.Context, upstream string) (*relayProc, error) {
	self, err := os.Executable()
	if err != nil {
		return nil, err
	}
	args := []string{relayServeCmd}
	if upstream != "" {
		args = append(args, "-upstream", upstream)
	}
	cmd := exec.CommandContext(ctx, self, args...)
	cmd.Stderr = os.Stderr
	in, err := cmd.StdinPipe()
	if err != nil {
		return nil, err
	}
	out, err := cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	p := &relayProc{cmd: cmd, in: in}
	line, err := bufio.NewReader(out).ReadString('\n')
	if err != nil {
		p.stop()
		return nil, fmt.Errorf("relay-serve printed no address: %w", err)
	}
	p.addr = strings.TrimSpace(line)
	return p, nil
}

func (p *relayProc) stop() {
	p.in.Close()
	done := make(chan struct{})
	go func() { _ = p.cmd.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		_ = p.cmd.Process.Kill()
		<-done
	}
}

// relayFloor measures n sequential calls to a leaf process and through a
// relay process to it, and returns both latencies (sorted).
func relayFloor(ctx context.Context, n int) (leaf, relayed []time.Duration, err error) {
	lp, err := startRelay(ctx, "")
	if err != nil {
		return nil, nil, err
	}
	defer lp.stop()
	rp, err := startRelay(ctx, lp.addr)
	if err != nil {
		return nil, nil, err
	}
	defer rp.stop()
	for _, x := range []struct {
		addr string
		out  *[]time.Duration
	}{{lp.addr, &leaf}, {rp.addr, &relayed}} {
		c, err := client.Dial(x.addr)
		if err != nil {
			return nil, nil, err
		}
		hc := healthpb.NewHealthClient(c)
		call := func() error { _, err := hc.Check(ctx, &healthpb.HealthCheckRequest{}); return err }
		if _, err := latencies(300, call); err != nil {
			c.Close()
			return nil, nil, err
		}
		*x.out, err = latencies(n, call)
		c.Close()
		if err != nil {
			return nil, nil, err
		}
	}
	if len(leaf) == 0 || len(relayed) == 0 {
		return nil, nil, errors.New("relay floor: no calls measured")
	}
	return leaf, relayed, nil
}
