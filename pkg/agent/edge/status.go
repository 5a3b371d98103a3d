package edge

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

	"github.com/snakepit/snakepit/pkg/agent/call"
	"github.com/snakepit/snakepit/pkg/agent/wire"
	"github.com/snakepit/snakepit/pkg/router"
	"github.com/snakepit/snakepit/pkg/worker"
)

// toStatus is the one table that maps the node's errors to gRPC statuses,
// with details. Handlers never build statuses themselves.
func toStatus(err error) error {
	if err == nil {
		return nil
	}
	var (
		upe *call.UnknownPoolError
		ute *call.UnknownToolError
		iae *call.InvalidArgumentError
		qfe *call.QueueFullError
		qte *call.QueueTimeoutError
		dle *call.DeadlineError
		pue *call.PoolUnavailableError
		ee  *worker.ExitError
		te  *worker.ToolError
		sle *call.SessionLostError
		sbe *call.SessionBusyError
		sme *call.SessionLimitError
		sre *call.SessionRateError
		rme *wire.RemoteError
		mhe *call.MayHaveExecutedError
		oue *call.OwnerUnavailableError
		pne *call.PeerUnavailableError
		use *router.UnsatisfiableError
	)
	switch {
	case errors.As(err, &rme):
		return rme.Status.Err() // the executing node's own answer, unchanged
	case errors.As(err, &mhe):
		return withDetails(codes.Aborted, err, info(call.ReasonMayHaveExecuted, "node", mhe.Node, "request_id", mhe.RequestID))
	case errors.As(err, &oue):
		return withDetails(codes.Unavailable, err, info(call.ReasonOwnerUnavailable, "pool", oue.Pool, "session_id", oue.SessionID,
			"owner", oue.Owner, "affinity", oue.Mode.String()))
	case errors.As(err, &pne):
		return withDetails(codes.Unavailable, err, info(call.ReasonPeerUnavailable, "node", pne.Node))
	case errors.As(err, &use):
		return withDetails(codes.FailedPrecondition, err, info(call.ReasonUnsatisfiable, "pool", use.Pool, "constraint", use.Constraint))
	case errors.Is(err, router.ErrUnknownPool):
		return withDetails(codes.NotFound, err, info(call.ReasonUnknownPool))
	case errors.Is(err, router.ErrNoPeers):
		return withDetails(codes.Unavailable, err, info(call.ReasonNoPeers))
	case errors.As(err, &sre):
		return withDetails(codes.ResourceExhausted, err, info(call.ReasonSessionRate, "client", sre.Client),
			&errdetails.RetryInfo{RetryDelay: durationpb.New(sre.RetryAfter)})
	case errors.As(err, &sle):
		return withDetails(codes.FailedPrecondition, err, info(call.ReasonSessionLost, "pool", sle.Pool, "session_id", sle.SessionID,
			"worker_id", ms(int64(sle.WorkerID)), "generation", ms(int64(sle.Generation)), "affinity", sle.Mode.String()))
	case errors.As(err, &sbe):
		return withDetails(codes.ResourceExhausted, err, info(call.ReasonSessionBusy, "pool", sbe.Pool, "session_id", sbe.SessionID,
			"worker_id", ms(int64(sbe.WorkerID)), "generation", ms(int64(sbe.Generation))),
			&errdetails.RetryInfo{RetryDelay: durationpb.New(sbe.RetryAfter)})
	case errors.As(err, &sme):
		return withDetails(codes.ResourceExhausted, err, info(call.ReasonSessionLimit, "pool", sme.Pool, "limit", sme.Limit, "max", strconv.Itoa(sme.Max)))
	case errors.As(err, &upe):
		return withDetails(codes.NotFound, err, info(call.ReasonUnknownPool, "pool", upe.Pool, "pools", strings.Join(upe.Known, ",")))
	case errors.As(err, &ute):
		return withDetails(codes.NotFound, err, info(call.ReasonUnknownTool, "pool", ute.Pool, "tool", ute.Tool, "tools", strings.Join(ute.Known, ",")))
	case errors.As(err, &iae):
		return withDetails(codes.InvalidArgument, err,
			info(call.ReasonInvalidArgument, "field", iae.Field),
			&errdetails.BadRequest{FieldViolations: []*errdetails.BadRequest_FieldViolation{{Field: iae.Field, Description: iae.Reason}}})
	case errors.As(err, &qfe):
		return withDetails(codes.ResourceExhausted, err, info(call.ReasonQueueFull, "pool", qfe.Pool, "queue_depth", strconv.Itoa(qfe.Depth)),
			&errdetails.RetryInfo{RetryDelay: durationpb.New(qfe.RetryAfter)})
	case errors.As(err, &qte):
		return withDetails(codes.ResourceExhausted, err, info(call.ReasonQueueTimeout, "pool", qte.Pool, "waited_ms", ms(qte.Waited.Milliseconds())),
			&errdetails.RetryInfo{RetryDelay: durationpb.New(qte.RetryAfter)})
	case errors.As(err, &dle):
		return withDetails(codes.DeadlineExceeded, err, info(call.ReasonDeadline, "pool", dle.Pool, "stage", dle.Stage,
			"queued_us", ms(dle.Queued.Microseconds()), "ran_us", ms(dle.Ran.Microseconds())))
	case errors.As(err, &pue):
		return withDetails(codes.Unavailable, err, info(call.ReasonPoolUnavailable, "pool", pue.Pool, "state", pue.State))
	case errors.Is(err, call.ErrDraining):
		return withDetails(codes.Unavailable, err, info(call.ReasonDraining))
	case errors.Is(err, call.ErrCordoned):
		return withDetails(codes.Unavailable, err, info(call.ReasonCordoned))
	case errors.Is(err, call.ErrShuttingDown):
		return withDetails(codes.Unavailable, err, info(call.ReasonShuttingDown))
	case errors.As(err, &ee):
		md := []string{"pool", ee.Pool, "worker_id", ms(int64(ee.ID)), "generation", ms(int64(ee.Generation)), "cause", ee.Cause,
			"exit_code", strconv.Itoa(ee.Code)}
		if ee.Signal != 0 {
			md = append(md, "signal", ee.Signal.String())
		}
		return withDetails(codes.Unavailable, err, info(call.ReasonWorkerExited, md...))
	case errors.As(err, &te):
		switch te.Kind {
		case worker.KindInvalidArgs:
			return withDetails(codes.InvalidArgument, err, info(call.ReasonInvalidArgument, "field", "args"),
				&errdetails.BadRequest{FieldViolations: []*errdetails.BadRequest_FieldViolation{{Field: "args", Description: te.Message}}})
		case worker.KindUnknownTool:
			return withDetails(codes.NotFound, err, info(call.ReasonUnknownTool))
		case worker.KindEncode:
			return withDetails(codes.Unknown, err, info(call.ReasonResultNotJSON))
		case worker.KindStreamRequired:
			return withDetails(codes.InvalidArgument, err, info(call.ReasonStreamRequired))
		case worker.KindTooLarge:
			return withDetails(codes.ResourceExhausted, err, info(call.ReasonResultTooLarge))
		case worker.KindCancelled:
			return withDetails(codes.Canceled, err, info(call.ReasonToolCancelled))
		}
		details := []protoadapt.MessageV1{info(call.ReasonToolException, "type", te.Type, "message", truncate(te.Message, 1024))}
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
	return &errdetails.ErrorInfo{Reason: reason, Domain: wire.ErrorDomain, Metadata: md}
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
