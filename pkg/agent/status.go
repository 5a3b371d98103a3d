package agent

import (
	"context"
	"errors"
	"strconv"
	"strings"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/protoadapt"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/snakepit/snakepit/pkg/router"
	"github.com/snakepit/snakepit/pkg/worker"
)

// ErrorDomain is the domain of every ErrorInfo detail the node attaches.
const ErrorDomain = "snakepit.dev"

// Reasons in ErrorInfo details: stable, machine-readable names of what went
// wrong. docs/errors.md lists them.
const (
	ReasonUnknownPool     = "UNKNOWN_POOL"
	ReasonUnknownTool     = "UNKNOWN_TOOL"
	ReasonInvalidArgument = "INVALID_ARGUMENT"
	ReasonQueueFull       = "QUEUE_FULL"
	ReasonQueueTimeout    = "QUEUE_TIMEOUT"
	ReasonDeadline        = "DEADLINE_EXCEEDED"
	ReasonPoolUnavailable = "POOL_UNAVAILABLE"
	ReasonWorkerExited    = "WORKER_EXITED"
	ReasonToolException   = "TOOL_EXCEPTION"
	ReasonResultNotJSON   = "RESULT_NOT_JSON"
	ReasonResultTooLarge  = "RESULT_TOO_LARGE"
	ReasonToolCancelled   = "TOOL_CANCELLED"
	ReasonShuttingDown    = "SHUTTING_DOWN"
	ReasonSessionLost     = "SESSION_LOST"
	ReasonSessionBusy     = "SESSION_WORKER_BUSY"
	ReasonSessionLimit    = "SESSION_LIMIT"
	ReasonStreamRequired  = "STREAM_REQUIRED"
	ReasonSessionRate     = "SESSION_RATE"
	ReasonDraining        = "DRAINING"
	ReasonCordoned        = "CORDONED"
	// Cluster routing (docs/forwarding.md).
	ReasonMayHaveExecuted  = "MAY_HAVE_EXECUTED"
	ReasonUnsatisfiable    = "UNSATISFIABLE"
	ReasonOwnerUnavailable = "OWNER_UNAVAILABLE"
	ReasonNoPeers          = "NO_PEERS"
	ReasonPeerUnavailable  = "PEER_UNAVAILABLE"
)

// toStatus is the one table that maps the node's errors to gRPC statuses,
// with details. Handlers never build statuses themselves.
func toStatus(err error) error {
	if err == nil {
		return nil
	}
	var (
		upe *UnknownPoolError
		ute *UnknownToolError
		iae *InvalidArgumentError
		qfe *QueueFullError
		qte *QueueTimeoutError
		dle *DeadlineError
		pue *PoolUnavailableError
		ee  *worker.ExitError
		te  *worker.ToolError
		sle *SessionLostError
		sbe *SessionBusyError
		sme *SessionLimitError
		sre *SessionRateError
		rme *remoteError
		mhe *MayHaveExecutedError
		oue *OwnerUnavailableError
		pne *PeerUnavailableError
		use *router.UnsatisfiableError
	)
	switch {
	case errors.As(err, &rme):
		return rme.st.Err() // the executing node's own answer, unchanged
	case errors.As(err, &mhe):
		return withDetails(codes.Aborted, err, info(ReasonMayHaveExecuted, "node", mhe.Node, "request_id", mhe.RequestID))
	case errors.As(err, &oue):
		return withDetails(codes.Unavailable, err, info(ReasonOwnerUnavailable, "pool", oue.Pool, "session_id", oue.SessionID,
			"owner", oue.Owner, "affinity", oue.Mode.String()))
	case errors.As(err, &pne):
		return withDetails(codes.Unavailable, err, info(ReasonPeerUnavailable, "node", pne.Node))
	case errors.As(err, &use):
		return withDetails(codes.FailedPrecondition, err, info(ReasonUnsatisfiable, "pool", use.Pool, "constraint", use.Constraint))
	case errors.Is(err, router.ErrUnknownPool):
		return withDetails(codes.NotFound, err, info(ReasonUnknownPool))
	case errors.Is(err, router.ErrNoPeers):
		return withDetails(codes.Unavailable, err, info(ReasonNoPeers))
	case errors.As(err, &sre):
		return withDetails(codes.ResourceExhausted, err, info(ReasonSessionRate, "client", sre.Client),
			&errdetails.RetryInfo{RetryDelay: durationpb.New(sre.RetryAfter)})
	case errors.As(err, &sle):
		return withDetails(codes.FailedPrecondition, err, info(ReasonSessionLost, "pool", sle.Pool, "session_id", sle.SessionID,
			"worker_id", ms(int64(sle.WorkerID)), "generation", ms(int64(sle.Generation)), "affinity", sle.Mode.String()))
	case errors.As(err, &sbe):
		return withDetails(codes.ResourceExhausted, err, info(ReasonSessionBusy, "pool", sbe.Pool, "session_id", sbe.SessionID,
			"worker_id", ms(int64(sbe.WorkerID)), "generation", ms(int64(sbe.Generation))),
			&errdetails.RetryInfo{RetryDelay: durationpb.New(sbe.RetryAfter)})
	case errors.As(err, &sme):
		return withDetails(codes.ResourceExhausted, err, info(ReasonSessionLimit, "pool", sme.Pool, "limit", sme.Limit, "max", strconv.Itoa(sme.Max)))
	case errors.As(err, &upe):
		return withDetails(codes.NotFound, err, info(ReasonUnknownPool, "pool", upe.Pool, "pools", strings.Join(upe.Known, ",")))
	case errors.As(err, &ute):
		return withDetails(codes.NotFound, err, info(ReasonUnknownTool, "pool", ute.Pool, "tool", ute.Tool, "tools", strings.Join(ute.Known, ",")))
	case errors.As(err, &iae):
		return withDetails(codes.InvalidArgument, err,
			info(ReasonInvalidArgument, "field", iae.Field),
			&errdetails.BadRequest{FieldViolations: []*errdetails.BadRequest_FieldViolation{{Field: iae.Field, Description: iae.Reason}}})
	case errors.As(err, &qfe):
		return withDetails(codes.ResourceExhausted, err, info(ReasonQueueFull, "pool", qfe.Pool, "queue_depth", strconv.Itoa(qfe.Depth)),
			&errdetails.RetryInfo{RetryDelay: durationpb.New(qfe.RetryAfter)})
	case errors.As(err, &qte):
		return withDetails(codes.ResourceExhausted, err, info(ReasonQueueTimeout, "pool", qte.Pool, "waited_ms", ms(qte.Waited.Milliseconds())),
			&errdetails.RetryInfo{RetryDelay: durationpb.New(qte.RetryAfter)})
	case errors.As(err, &dle):
		return withDetails(codes.DeadlineExceeded, err, info(ReasonDeadline, "pool", dle.Pool, "stage", dle.Stage,
			"queued_us", ms(dle.Queued.Microseconds()), "ran_us", ms(dle.Ran.Microseconds())))
	case errors.As(err, &pue):
		return withDetails(codes.Unavailable, err, info(ReasonPoolUnavailable, "pool", pue.Pool, "state", pue.State))
	case errors.Is(err, ErrDraining):
		return withDetails(codes.Unavailable, err, info(ReasonDraining))
	case errors.Is(err, ErrCordoned):
		return withDetails(codes.Unavailable, err, info(ReasonCordoned))
	case errors.Is(err, ErrShuttingDown):
		return withDetails(codes.Unavailable, err, info(ReasonShuttingDown))
	case errors.As(err, &ee):
		md := []string{"pool", ee.Pool, "worker_id", ms(int64(ee.ID)), "generation", ms(int64(ee.Generation)), "cause", ee.Cause,
			"exit_code", strconv.Itoa(ee.Code)}
		if ee.Signal != 0 {
			md = append(md, "signal", ee.Signal.String())
		}
		return withDetails(codes.Unavailable, err, info(ReasonWorkerExited, md...))
	case errors.As(err, &te):
		switch te.Kind {
		case worker.KindInvalidArgs:
			return withDetails(codes.InvalidArgument, err, info(ReasonInvalidArgument, "field", "args"),
				&errdetails.BadRequest{FieldViolations: []*errdetails.BadRequest_FieldViolation{{Field: "args", Description: te.Message}}})
		case worker.KindUnknownTool:
			return withDetails(codes.NotFound, err, info(ReasonUnknownTool))
		case worker.KindEncode:
			return withDetails(codes.Unknown, err, info(ReasonResultNotJSON))
		case worker.KindStreamRequired:
			return withDetails(codes.InvalidArgument, err, info(ReasonStreamRequired))
		case worker.KindTooLarge:
			return withDetails(codes.ResourceExhausted, err, info(ReasonResultTooLarge))
		case worker.KindCancelled:
			return withDetails(codes.Canceled, err, info(ReasonToolCancelled))
		}
		details := []protoadapt.MessageV1{info(ReasonToolException, "type", te.Type, "message", truncate(te.Message, 1024))}
		if te.Traceback != "" {
			details = append(details, &errdetails.DebugInfo{StackEntries: strings.Split(strings.TrimRight(te.Traceback, "\n"), "\n"), Detail: te.Type + ": " + te.Message})
		}
		return withDetails(codes.Unknown, err, details...)
	case errors.Is(err, context.Canceled):
		return status.Error(codes.Canceled, err.Error())
	case errors.Is(err, context.DeadlineExceeded):
		return status.Error(codes.DeadlineExceeded, err.Error())
	}
	return status.Error(codes.Internal, err.Error())
}

func info(reason string, kv ...string) *errdetails.ErrorInfo {
	md := make(map[string]string, len(kv)/2)
	for i := 0; i+1 < len(kv); i += 2 {
		md[kv[i]] = kv[i+1]
	}
	return &errdetails.ErrorInfo{Reason: reason, Domain: ErrorDomain, Metadata: md}
}

func withDetails(c codes.Code, err error, details ...protoadapt.MessageV1) error {
	st := status.New(c, err.Error())
	if withD, derr := st.WithDetails(details...); derr == nil {
		st = withD
	}
	return st.Err()
}

func ms(v int64) string { return strconv.FormatInt(v, 10) }

func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n] + "..."
}
