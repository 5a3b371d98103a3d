package agent

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"runtime"
	"time"

	"github.com/rs/zerolog"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/grpc/reflection"

	"github.com/snakepit/snakepit/pkg/client"
	"github.com/snakepit/snakepit/pkg/hw"
	snakepitv1 "github.com/snakepit/snakepit/proto/snakepit/v1"
)

// Hooks let the caller of Serve follow the daemon's lifecycle (cmd/snakepitd
// tells systemd).
type Hooks struct {
	// Listening is called with the bound address before workers start.
	Listening func(addr net.Addr)
	// MetricsListening is called with the bound address of /metrics.
	MetricsListening func(addr net.Addr)
	// Ready is called once every pool is ready and health says SERVING.
	Ready func()
	// Stopping is called when shutdown begins.
	Stopping func()
}

// PoolHealthService is the grpc.health.v1 service name that reports one
// pool: SERVING while it has a ready worker and none of its workers is
// tainted for crashing past the restart budget. The empty service name
// reports the node: SERVING while every pool has a ready worker.
func PoolHealthService(pool string) string { return "snakepit.pool." + pool }

// Serve runs a node until ctx is done, then shuts it down in order:
//
//  0. the node is deregistered from discovery (cfg.Discovery), so peers'
//     routers drop it at once;
//  1. gRPC health turns NOT_SERVING, so peers and load balancers stop
//     sending calls;
//  2. the server stops accepting calls and lets those in flight and queued
//     finish, for at most cfg.ShutdownGrace;
//  3. calls still running then are cancelled (in Python too);
//  4. every worker is stopped: its sockets are closed, then its process
//     group gets SIGTERM, then SIGKILL, each after the pool's stop_grace.
//
// Serve returns nil after a clean stop, and an error when the node could not
// start (a bad config, a port in use, an adapter that does not load).
func Serve(ctx context.Context, cfg Config, log zerolog.Logger, hooks Hooks) error {
	n, err := New(cfg, log)
	if err != nil {
		return err
	}
	cfg = n.Config()
	inv := hw.Detect(log)
	if err := applyGPUs(n, inv); err != nil {
		return err
	}
	members, err := newMembership(n, inv, log)
	if err != nil {
		return err
	}
	lis, err := net.Listen("tcp", cfg.Listen)
	if err != nil {
		return fmt.Errorf("listen on %s (listen): %w", cfg.Listen, err)
	}
	n.addr.Store(lis.Addr().String())
	if hooks.Listening != nil {
		hooks.Listening(lis.Addr())
	}
	if cfg.MetricsListen != "off" {
		maddr, stopMetrics, err := n.metrics.serve(cfg.MetricsListen)
		if err != nil {
			lis.Close()
			return fmt.Errorf("metrics_listen %s: %w", cfg.MetricsListen, err)
		}
		defer stopMetrics()
		n.log.Info().Str("metrics_listen", maddr.String()).Msg("serving metrics")
		if hooks.MetricsListening != nil {
			hooks.MetricsListening(maddr)
		}
	}
	auth, err := adminAuth(cfg.AdminTokenFile, cfg.AdminIdentities)
	if err != nil {
		lis.Close()
		return err
	}
	var tcpCreds []grpc.ServerOption
	if cfg.TLS.Enabled() {
		tc, err := cfg.TLS.serverTLS()
		if err != nil {
			lis.Close()
			return err
		}
		tcpCreds = append(tcpCreds, grpc.Creds(credentials.NewTLS(tc)))
	}
	newServer := func(extra []grpc.ServerOption, interceptors ...grpc.UnaryServerInterceptor) *grpc.Server {
		return grpc.NewServer(append(extra,
			// Fixed windows: no bandwidth-delay PINGs (pkg/client).
			grpc.InitialWindowSize(client.StreamWindow),
			grpc.InitialConnWindowSize(client.ConnWindow),
			// Handlers run on long-lived goroutines whose stacks have
			// already grown, instead of a fresh goroutine per call
			// (grpc-go marks the option experimental; it falls back to a
			// new goroutine when all are busy): about 12 us off a call's
			// p50 here.
			grpc.NumStreamWorkers(uint32(runtime.GOMAXPROCS(0))),
			grpc.MaxRecvMsgSize(cfg.MaxMessageBytes),
			grpc.MaxSendMsgSize(cfg.MaxMessageBytes),
			grpc.MaxConcurrentStreams(uint32(cfg.MaxStreamsPerConnection)),
			grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{MinTime: 5 * time.Second, PermitWithoutStream: true}),
			grpc.ChainUnaryInterceptor(append([]grpc.UnaryServerInterceptor{recoverUnary(n.log), n.loadUnary()}, interceptors...)...),
			grpc.ChainStreamInterceptor(recoverStream(n.log), n.loadStream()),
		)...)
	}
	hs := health.NewServer()
	hs.SetServingStatus("", healthpb.HealthCheckResponse_NOT_SERVING)
	hs.SetServingStatus(snakepitv1.Snakepit_ServiceDesc.ServiceName, healthpb.HealthCheckResponse_NOT_SERVING)
	register := func(s *grpc.Server) {
		snakepitv1.RegisterSnakepitServer(s, &clusterService{service: &service{node: n}, members: members})
		snakepitv1.RegisterAdminServer(s, &adminService{node: n})
		healthpb.RegisterHealthServer(s, hs)
		reflection.Register(s)
	}
	// The TCP port serves everyone; its Admin verbs need the bearer token.
	srv := newServer(tcpCreds, auth)
	defer srv.Stop() // on every return; a no-op after the shutdown below
	register(srv)
	// The local admin socket serves the same services to whoever may open
	// it (mode 0660).
	var adminSrv *grpc.Server
	if path := AdminSocketPath(cfg); path != "" {
		alis, err := listenAdminSocket(path, cfg.AdminSocketGroup)
		if err != nil {
			lis.Close()
			return err
		}
		defer os.Remove(path)
		adminSrv = newServer(nil)
		defer adminSrv.Stop()
		register(adminSrv)
		go func() { _ = adminSrv.Serve(alis) }()
		n.log.Info().Str("admin_socket", path).Msg("serving admin socket")
	}

	log = n.log
	nodeCtx, stopNode := context.WithCancel(context.WithoutCancel(ctx))
	defer stopNode()
	nodeErr := make(chan error, 1)
	go func() { nodeErr <- n.Run(nodeCtx) }()
	serveErr := make(chan error, 1)
	go func() { serveErr <- srv.Serve(lis) }()
	log.Info().Str("listen", lis.Addr().String()).Str("node_id", cfg.NodeID).Str("version", Version).Msg("serving")
	// Discovery: registered once the node is ready, deregistered first on
	// stop; an unreachable backend never stops the node from serving.
	membersCtx, stopMembers := context.WithCancel(context.WithoutCancel(ctx))
	defer stopMembers()
	membersErr := make(chan error, 1)
	go func() { membersErr <- members.run(membersCtx, publishAddr(cfg, lis.Addr())) }()
	// The cluster router follows the directory until the node stops.
	routerDone := make(chan struct{})
	go func() { defer close(routerDone); n.cluster.run(nodeCtx, members.Directory()) }()

	setServing := func(s healthpb.HealthCheckResponse_ServingStatus) {
		hs.SetServingStatus("", s)
		hs.SetServingStatus(snakepitv1.Snakepit_ServiceDesc.ServiceName, s)
	}
	var runErr error
	select {
	case <-n.Ready():
		updateHealth := func() {
			st := healthpb.HealthCheckResponse_NOT_SERVING
			healthy := n.Healthy()
			if healthy {
				st = healthpb.HealthCheckResponse_SERVING
			}
			setServing(st)
			members.setHealthy(healthy)
			// The router ranks this node with its live health: rebuild
			// now, not at the next refresh (a node just ready would
			// otherwise refuse its own pools' calls for up to a second).
			n.cluster.kick()
			for _, p := range n.Status().Pools {
				ps := healthpb.HealthCheckResponse_NOT_SERVING
				if p.Ready > 0 && !p.Tainted && (p.State == PoolReady || p.State == PoolDegraded) {
					ps = healthpb.HealthCheckResponse_SERVING
				}
				hs.SetServingStatus(PoolHealthService(p.Name), ps)
			}
		}
		updateHealth()
		healthDone := make(chan struct{})
		defer func() { <-healthDone }()
		go func() {
			defer close(healthDone)
			for {
				select {
				case <-n.HealthChanges():
					updateHealth()
				case <-nodeCtx.Done():
					return
				}
			}
		}()
		if hooks.Ready != nil {
			hooks.Ready()
		}
		select {
		case <-ctx.Done():
		case runErr = <-nodeErr:
			nodeErr <- runErr
		case runErr = <-serveErr:
		case runErr = <-membersErr:
			membersErr <- runErr
		}
	case <-ctx.Done():
	case runErr = <-nodeErr:
		nodeErr <- runErr
	case runErr = <-serveErr:
	case runErr = <-membersErr:
		membersErr <- runErr
	}

	// Shutdown, in the order documented above.
	members.deregister(ctx)
	if hooks.Stopping != nil {
		hooks.Stopping()
	}
	log.Info().Dur("grace", cfg.ShutdownGrace).Msg("stopping")
	hs.Shutdown()
	stopped := make(chan struct{})
	go func() { srv.GracefulStop(); close(stopped) }()
	t := time.NewTimer(cfg.ShutdownGrace)
	select {
	case <-stopped:
	case <-t.C:
		log.Warn().Dur("grace", cfg.ShutdownGrace).Msg("calls still running after shutdown_grace; cancelling them")
		srv.Stop()
		<-stopped
	}
	t.Stop()
	if adminSrv != nil {
		adminSrv.Stop()
	}
	stopNode()
	nerr := <-nodeErr
	<-routerDone
	stopMembers()
	if merr := <-membersErr; merr != nil && !errors.Is(runErr, merr) {
		nerr = errors.Join(nerr, merr)
	}
	if runErr != nil && !errors.Is(runErr, grpc.ErrServerStopped) {
		if errors.Is(runErr, nerr) || nerr == nil {
			return runErr
		}
		return errors.Join(runErr, nerr)
	}
	if nerr == nil {
		log.Info().Msg("stopped")
	}
	return nerr
}
