package call

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/snakepit/snakepit/pkg/worker"
)

// Reasons: the stable, machine-readable names of what went wrong, carried
// in the ErrorInfo detail of every error status the node returns.
// docs/errors.md lists them.
const (
	ReasonUnknownPool      = "UNKNOWN_POOL"
	ReasonUnknownTool      = "UNKNOWN_TOOL"
	ReasonInvalidArgument  = "INVALID_ARGUMENT"
	ReasonQueueFull        = "QUEUE_FULL"
	ReasonQueueTimeout     = "QUEUE_TIMEOUT"
	ReasonDeadline         = "DEADLINE_EXCEEDED"
	ReasonPoolUnavailable  = "POOL_UNAVAILABLE"
	ReasonWorkerExited     = "WORKER_EXITED"
	ReasonToolException    = "TOOL_EXCEPTION"
	ReasonResultNotJSON    = "RESULT_NOT_JSON"
	ReasonResultTooLarge   = "RESULT_TOO_LARGE"
	ReasonToolCancelled    = "TOOL_CANCELLED"
	ReasonShuttingDown     = "SHUTTING_DOWN"
	ReasonSessionLost      = "SESSION_LOST"
	ReasonSessionBusy      = "SESSION_WORKER_BUSY"
	ReasonSessionLimit     = "SESSION_LIMIT"
	ReasonStreamRequired   = "STREAM_REQUIRED"
	ReasonSessionRate      = "SESSION_RATE"
	ReasonDraining         = "DRAINING"
	ReasonCordoned         = "CORDONED"
	ReasonMayHaveExecuted  = "MAY_HAVE_EXECUTED"
	ReasonUnsatisfiable    = "UNSATISFIABLE"
	ReasonOwnerUnavailable = "OWNER_UNAVAILABLE"
	ReasonNoPeers          = "NO_PEERS"
	ReasonPeerUnavailable  = "PEER_UNAVAILABLE"
)

// Stages of a call, as DeadlineError reports where the time went.
const (
	StageQueued  = "queued"
	StageRunning = "running"
)

// Fate is what an error says about whether its call ran.
type Fate int

// Fates, from the caller's point of view.
const (
	// Ran: the call ran, or may have (a tool's exception, a worker that
	// died mid-call, a lost connection): never run it again on its own.
	Ran Fate = iota
	// Refused: provably not executed, and any node would answer the same
	// (a bad request, an expired deadline): do not try elsewhere.
	Refused
	// Movable: provably not executed, for a reason of this node's (queue
	// full, draining, no such pool here): another node may run it.
	Movable
)

// fates is the one table of what each reason says about its call; reasons
// not listed mean Ran.
var fates = map[string]Fate{
	ReasonQueueFull:       Movable,
	ReasonQueueTimeout:    Movable,
	ReasonSessionBusy:     Movable,
	ReasonSessionLimit:    Movable,
	ReasonDraining:        Movable,
	ReasonCordoned:        Movable,
	ReasonShuttingDown:    Movable,
	ReasonPoolUnavailable: Movable,
	ReasonUnknownPool:     Movable,
	ReasonPeerUnavailable: Movable,

	ReasonUnknownTool:      Refused,
	ReasonInvalidArgument:  Refused,
	ReasonStreamRequired:   Refused,
	ReasonSessionRate:      Refused,
	ReasonSessionLost:      Refused,
	ReasonOwnerUnavailable: Refused,
	ReasonUnsatisfiable:    Refused,
	ReasonNoPeers:          Refused,
}

// FateOfReason is Fate for an answer known only by its reason and stage
// (a peer's error status): the same table.
func FateOfReason(reason, stage string) Fate {
	if reason == ReasonDeadline {
		if stage == StageQueued {
			return Refused // no worker ran it, and its time is gone
		}
		return Ran
	}
	return fates[reason]
}

// Reasoned is implemented by every error of the vocabulary, and by a
// peer's answer relayed as an error.
type Reasoned interface {
	error
	// Reason is the ErrorInfo reason of the error.
	Reason() string
}

// staged is implemented by errors whose fate depends on where the call was.
type staged interface{ CallStage() string }

// FateOf says whether the call that failed with err ran. Errors outside
// the vocabulary (a context's, a worker's) mean Ran: the call may have.
func FateOf(err error) Fate {
	if err == nil {
		return Ran
	}
	var r Reasoned
	if !errors.As(err, &r) {
		return Ran
	}
	stage := ""
	var s staged
	if errors.As(err, &s) {
		stage = s.CallStage()
	}
	return FateOfReason(r.Reason(), stage)
}

// NotExecuted reports whether err proves its call did not run.
func NotExecuted(err error) bool { return FateOf(err) != Ran }

// ReasonOf returns err's reason, "" for errors outside the vocabulary.
func ReasonOf(err error) string {
	var r Reasoned
	if errors.As(err, &r) {
		return r.Reason()
	}
	return ""
}

// nodeState is the error of a node that refuses calls as a whole.
type nodeState struct{ reason, msg string }

func (e *nodeState) Error() string  { return e.msg }
func (e *nodeState) Reason() string { return e.reason }

// Errors of a node that refuses a call as a whole (compare with errors.Is).
var (
	// ErrShuttingDown: the call arrived while the node is stopping.
	ErrShuttingDown error = &nodeState{ReasonShuttingDown, "node is shutting down"}
	// ErrDraining: the node is draining; not executed, so a router may
	// send it to another node at once.
	ErrDraining error = &nodeState{ReasonDraining, "node is draining: call not executed here (another node can take it)"}
	// ErrCordoned: a routed call refused because the node is cordoned and
	// does not hold the call's session; not executed, and the router that
	// sent it places it on the next node. A cordoned node keeps serving
	// the sessions it holds (docs/operations.md).
	ErrCordoned error = &nodeState{ReasonCordoned, "node is cordoned and takes no new sessions or sessionless work: call not executed here (another node can take it)"}
)

// UnknownPoolError reports a request for a pool the node does not have.
type UnknownPoolError struct {
	Pool  string
	Known []string
}

func (e *UnknownPoolError) Error() string {
	return fmt.Sprintf("no pool %q on this node (pools: %s)", e.Pool, strings.Join(e.Known, ", "))
}

// Reason implements Reasoned.
func (e *UnknownPoolError) Reason() string { return ReasonUnknownPool }

// UnknownToolError reports a request for a tool its pool does not serve.
type UnknownToolError struct {
	Pool  string
	Tool  string
	Known []string
}

func (e *UnknownToolError) Error() string {
	return fmt.Sprintf("pool %q has no tool %q (tools: %s)", e.Pool, e.Tool, strings.Join(e.Known, ", "))
}

// Reason implements Reasoned.
func (e *UnknownToolError) Reason() string { return ReasonUnknownTool }

// InvalidArgumentError reports a bad request field.
type InvalidArgumentError struct {
	Field  string
	Reason string
}

func (e *InvalidArgumentError) Error() string {
	return fmt.Sprintf("invalid %s: %s", e.Field, e.Reason)
}

// invalidArgument is InvalidArgumentError's Reasoned view: its Reason
// field keeps the name it has always had.
type invalidArgument struct{ *InvalidArgumentError }

func (e invalidArgument) Reason() string { return ReasonInvalidArgument }

// As lets errors.As find a Reasoned in an InvalidArgumentError.
func (e *InvalidArgumentError) As(target any) bool {
	if r, ok := target.(*Reasoned); ok {
		*r = invalidArgument{e}
		return true
	}
	return false
}

// QueueFullError reports a call refused because its pool's queue is full,
// or (Spilled) because a spillover queue policy moved it on. The call was
// not executed.
type QueueFullError struct {
	Pool       string
	Depth      int
	RetryAfter time.Duration
	// Spilled: the queue was at the spillover threshold (Depth), and the
	// router had another node to try.
	Spilled bool
}

func (e *QueueFullError) Error() string {
	if e.Spilled {
		return fmt.Sprintf("pool %q spilled the call: all workers busy and %d calls queued (spillover threshold); not executed here", e.Pool, e.Depth)
	}
	if e.Depth == 0 {
		return fmt.Sprintf("pool %q is saturated: all workers busy and its queue policy rejects rather than queues; not executed, retry after %s", e.Pool, e.RetryAfter)
	}
	return fmt.Sprintf("pool %q is saturated: all workers busy and %d calls queued (queue_depth); not executed, retry after %s", e.Pool, e.Depth, e.RetryAfter)
}

// Reason implements Reasoned.
func (e *QueueFullError) Reason() string { return ReasonQueueFull }

// QueueTimeoutError reports a call that waited queue_max_wait for a worker
// without getting one. The call was not executed.
type QueueTimeoutError struct {
	Pool       string
	Waited     time.Duration
	RetryAfter time.Duration
}

func (e *QueueTimeoutError) Error() string {
	return fmt.Sprintf("pool %q: no worker free within queue_max_wait (%s); not executed, retry after %s", e.Pool, e.Waited.Round(time.Millisecond), e.RetryAfter)
}

// Reason implements Reasoned.
func (e *QueueTimeoutError) Reason() string { return ReasonQueueTimeout }

// DeadlineError reports a call whose deadline passed, and where its time
// went.
type DeadlineError struct {
	Pool   string
	Stage  string
	Queued time.Duration
	Ran    time.Duration
}

func (e *DeadlineError) Error() string {
	if e.Stage == StageQueued {
		return fmt.Sprintf("deadline exceeded after %s queued in pool %q, before any worker ran the call", e.Queued.Round(time.Microsecond), e.Pool)
	}
	return fmt.Sprintf("deadline exceeded after %s queued and %s running in pool %q (the call was cancelled in Python)", e.Queued.Round(time.Microsecond), e.Ran.Round(time.Microsecond), e.Pool)
}

// Is makes errors.Is(err, context.DeadlineExceeded) hold.
func (e *DeadlineError) Is(target error) bool { return target == context.DeadlineExceeded }

// Reason implements Reasoned.
func (e *DeadlineError) Reason() string { return ReasonDeadline }

// CallStage says where the call was when its deadline passed.
func (e *DeadlineError) CallStage() string { return e.Stage }

// PoolUnavailableError reports a pool that has no worker able to serve.
type PoolUnavailableError struct {
	Pool   string
	State  string
	Reason string
}

func (e *PoolUnavailableError) Error() string {
	if e.Reason == "" {
		return fmt.Sprintf("pool %q is %s: no worker can take the call", e.Pool, e.State)
	}
	return fmt.Sprintf("pool %q is %s: %s", e.Pool, e.State, e.Reason)
}

type poolUnavailable struct{ *PoolUnavailableError }

func (e poolUnavailable) Reason() string { return ReasonPoolUnavailable }

// As lets errors.As find a Reasoned in a PoolUnavailableError.
func (e *PoolUnavailableError) As(target any) bool {
	if r, ok := target.(*Reasoned); ok {
		*r = poolUnavailable{e}
		return true
	}
	return false
}

// SessionLostError reports a strict-affinity call whose session's worker is
// gone: the state it held is lost. The session is dropped; the next call
// starts a new one.
type SessionLostError struct {
	Pool       string
	SessionID  string
	WorkerID   worker.ID
	Generation worker.Generation
	Mode       Affinity
}

func (e *SessionLostError) Error() string {
	return fmt.Sprintf("session %q lost its state: worker %d generation %d of pool %q is gone (affinity %s); call again to start the session afresh",
		e.SessionID, e.WorkerID, e.Generation, e.Pool, e.Mode)
}

// Reason implements Reasoned.
func (e *SessionLostError) Reason() string { return ReasonSessionLost }

// SessionBusyError reports a strict_fail_fast call whose session's worker
// is busy. Not executed.
type SessionBusyError struct {
	Pool       string
	SessionID  string
	WorkerID   worker.ID
	Generation worker.Generation
	RetryAfter time.Duration
}

func (e *SessionBusyError) Error() string {
	return fmt.Sprintf("session %q: its worker %d generation %d of pool %q is busy (affinity strict_fail_fast); not executed, retry after %s",
		e.SessionID, e.WorkerID, e.Generation, e.Pool, e.RetryAfter)
}

// Reason implements Reasoned.
func (e *SessionBusyError) Reason() string { return ReasonSessionBusy }

// SessionLimitError reports a call that would open a session past a limit.
type SessionLimitError struct {
	Pool  string
	Limit string // the config key
	Max   int
}

func (e *SessionLimitError) Error() string {
	return fmt.Sprintf("cannot open another session in pool %q: %s (%d) reached; close sessions (CloseSession) or raise the limit", e.Pool, e.Limit, e.Max)
}

// Reason implements Reasoned.
func (e *SessionLimitError) Reason() string { return ReasonSessionLimit }

// SessionRateError reports a client opening sessions faster than
// new_sessions_per_second allows. Not executed.
type SessionRateError struct {
	Client     string
	Rate       float64
	RetryAfter time.Duration
}

func (e *SessionRateError) Error() string {
	return fmt.Sprintf("client %s opens sessions faster than %g per second (new_sessions_per_second); not executed, retry after %s", e.Client, e.Rate, e.RetryAfter)
}

// Reason implements Reasoned.
func (e *SessionRateError) Reason() string { return ReasonSessionRate }

// MayHaveExecutedError: the call was sent to Node and the connection
// failed before its answer came; it may have run there. It is not retried
// elsewhere because it was not marked idempotent.
type MayHaveExecutedError struct {
	Node      string
	RequestID string
	Err       error
}

func (e *MayHaveExecutedError) Error() string {
	return fmt.Sprintf("call may have executed on node %s: the connection failed after the call was sent, and the call is not marked idempotent, so it was not retried: %v", e.Node, e.Err)
}

func (e *MayHaveExecutedError) Unwrap() error { return e.Err }

// Reason implements Reasoned.
func (e *MayHaveExecutedError) Reason() string { return ReasonMayHaveExecuted }

// OwnerUnavailableError: a strict-affinity session's owner cannot take the
// call (strict_fail_fast: now; strict_queue: within the deadline, before
// the break-glass lease ran out). Not executed.
type OwnerUnavailableError struct {
	Pool      string
	SessionID string
	Owner     string
	Mode      Affinity
	Why       string
}

func (e *OwnerUnavailableError) Error() string {
	return fmt.Sprintf("session %q of pool %q: its owner %s is unavailable (%s) and affinity is %s", e.SessionID, e.Pool, e.Owner, e.Why, e.Mode)
}

// Reason implements Reasoned.
func (e *OwnerUnavailableError) Reason() string { return ReasonOwnerUnavailable }

// PeerUnavailableError: the call could not be delivered to Node (not
// executed).
type PeerUnavailableError struct {
	Node string
	Err  error
}

func (e *PeerUnavailableError) Error() string {
	return fmt.Sprintf("node %s could not take the call (not executed): %v", e.Node, e.Err)
}

func (e *PeerUnavailableError) Unwrap() error { return e.Err }

// Reason implements Reasoned.
func (e *PeerUnavailableError) Reason() string { return ReasonPeerUnavailable }
