package edge

import (
	"context"
	"net"
	"runtime/debug"
	"time"

	"github.com/rs/zerolog"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/snakepit/snakepit/pkg/agent/call"
	"github.com/snakepit/snakepit/pkg/agent/engine"
	"github.com/snakepit/snakepit/pkg/agent/wire"
	snakepitv1 "github.com/snakepit/snakepit/proto/snakepit/v1"
)

// service implements snakepit.v1.Snakepit.
type service struct {
	snakepitv1.UnimplementedSnakepitServer
	*Server
}

func (s *service) Execute(ctx context.Context, in *snakepitv1.ExecuteRequest) (*snakepitv1.ExecuteResponse, error) {
	req, err := fromIncoming(ctx, in)
	if err != nil {
		return nil, toStatus(err)
	}
	res, err := s.d.Calls.Execute(ctx, req, nil)
	if err != nil {
		return nil, toStatus(err)
	}
	return wire.ResultToProto(res), nil
}

func (s *service) ExecuteStream(in *snakepitv1.ExecuteRequest, stream grpc.ServerStreamingServer[snakepitv1.ExecuteStreamResponse]) error {
	req, err := fromIncoming(stream.Context(), in)
	if err != nil {
		return toStatus(err)
	}
	var seq uint64
	msg := &snakepitv1.ExecuteStreamResponse{}
	chunk := &snakepitv1.Chunk{}
	res, err := s.d.Calls.Execute(stream.Context(), req, func(b []byte) error {
		chunk.Data, chunk.Seq = b, seq
		msg.Msg = &snakepitv1.ExecuteStreamResponse_Chunk{Chunk: chunk}
		seq++
		return stream.Send(msg)
	})
	if err != nil {
		return toStatus(err)
	}
	return stream.Send(&snakepitv1.ExecuteStreamResponse{Msg: &snakepitv1.ExecuteStreamResponse_Done{Done: wire.ResultToProto(res)}})
}

// fromIncoming converts an incoming call: the request, and what its
// metadata and connection say (correlation id, entry node, caller).
func fromIncoming(ctx context.Context, in *snakepitv1.ExecuteRequest) (*call.Request, error) {
	req, err := wire.RequestFromProto(in)
	if err != nil {
		return nil, err
	}
	if v := metadata.ValueFromIncomingContext(ctx, wire.CorrelationHeader); len(v) > 0 && len(v[0]) <= call.MaxIDLen {
		req.CorrelationID = v[0]
	}
	if v := metadata.ValueFromIncomingContext(ctx, wire.ForwardedHeader); len(v) > 0 {
		req.ForwardedBy = v[0]
		req.Movable = len(metadata.ValueFromIncomingContext(ctx, wire.MovableHeader)) > 0
	}
	req.Client = clientAddr(ctx)
	return req, nil
}

// clientAddr is the caller's address without its port.
func clientAddr(ctx context.Context) string {
	p, ok := peer.FromContext(ctx)
	if !ok || p.Addr == nil {
		return ""
	}
	if t, ok := p.Addr.(*net.TCPAddr); ok {
		return t.IP.String()
	}
	a := p.Addr.String()
	if host, _, err := net.SplitHostPort(a); err == nil {
		return host
	}
	return a
}

func (s *service) CloseSession(_ context.Context, in *snakepitv1.CloseSessionRequest) (*snakepitv1.CloseSessionResponse, error) {
	closed, err := s.d.Engine.CloseSession(in.GetPool(), in.GetSessionId())
	if err != nil {
		return nil, toStatus(err)
	}
	return &snakepitv1.CloseSessionResponse{Closed: closed}, nil
}

func (s *service) ListSessions(_ context.Context, in *snakepitv1.ListSessionsRequest) (*snakepitv1.ListSessionsResponse, error) {
	list, err := s.d.Engine.Sessions(in.GetPool())
	if err != nil {
		return nil, toStatus(err)
	}
	now := time.Now()
	out := &snakepitv1.ListSessionsResponse{}
	for _, ss := range list {
		out.Sessions = append(out.Sessions, &snakepitv1.Session{
			SessionId: ss.ID, Pool: ss.Pool, WorkerId: uint64(ss.WorkerID), WorkerGeneration: uint64(ss.Generation),
			Age: durationpb.New(now.Sub(ss.Created)), Idle: durationpb.New(now.Sub(ss.LastUsed)),
			Calls: ss.Calls, InFlight: uint32(ss.InFlight),
		})
	}
	return out, nil
}

func (s *service) ListTools(_ context.Context, in *snakepitv1.ListToolsRequest) (*snakepitv1.ListToolsResponse, error) {
	byPool, err := s.d.Engine.Tools(in.GetPool())
	if err != nil {
		return nil, toStatus(err)
	}
	out := &snakepitv1.ListToolsResponse{}
	for _, pool := range s.d.Engine.Pools() {
		for _, t := range byPool[pool] {
			pt := &snakepitv1.Tool{Pool: pool, Name: t.Name, Doc: t.Doc, Streaming: t.Streaming}
			for _, p := range t.Parameters {
				pt.Parameters = append(pt.Parameters, &snakepitv1.Parameter{Name: p.Name, Type: p.Type, Required: p.Required, DefaultJson: p.DefaultJSON})
			}
			out.Tools = append(out.Tools, pt)
		}
	}
	return out, nil
}

func (s *service) Status(context.Context, *snakepitv1.StatusRequest) (*snakepitv1.StatusResponse, error) {
	st := s.d.Engine.Status()
	out := &snakepitv1.StatusResponse{NodeId: st.NodeID, Version: s.cfg.Version, Started: timestamppb.New(st.Started)}
	for _, p := range st.Pools {
		ps := &snakepitv1.PoolStatus{
			Name: p.Name, State: poolStateProto(p.State), Reason: p.Reason, Adapter: p.Adapter,
			Size: uint32(p.Size), CapacityPerWorker: uint32(p.Capacity), ReadyWorkers: uint32(p.Ready),
			Busy: uint32(p.Busy), Queued: uint32(p.Queued), QueueDepth: uint32(p.QueueDepth),
			Served: p.Served, Errors: p.Errors, Rejected: p.Rejected,
			Latency: &snakepitv1.Latency{P50: durationpb.New(p.P50), P90: durationpb.New(p.P90), P99: durationpb.New(p.P99), Max: durationpb.New(p.Max)},
		}
		for _, w := range p.Workers {
			ws := &snakepitv1.WorkerStatus{Id: uint64(w.ID), Generation: uint64(w.Generation), Pid: int32(w.PID), State: w.State,
				InFlight: uint32(w.InFlight), Capacity: uint32(w.Capacity), Served: w.Served,
				GpuUuids: w.GPUs, Sessions: uint32(w.Sessions)}
			if !w.Started.IsZero() {
				ws.Started = timestamppb.New(w.Started)
			}
			ps.Workers = append(ps.Workers, ws)
		}
		out.Pools = append(out.Pools, ps)
	}
	return out, nil
}

func poolStateProto(s engine.PoolState) snakepitv1.PoolState {
	switch s {
	case engine.PoolStarting:
		return snakepitv1.PoolState_POOL_STATE_STARTING
	case engine.PoolReady:
		return snakepitv1.PoolState_POOL_STATE_READY
	case engine.PoolDegraded:
		return snakepitv1.PoolState_POOL_STATE_DEGRADED
	case engine.PoolFailed:
		return snakepitv1.PoolState_POOL_STATE_FAILED
	case engine.PoolStopping:
		return snakepitv1.PoolState_POOL_STATE_STOPPING
	}
	return snakepitv1.PoolState_POOL_STATE_UNSPECIFIED
}

// recoverUnary turns a panic in a handler into INTERNAL instead of a crash
// of the daemon, and logs it with its stack.
func recoverUnary(log zerolog.Logger) grpc.UnaryServerInterceptor {
	return func(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (resp any, err error) {
		defer func() {
			if r := recover(); r != nil {
				log.Error().Str("method", info.FullMethod).Interface("panic", r).Str("stack", string(debug.Stack())).Msg("handler panicked")
				err = status.Errorf(codes.Internal, "internal error in %s (logged on the node)", info.FullMethod)
			}
		}()
		return handler(ctx, req)
	}
}

func recoverStream(log zerolog.Logger) grpc.StreamServerInterceptor {
	return func(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, handler grpc.StreamHandler) (err error) {
		defer func() {
			if r := recover(); r != nil {
				log.Error().Str("method", info.FullMethod).Interface("panic", r).Str("stack", string(debug.Stack())).Msg("handler panicked")
				err = status.Errorf(codes.Internal, "internal error in %s (logged on the node)", info.FullMethod)
			}
		}()
		return handler(srv, ss)
	}
}
