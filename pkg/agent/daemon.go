// Package agent is the node: it wires the node's parts and runs them.
//
//	call/        the call vocabulary (leaf): request, result, affinity,
//	             session outcomes, errors and their fate
//	policy/      the swappable policies and their registry
//	engine/      the node-local pool engine: workers, queue, admission,
//	             sessions, resize, GPU book, operator intent, drain
//	cluster/     the cluster layer: routing, forwarding, peers, breaker,
//	             retry budget, deduplication; calls the engine through an
//	             interface
//	membership/  registration of self in discovery
//	wire/        the snakepit.v1 protocol as the edge and the cluster speak it
//	edge/        the gRPC edge: services, the error->status table, auth,
//	             TLS, limits, metrics endpoint
//
// This package holds the node's configuration (every default lives in
// config.go) and Serve, which builds each part with New(config, deps) and
// runs them under one errgroup. cmd/snakepitd only turns configuration
// into a Config and calls Serve.
package agent

import (
	"context"
	"net"

	"github.com/rs/zerolog"
	"golang.org/x/sync/errgroup"

	"github.com/snakepit/snakepit/pkg/agent/cluster"
	"github.com/snakepit/snakepit/pkg/agent/edge"
	"github.com/snakepit/snakepit/pkg/agent/engine"
	"github.com/snakepit/snakepit/pkg/agent/membership"
	"github.com/snakepit/snakepit/pkg/agent/policy"
	"github.com/snakepit/snakepit/pkg/hw"
)

// Version is the daemon's version, stamped at build time.
var Version = "dev"

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
// pool (see edge.PoolHealthService).
func PoolHealthService(pool string) string { return edge.PoolHealthService(pool) }

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
// A part that fails (an adapter that does not load, an unreadable TLS file
// of discovery) starts the same shutdown. Serve returns nil after a clean
// stop, and an error when the node could not start or a part failed.
func Serve(ctx context.Context, cfg Config, log zerolog.Logger, hooks Hooks) error {
	if err := cfg.Validate(); err != nil {
		return err
	}
	cfg = cfg.withDefaults()
	policies, err := cfg.buildPolicies()
	if err != nil {
		return err
	}
	inv := hw.Detect(log)

	// The parts, each New(config, deps): no I/O yet.
	metrics := edge.NewMetrics()
	eng, err := engine.New(engine.Config{
		NodeID: cfg.NodeID, StateDir: cfg.StateDir, MaxMessageBytes: cfg.MaxMessageBytes,
		StartConcurrency: cfg.StartConcurrency, MonitorInterval: cfg.MonitorInterval,
		MaxSessions: cfg.MaxSessions, NewSessionsPerSecond: cfg.NewSessionsPerSecond,
		NewSessionsBurst: cfg.NewSessionsBurst, StderrTail: DefaultStderrTail,
		DrainDeadline: DefaultDrainDeadline, Pools: cfg.Pools,
	}, engine.Deps{Log: log, Policies: policies, GPUs: inv, Observer: metrics})
	if err != nil {
		return err
	}
	metrics.ReadPools(eng)
	peerCreds, err := cfg.TLS.PeerCredentials()
	if err != nil {
		return err
	}
	members, err := membership.New(membership.Config{
		NodeID: cfg.NodeID, Version: Version, Discovery: cfg.Discovery, DeregisterTimeout: DeregisterTimeout,
	}, membership.Deps{Log: log, Local: eng, GPUs: inv})
	if err != nil {
		return err
	}
	metrics.CountDiscoveryRequests(members.Requests)
	router := cluster.New(cfg.Router, cluster.Deps{
		Log: log, NodeID: cfg.NodeID, Local: eng, Peers: members.Directory(), Creds: peerCreds,
		Policies: func(pool string) *policy.Set { return policies[pool] }, CallTimeout: DefaultCallTimeout,
		MaxMessageBytes: cfg.MaxMessageBytes, Observer: metrics,
	})
	srv := edge.New(edge.Config{
		NodeID: cfg.NodeID, Version: Version, Listen: cfg.Listen, MetricsListen: cfg.MetricsListen,
		AdminSocket: AdminSocketPath(cfg), AdminSocketGroup: cfg.AdminSocketGroup,
		AdminTokenFile: cfg.AdminTokenFile, AdminIdentities: cfg.AdminIdentities, TLS: cfg.TLS,
		MaxMessageBytes: cfg.MaxMessageBytes, MaxStreamsPerConnection: cfg.MaxStreamsPerConnection,
		ClusterStatusTimeout: DefaultClusterStatusTimeout, Advertise: cfg.Advertise,
	}, edge.Deps{Log: log, Calls: router, Engine: eng, Cluster: router, Members: members, Metrics: metrics, PeerCreds: peerCreds})

	if err := srv.Listen(); err != nil {
		return err
	}
	if hooks.Listening != nil {
		hooks.Listening(srv.Addr())
	}
	if a := srv.MetricsAddr(); a != nil && hooks.MetricsListening != nil {
		hooks.MetricsListening(a)
	}
	members.SetAddr(membership.PublishAddr(cfg.Advertise, srv.Addr()))
	log = log.With().Str("component", "agent").Logger()
	log.Info().Str("listen", srv.Addr().String()).Str("node_id", cfg.NodeID).Str("version", Version).Msg("serving")

	// Each part runs under its own context, cancelled in the shutdown
	// order below; the errgroup's context says that a part failed.
	bg := context.WithoutCancel(ctx)
	engCtx, stopEngine := context.WithCancel(bg)
	defer stopEngine()
	membersCtx, stopMembers := context.WithCancel(bg)
	defer stopMembers()
	g, failed := errgroup.WithContext(bg)
	g.Go(func() error { return eng.Run(engCtx) })
	g.Go(func() error { return router.Run(engCtx) })
	g.Go(func() error { return members.Run(membersCtx) })
	g.Go(func() error { return srv.Run(engCtx) })
	g.Go(func() error {
		// Health: published once the engine is ready, then on every change.
		select {
		case <-eng.Ready():
		case <-engCtx.Done():
			return nil
		}
		follow := func() {
			healthy := eng.Healthy()
			srv.SetHealth(healthy, eng.Status().Pools)
			members.SetHealthy(healthy)
			// The router ranks this node with its live health: rebuild
			// now, not at the next refresh (a node just ready would
			// otherwise refuse its own pools' calls for up to a second).
			router.Kick()
		}
		intent := eng.IntentChanges()
		follow()
		if hooks.Ready != nil {
			hooks.Ready()
		}
		for {
			select {
			case <-eng.HealthChanges():
				follow()
			case <-intent:
				intent = eng.IntentChanges()
				router.Kick() // cordon and drain change the node's own ranking
			case <-engCtx.Done():
				return nil
			}
		}
	})
	g.Go(func() error {
		// Shutdown, in the order documented above.
		select {
		case <-ctx.Done():
		case <-failed.Done():
		}
		members.Deregister(ctx)
		if hooks.Stopping != nil {
			hooks.Stopping()
		}
		log.Info().Dur("grace", cfg.ShutdownGrace).Msg("stopping")
		srv.Stop(cfg.ShutdownGrace)
		stopEngine()
		stopMembers()
		return nil
	})
	err = g.Wait()
	if err == nil {
		log.Info().Msg("stopped")
	}
	return err
}
