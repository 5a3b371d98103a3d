package agent

import (
	"context"
	"fmt"
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

	snakepitv1 "github.com/snakepit/snakepit/proto/snakepit/v1"
)

// service implements snakepit.v1.Snakepit on a Node.
type service struct {
	snakepitv1.UnimplementedSnakepitServer
	node *Node
}

func (s *service) Execute(ctx context.Context, in *snakepitv1.ExecuteRequest) (*snakepitv1.ExecuteResponse, error) {
	req, err := requestFromProto(in)
	if err != nil {
		return nil, toStatus(err)
	}
	req.CorrelationID = correlationID(ctx)
	req.Client = clientAddr(ctx)
	res, err := s.node.Execute(ctx, req)
	if err != nil {
		return nil, toStatus(err)
	}
	return responseToProto(res), nil
}

func (s *service) ExecuteStream(in *snakepitv1.ExecuteRequest, stream grpc.ServerStreamingServer[snakepitv1.ExecuteStreamResponse]) error {
	req, err := requestFromProto(in)
	if err != nil {
		return toStatus(err)
	}
	req.CorrelationID = correlationID(stream.Context())
	req.Client = clientAddr(stream.Context())
	var seq uint64
	msg := &snakepitv1.ExecuteStreamResponse{}
	chunk := &snakepitv1.Chunk{}
	res, err := s.node.ExecuteStream(stream.Context(), req, func(b []byte) error {
		chunk.Data, chunk.Seq = b, seq
		msg.Msg = &snakepitv1.ExecuteStreamResponse_Chunk{Chunk: chunk}
		seq++
		return stream.Send(msg)
	})
	if err != nil {
		return toStatus(err)
	}
	return stream.Send(&snakepitv1.ExecuteStreamResponse{Msg: &snakepitv1.ExecuteStreamResponse_Done{Done: responseToProto(res)}})
}

// CorrelationHeader is the gRPC metadata key of the correlation id: set by
// a client or an entry node, carried to the executing node and into the
// worker's log lines. When absent, the node uses the request id.
const CorrelationHeader = "x-snakepit-correlation-id"

func correlationID(ctx context.Context) string {
	if v := metadata.ValueFromIncomingContext(ctx, CorrelationHeader); len(v) > 0 && len(v[0]) <= maxIDLen {
		return v[0]
	}
	return ""
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

func requestFromProto(in *snakepitv1.ExecuteRequest) (*Request, error) {
	req := &Request{
		Tool:       in.GetTool(),
		Pool:       in.GetPool(),
		Args:       in.GetArgs(),
		SessionID:  in.GetSessionId(),
		RequestID:  in.GetRequestId(),
		Idempotent: in.GetIdempotent(),
		Need:       constraintsFromProto(in.GetConstraints()),
	}
	switch in.GetAffinity() {
	case snakepitv1.Affinity_AFFINITY_UNSPECIFIED, snakepitv1.Affinity_AFFINITY_HINT:
		req.Affinity = AffinityHint
	case snakepitv1.Affinity_AFFINITY_STRICT_QUEUE:
		req.Affinity = AffinityStrictQueue
	case snakepitv1.Affinity_AFFINITY_STRICT_FAIL_FAST:
		req.Affinity = AffinityStrictFailFast
	default:
		return nil, &InvalidArgumentError{Field: "affinity", Reason: fmt.Sprintf("unknown value %d (use HINT, STRICT_QUEUE or STRICT_FAIL_FAST)", in.GetAffinity())}
	}
	return req, nil
}

func responseToProto(res *Result) *snakepitv1.ExecuteResponse {
	return &snakepitv1.ExecuteResponse{
		Result: res.Payload,
		RanOn: &snakepitv1.Placement{
			NodeId:           res.Node,
			Pool:             res.Pool,
			WorkerId:         uint64(res.WorkerID),
			WorkerGeneration: uint64(res.Generation),
		},
		Queued:    durationpb.New(res.Queued),
		Ran:       durationpb.New(res.Ran),
		RequestId: res.RequestID,
		Session:   sessionOutcomeProto(res.Session),
	}
}

func sessionOutcomeProto(o SessionOutcome) snakepitv1.SessionOutcome {
	switch o {
	case SessionNew:
		return snakepitv1.SessionOutcome_SESSION_OUTCOME_NEW
	case SessionBound:
		return snakepitv1.SessionOutcome_SESSION_OUTCOME_BOUND
	case SessionUnavailable:
		return snakepitv1.SessionOutcome_SESSION_OUTCOME_UNAVAILABLE
	case SessionReset:
		return snakepitv1.SessionOutcome_SESSION_OUTCOME_RESET
	}
	return snakepitv1.SessionOutcome_SESSION_OUTCOME_UNSPECIFIED
}

func (s *service) CloseSession(_ context.Context, in *snakepitv1.CloseSessionRequest) (*snakepitv1.CloseSessionResponse, error) {
	closed, err := s.node.CloseSession(in.GetPool(), in.GetSessionId())
	if err != nil {
		return nil, toStatus(err)
	}
	return &snakepitv1.CloseSessionResponse{Closed: closed}, nil
}

func (s *service) ListSessions(_ context.Context, in *snakepitv1.ListSessionsRequest) (*snakepitv1.ListSessionsResponse, error) {
	list, err := s.node.Sessions(in.GetPool())
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
	byPool, err := s.node.Tools(in.GetPool())
	if err != nil {
		return nil, toStatus(err)
	}
	out := &snakepitv1.ListToolsResponse{}
	for _, pool := range s.node.PoolNames() {
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
	st := s.node.Status()
	out := &snakepitv1.StatusResponse{NodeId: st.NodeID, Version: st.Version, Started: timestamppb.New(st.Started)}
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

func poolStateProto(s PoolState) snakepitv1.PoolState {
	switch s {
	case PoolStarting:
		return snakepitv1.PoolState_POOL_STATE_STARTING
	case PoolReady:
		return snakepitv1.PoolState_POOL_STATE_READY
	case PoolDegraded:
		return snakepitv1.PoolState_POOL_STATE_DEGRADED
	case PoolFailed:
		return snakepitv1.PoolState_POOL_STATE_FAILED
	case PoolStopping:
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
