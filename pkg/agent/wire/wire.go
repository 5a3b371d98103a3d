// Package wire is the node's side of the snakepit.v1 protocol: the
// conversions between the call vocabulary (pkg/agent/call) and the proto
// messages, the metadata keys nodes exchange, the load trailer's format,
// and the reading of a node's error status. The gRPC edge uses it to serve
// calls and the cluster layer to forward them; both speak exactly the same
// wire.
package wire

import (
	"fmt"
	"math"
	"strconv"
	"strings"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc/status"

	"github.com/snakepit/snakepit/pkg/agent/call"
	"github.com/snakepit/snakepit/pkg/router"
	"github.com/snakepit/snakepit/pkg/worker"
	snakepitv1 "github.com/snakepit/snakepit/proto/snakepit/v1"
)

// Metadata keys of the peer protocol.
const (
	// ForwardedHeader marks a call an entry node forwarded; its value is
	// the entry node's id. A node runs such a call itself, whatever its
	// router would choose: a call takes one hop at most.
	ForwardedHeader = "x-snakepit-forwarded"
	// MovableHeader, on a forwarded call, says the entry node has another
	// node to try: a spillover queue policy may refuse the call as not
	// executed instead of queueing it.
	MovableHeader = "x-snakepit-movable"
	// CorrelationHeader is the correlation id: set by a client or an entry
	// node, carried to the executing node and into the worker's log lines.
	// When absent, the node uses the request id.
	CorrelationHeader = "x-snakepit-correlation-id"
	// LoadHeader is the trailer in which a node reports its load with every
	// answer: "pool=load,pool=load", load being calls in flight plus queued
	// per worker slot.
	LoadHeader = "x-snakepit-load"
)

// ErrorDomain is the domain of every ErrorInfo detail a node attaches.
const ErrorDomain = "snakepit.dev"

// RequestFromProto converts an ExecuteRequest.
func RequestFromProto(in *snakepitv1.ExecuteRequest) (*call.Request, error) {
	req := &call.Request{
		Tool:       in.GetTool(),
		Pool:       in.GetPool(),
		Args:       in.GetArgs(),
		SessionID:  in.GetSessionId(),
		RequestID:  in.GetRequestId(),
		Idempotent: in.GetIdempotent(),
		Need:       ConstraintsFromProto(in.GetConstraints()),
	}
	switch in.GetAffinity() {
	case snakepitv1.Affinity_AFFINITY_UNSPECIFIED:
		req.Affinity = call.AffinityDefault
	case snakepitv1.Affinity_AFFINITY_HINT:
		req.Affinity = call.AffinityHint
	case snakepitv1.Affinity_AFFINITY_STRICT_QUEUE:
		req.Affinity = call.AffinityStrictQueue
	case snakepitv1.Affinity_AFFINITY_STRICT_FAIL_FAST:
		req.Affinity = call.AffinityStrictFailFast
	default:
		return nil, &call.InvalidArgumentError{Field: "affinity", Reason: fmt.Sprintf("unknown value %d (use HINT, STRICT_QUEUE or STRICT_FAIL_FAST)", in.GetAffinity())}
	}
	return req, nil
}

// RequestToProto converts a request for forwarding.
func RequestToProto(req *call.Request) *snakepitv1.ExecuteRequest {
	out := &snakepitv1.ExecuteRequest{
		Tool: req.Tool, Pool: req.Pool, Args: req.Args, SessionId: req.SessionID,
		RequestId: req.RequestID, Idempotent: req.Idempotent,
	}
	switch req.Affinity {
	case call.AffinityHint:
		out.Affinity = snakepitv1.Affinity_AFFINITY_HINT
	case call.AffinityStrictQueue:
		out.Affinity = snakepitv1.Affinity_AFFINITY_STRICT_QUEUE
	case call.AffinityStrictFailFast:
		out.Affinity = snakepitv1.Affinity_AFFINITY_STRICT_FAIL_FAST
	}
	return out
}

// ResultToProto converts a result for an answer.
func ResultToProto(res *call.Result) *snakepitv1.ExecuteResponse {
	return &snakepitv1.ExecuteResponse{
		Result: res.Payload,
		RanOn: &snakepitv1.Placement{
			NodeId:           res.Node,
			Pool:             res.Pool,
			WorkerId:         uint64(res.WorkerID),
			WorkerGeneration: uint64(res.Generation),
		},
		Queued:    durationProto(res.Queued),
		Ran:       durationProto(res.Ran),
		RequestId: res.RequestID,
		Session:   sessionOutcomeProto(res.Session),
	}
}

// ResultFromProto converts a peer's answer.
func ResultFromProto(r *snakepitv1.ExecuteResponse) *call.Result {
	res := &call.Result{
		Payload:    r.GetResult(),
		Node:       r.GetRanOn().GetNodeId(),
		Pool:       r.GetRanOn().GetPool(),
		WorkerID:   worker.ID(r.GetRanOn().GetWorkerId()),
		Generation: worker.Generation(r.GetRanOn().GetWorkerGeneration()),
		Queued:     r.GetQueued().AsDuration(),
		Ran:        r.GetRan().AsDuration(),
		RequestID:  r.GetRequestId(),
	}
	switch r.GetSession() {
	case snakepitv1.SessionOutcome_SESSION_OUTCOME_NEW:
		res.Session = call.SessionNew
	case snakepitv1.SessionOutcome_SESSION_OUTCOME_BOUND:
		res.Session = call.SessionBound
	case snakepitv1.SessionOutcome_SESSION_OUTCOME_UNAVAILABLE:
		res.Session = call.SessionUnavailable
	case snakepitv1.SessionOutcome_SESSION_OUTCOME_RESET:
		res.Session = call.SessionReset
	}
	return res
}

func sessionOutcomeProto(o call.SessionOutcome) snakepitv1.SessionOutcome {
	switch o {
	case call.SessionNew:
		return snakepitv1.SessionOutcome_SESSION_OUTCOME_NEW
	case call.SessionBound:
		return snakepitv1.SessionOutcome_SESSION_OUTCOME_BOUND
	case call.SessionUnavailable:
		return snakepitv1.SessionOutcome_SESSION_OUTCOME_UNAVAILABLE
	case call.SessionReset:
		return snakepitv1.SessionOutcome_SESSION_OUTCOME_RESET
	}
	return snakepitv1.SessionOutcome_SESSION_OUTCOME_UNSPECIFIED
}

// ConstraintsFromProto converts a request's placement constraints.
func ConstraintsFromProto(c *snakepitv1.Constraints) router.Constraints {
	if c == nil {
		return router.Constraints{}
	}
	need := router.Constraints{GPU: c.GetGpu(), GPUModel: c.GetGpuModel(), Labels: c.GetLabels()}
	if b := c.GetMinGpuMemoryBytes(); b > 0 {
		need.MinGPUMemoryMiB = int(min((b+(1<<20)-1)>>20, math.MaxInt32))
	}
	if len(need.Labels) == 0 {
		need.Labels = nil
	}
	return need
}

// NodeReason returns the reason of a node's error status ("" when the
// status was not built by a snakepit node, e.g. by the transport), and the
// stage its ErrorInfo names.
func NodeReason(s *status.Status) (reason, stage string) {
	if s == nil {
		return "", ""
	}
	for _, d := range s.Details() {
		if ei, ok := d.(*errdetails.ErrorInfo); ok && ei.GetDomain() == ErrorDomain {
			return ei.GetReason(), ei.GetMetadata()["stage"]
		}
	}
	return "", ""
}

// RemoteError is a peer's own answer to a forwarded call, passed on to the
// caller unchanged. Its fate is read from its reason (call.FateOf).
type RemoteError struct {
	Node   string
	Status *status.Status
	reason string
	stage  string
}

// NewRemoteError wraps a node's error status; ok is false when s was not
// built by a snakepit node.
func NewRemoteError(node string, s *status.Status) (*RemoteError, bool) {
	reason, stage := NodeReason(s)
	if reason == "" {
		return nil, false
	}
	return &RemoteError{Node: node, Status: s, reason: reason, stage: stage}, true
}

func (e *RemoteError) Error() string { return e.Status.Message() }

// GRPCStatus lets status.FromError see the peer's status.
func (e *RemoteError) GRPCStatus() *status.Status { return e.Status }

// Reason implements call.Reasoned.
func (e *RemoteError) Reason() string { return e.reason }

// CallStage says where the peer's call was (deadline errors).
func (e *RemoteError) CallStage() string { return e.stage }

// FormatLoads encodes per-pool loads for LoadHeader.
func FormatLoads(names []string, loads []float64) string {
	var b strings.Builder
	for i, n := range names {
		if i > 0 {
			b.WriteByte(',')
		}
		b.WriteString(n)
		b.WriteByte('=')
		b.WriteString(strconv.FormatFloat(loads[i], 'g', 4, 64))
	}
	return b.String()
}

// ParseLoads decodes LoadHeader; malformed entries are skipped, and nil
// means nothing usable.
func ParseLoads(s string) map[string]float64 {
	var m map[string]float64
	for part := range strings.SplitSeq(s, ",") {
		name, v, ok := strings.Cut(part, "=")
		if !ok || name == "" {
			continue
		}
		f, err := strconv.ParseFloat(v, 64)
		if err != nil || f < 0 || f != f {
			continue
		}
		if m == nil {
			m = make(map[string]float64, 4)
		}
		m[name] = f
	}
	return m
}
