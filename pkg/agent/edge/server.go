// Package edge is the node's gRPC edge: the snakepit.v1 Snakepit and Admin
// services, grpc.health.v1 and reflection, the one table that maps the
// node's errors to gRPC statuses (toStatus), admin authorization (the
// local socket, bearer token, client certificates), TLS, per-connection
// limits, the load trailer on every answer, and the Prometheus metrics
// endpoint. It translates and authorizes; what a call does is the cluster
// layer's and the engine's, reached through the interfaces declared here.
package edge

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"net"
	"os"
	"runtime"
	"slices"
	"sync/atomic"
	"time"

	"github.com/rs/zerolog"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/reflection"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/snakepit/snakepit/pkg/agent/call"
	"github.com/snakepit/snakepit/pkg/agent/engine"
	"github.com/snakepit/snakepit/pkg/agent/membership"
	"github.com/snakepit/snakepit/pkg/agent/wire"
	"github.com/snakepit/snakepit/pkg/client"
	"github.com/snakepit/snakepit/pkg/worker"
	snakepitv1 "github.com/snakepit/snakepit/proto/snakepit/v1"
)

// Config configures the edge. The node fills every field.
type Config struct {
	NodeID  string
	Version string
	// Listen is the gRPC address; MetricsListen the /metrics one ("off":
	// none).
	Listen        string
	MetricsListen string
	// AdminSocket is the resolved admin socket path ("": none), owned by
	// AdminSocketGroup when set.
	AdminSocket      string
	AdminSocketGroup string
	// AdminTokenFile and AdminIdentities grant the Admin API over TCP.
	AdminTokenFile  string
	AdminIdentities []string
	TLS             TLSConfig
	// MaxMessageBytes and MaxStreamsPerConnection bound each connection.
	MaxMessageBytes         int
	MaxStreamsPerConnection int
	// ClusterStatusTimeout bounds the wait for each peer's status.
	ClusterStatusTimeout time.Duration
	// Advertise is the address this node is published at (Status rows).
	Advertise string
}

// Caller runs calls: the cluster layer's entry point.
type Caller interface {
	Execute(ctx context.Context, req *call.Request, emit func([]byte) error) (*call.Result, error)
}

// Engine is the node's pool engine, as the services read and drive it.
type Engine interface {
	Status() engine.Status
	Tools(pool string) (map[string][]worker.Tool, error)
	Pools() []string
	DefaultPool() string
	Pool(name string) (engine.PoolConfig, bool)
	Loads() ([]string, []float64)
	Sessions(pool string) ([]engine.SessionStatus, error)
	CloseSession(pool, id string) (bool, error)
	Intent() engine.Intent
	Cordon() (engine.Intent, error)
	Uncordon() (engine.Intent, error)
	Resize(pool string, size int, deadline time.Duration) (int, error)
	Drain(ctx context.Context, deadline time.Duration, report func(engine.DrainProgress) error) error
	DrainState() engine.DrainProgress
}

// Cluster is what the admin verbs ask the cluster layer.
type Cluster interface {
	NextOwner(pool, sessionID string) string
	PeerAddrs() map[string]string
}

// Members lists the cluster as discovery sees it.
type Members interface {
	List(now time.Time) membership.Listing
}

// Deps are what the edge is given.
type Deps struct {
	Log     zerolog.Logger
	Calls   Caller
	Engine  Engine
	Cluster Cluster
	Members Members
	Metrics *Metrics
	// PeerCreds dial peers for ClusterStatus (nil: plaintext).
	PeerCreds credentials.TransportCredentials
}

// Server is the node's gRPC edge. New, then Listen, then Run; Stop ends
// it.
type Server struct {
	cfg Config
	d   Deps
	log zerolog.Logger
	hs  *health.Server

	lis, alis   net.Listener
	maddr       net.Addr
	stopMetrics func()
	srv, admin  *grpc.Server
	addr        atomic.Pointer[string]
}

// PoolHealthService is the grpc.health.v1 service name that reports one
// pool: SERVING while it has a ready worker and none of its workers is
// tainted for crashing past the restart budget. The empty service name
// reports the node: SERVING while every pool has a ready worker.
func PoolHealthService(pool string) string { return "snakepit.pool." + pool }

// New builds the edge; it does no I/O.
func New(cfg Config, deps Deps) *Server {
	s := &Server{cfg: cfg, d: deps, log: deps.Log.With().Str("component", "agent").Logger(), hs: health.NewServer()}
	s.hs.SetServingStatus("", healthpb.HealthCheckResponse_NOT_SERVING)
	s.hs.SetServingStatus(snakepitv1.Snakepit_ServiceDesc.ServiceName, healthpb.HealthCheckResponse_NOT_SERVING)
	return s
}

// Listen binds the gRPC port, the metrics endpoint and the admin socket,
// and reads the admin token and TLS files. Errors name their config key.
// On error nothing stays bound.
func (s *Server) Listen() (err error) {
	defer func() {
		if err != nil {
			s.close()
		}
	}()
	s.lis, err = net.Listen("tcp", s.cfg.Listen)
	if err != nil {
		return fmt.Errorf("listen on %s (listen): %w", s.cfg.Listen, err)
	}
	s.addr.Store(new(s.lis.Addr().String()))
	if s.cfg.MetricsListen != "off" {
		if s.maddr, s.stopMetrics, err = s.d.Metrics.serve(s.cfg.MetricsListen); err != nil {
			return fmt.Errorf("metrics_listen %s: %w", s.cfg.MetricsListen, err)
		}
		s.log.Info().Str("metrics_listen", s.maddr.String()).Msg("serving metrics")
	}
	auth, err := adminAuth(s.cfg.AdminTokenFile, s.cfg.AdminIdentities)
	if err != nil {
		return err
	}
	var tcpCreds []grpc.ServerOption
	if s.cfg.TLS.Enabled() {
		tc, err := s.cfg.TLS.serverTLS()
		if err != nil {
			return err
		}
		tcpCreds = append(tcpCreds, grpc.Creds(credentials.NewTLS(tc)))
	}
	// The TCP port serves everyone; its Admin verbs need the bearer token.
	s.srv = s.newServer(tcpCreds, auth)
	if s.cfg.AdminSocket != "" {
		// The local admin socket serves the same services to whoever may
		// open it (mode 0660).
		if s.alis, err = listenAdminSocket(s.cfg.AdminSocket, s.cfg.AdminSocketGroup); err != nil {
			return err
		}
		s.admin = s.newServer(nil)
		s.log.Info().Str("admin_socket", s.cfg.AdminSocket).Msg("serving admin socket")
	}
	return nil
}

func (s *Server) newServer(extra []grpc.ServerOption, interceptors ...grpc.UnaryServerInterceptor) *grpc.Server {
	srv := grpc.NewServer(append(extra,
		// Fixed windows: no bandwidth-delay PINGs (pkg/client).
		grpc.InitialWindowSize(client.StreamWindow),
		grpc.InitialConnWindowSize(client.ConnWindow),
		// Handlers run on long-lived goroutines whose stacks have already
		// grown, instead of a fresh goroutine per call (grpc-go marks the
		// option experimental; it falls back to a new goroutine when all
		// are busy): about 12 us off a call's p50 here.
		grpc.NumStreamWorkers(uint32(runtime.GOMAXPROCS(0))),
		grpc.MaxRecvMsgSize(s.cfg.MaxMessageBytes),
		grpc.MaxSendMsgSize(s.cfg.MaxMessageBytes),
		grpc.MaxConcurrentStreams(uint32(s.cfg.MaxStreamsPerConnection)),
		grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{MinTime: 5 * time.Second, PermitWithoutStream: true}),
		grpc.ChainUnaryInterceptor(append([]grpc.UnaryServerInterceptor{recoverUnary(s.log), s.loadUnary()}, interceptors...)...),
		grpc.ChainStreamInterceptor(recoverStream(s.log), s.loadStream()),
	)...)
	snakepitv1.RegisterSnakepitServer(srv, &service{Server: s})
	snakepitv1.RegisterAdminServer(srv, &adminService{Server: s})
	healthpb.RegisterHealthServer(srv, s.hs)
	reflection.Register(srv)
	return srv
}

// Addr is the bound gRPC address; MetricsAddr the bound /metrics one (nil
// when off). Valid after Listen.
func (s *Server) Addr() net.Addr        { return s.lis.Addr() }
func (s *Server) MetricsAddr() net.Addr { return s.maddr }

func (s *Server) advertised() string {
	if s.cfg.Advertise != "" {
		return s.cfg.Advertise
	}
	return *s.addr.Load()
}

// Run serves until Stop; it returns nil then, or the error that ended
// serving. ctx is not watched: the daemon stops the edge in its shutdown
// order.
func (s *Server) Run(context.Context) error {
	if s.admin != nil {
		go func() { _ = s.admin.Serve(s.alis) }()
	}
	err := s.srv.Serve(s.lis)
	if errors.Is(err, grpc.ErrServerStopped) {
		return nil
	}
	return err
}

// SetHealth publishes the node's health: the node's and the Snakepit
// service's status, and each pool's (PoolHealthService).
func (s *Server) SetHealth(healthy bool, pools []engine.PoolStatus) {
	st := healthpb.HealthCheckResponse_NOT_SERVING
	if healthy {
		st = healthpb.HealthCheckResponse_SERVING
	}
	s.hs.SetServingStatus("", st)
	s.hs.SetServingStatus(snakepitv1.Snakepit_ServiceDesc.ServiceName, st)
	for _, p := range pools {
		ps := healthpb.HealthCheckResponse_NOT_SERVING
		if p.Ready > 0 && !p.Tainted && (p.State == engine.PoolReady || p.State == engine.PoolDegraded) {
			ps = healthpb.HealthCheckResponse_SERVING
		}
		s.hs.SetServingStatus(PoolHealthService(p.Name), ps)
	}
}

// Stop ends serving in order: health turns NOT_SERVING (peers and load
// balancers stop sending calls), the server stops accepting calls and lets
// those in flight finish for at most grace, then cancels the rest; then the
// admin socket and the metrics endpoint close. Run returns after Stop.
func (s *Server) Stop(grace time.Duration) {
	s.hs.Shutdown()
	stopped := make(chan struct{})
	go func() { s.srv.GracefulStop(); close(stopped) }()
	t := time.NewTimer(grace)
	select {
	case <-stopped:
	case <-t.C:
		s.log.Warn().Dur("grace", grace).Msg("calls still running after shutdown_grace; cancelling them")
		s.srv.Stop()
		<-stopped
	}
	t.Stop()
	s.close()
}

// close releases what Listen bound (idempotent).
func (s *Server) close() {
	if s.srv != nil {
		s.srv.Stop()
	} else if s.lis != nil {
		s.lis.Close()
	}
	if s.admin != nil {
		s.admin.Stop()
	} else if s.alis != nil {
		s.alis.Close()
	}
	if s.alis != nil {
		_ = os.Remove(s.cfg.AdminSocket)
	}
	if s.stopMetrics != nil {
		s.stopMetrics()
		s.stopMetrics = nil
	}
}

// loadUnary sets LoadHeader on every answer of the Snakepit and health
// services, so peers' routers learn this node's load without asking.
func (s *Server) loadUnary() grpc.UnaryServerInterceptor {
	return func(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
		resp, err := handler(ctx, req)
		names, loads := s.d.Engine.Loads()
		_ = grpc.SetTrailer(ctx, metadata.Pairs(wire.LoadHeader, wire.FormatLoads(names, loads)))
		return resp, err
	}
}

func (s *Server) loadStream() grpc.StreamServerInterceptor {
	return func(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
		err := handler(srv, ss)
		names, loads := s.d.Engine.Loads()
		ss.SetTrailer(metadata.Pairs(wire.LoadHeader, wire.FormatLoads(names, loads)))
		return err
	}
}

// ListNodes reports the cluster as this node sees it.
func (s *service) ListNodes(context.Context, *snakepitv1.ListNodesRequest) (*snakepitv1.ListNodesResponse, error) {
	l := s.d.Members.List(time.Now())
	resp := &snakepitv1.ListNodesResponse{Stale: l.Stale, Discovery: l.Discovery}
	if l.SnapshotAge > 0 {
		resp.SnapshotAge = durationpb.New(l.SnapshotAge)
	}
	for _, n := range l.Nodes {
		out := &snakepitv1.Node{
			NodeId:         string(n.ID),
			Address:        n.Addr,
			Healthy:        n.Healthy,
			Cordoned:       n.Cordoned,
			Draining:       n.Draining,
			Version:        n.Version,
			GpuCount:       uint32(max(n.GPUs.Count, 0)),
			GpuModels:      slices.Clone(n.GPUs.Models),
			GpuMemoryBytes: n.GPUs.MemoryBytes,
			Labels:         maps.Clone(n.Labels),
			Self:           n.Self,
		}
		if len(n.Pools) > 0 {
			out.Pools = make(map[string]uint32, len(n.Pools))
			for name, p := range n.Pools {
				out.Pools[name] = uint32(max(p.Slots, 0))
			}
		}
		resp.Nodes = append(resp.Nodes, out)
	}
	return resp, nil
}
