// Package call is the node's call vocabulary, shared by every part of the
// node: the request and its result, the affinity modes and session
// outcomes, and the errors a call can end with. Each error names its
// reason (the ErrorInfo reason callers see), and whether a failed call ran
// is decided once, here, from that reason (Fate): the pool engine, the
// cluster layer and the deduplication of request ids all ask Fate.
//
// It is a leaf: it imports no other part of the node.
package call

import (
	"encoding/json"
	"fmt"
	"time"

	"github.com/snakepit/snakepit/pkg/router"
	"github.com/snakepit/snakepit/pkg/worker"
)

// Request is one call of a tool, as the node sees it.
type Request struct {
	Tool string
	// Pool is empty for the default pool.
	Pool string
	// Args is a JSON object, passed to Python untouched; empty means {}.
	Args []byte
	// SessionID scopes session state; unique per pool as the caller
	// chooses it, reusable after the session ends.
	SessionID string
	// RequestID identifies the call; a caller-supplied one is an
	// idempotency key (docs/forwarding.md). The node fills it when empty.
	RequestID     string
	CorrelationID string
	Idempotent    bool
	// Affinity applies to calls with a SessionID; AffinityDefault means
	// the pool's configured mode (policies.affinity).
	Affinity Affinity
	// Client identifies the caller (its address) for per-client limits.
	Client string
	// Need are the call's placement constraints (the cluster router's).
	Need router.Constraints

	// Set by the node, never by callers:

	// ForwardedBy is the entry node of a call forwarded to this node; such
	// a call runs here (one hop at most).
	ForwardedBy string
	// Routed: a router chose this node (this node's own, or an entry
	// node's): a cordoned node then refuses what it does not hold.
	Routed bool
	// Movable: the router has another node to try when this one refuses
	// the call as not executed; a spillover queue policy only spills such
	// calls.
	Movable bool
}

// Result is the outcome of a successful call.
type Result struct {
	Payload    []byte
	Node       string
	Pool       string
	WorkerID   worker.ID
	Generation worker.Generation
	Queued     time.Duration
	Ran        time.Duration
	RequestID  string
	// Session says what the call found of its session's state.
	Session SessionOutcome
}

// Affinity says how strictly a session's call must run where its state is
// (DESIGN.md decision 4). Each mode is an affinity policy
// (pkg/agent/policy), shared by the pool engine and the cluster layer.
type Affinity int

// Affinity modes.
const (
	// AffinityDefault: the pool's configured mode (hint unless configured).
	AffinityDefault Affinity = iota
	// AffinityHint prefers the session's worker (and node); when it cannot
	// take the call another one runs it, and the result says so.
	AffinityHint
	// AffinityStrictQueue waits for the session's worker (and node),
	// within the call's deadline and the queue's limits.
	AffinityStrictQueue
	// AffinityStrictFailFast fails at once when the session's worker (or
	// node) cannot take the call.
	AffinityStrictFailFast
)

func (a Affinity) String() string {
	switch a {
	case AffinityDefault:
		return "default"
	case AffinityHint:
		return "hint"
	case AffinityStrictQueue:
		return "strict_queue"
	case AffinityStrictFailFast:
		return "strict_fail_fast"
	}
	return fmt.Sprintf("affinity(%d)", int(a))
}

// SessionOutcome says what a call of a session found of its state.
type SessionOutcome int

// Session outcomes.
const (
	SessionNone        SessionOutcome = iota // the call had no session
	SessionNew                               // bound to a worker by this call
	SessionBound                             // ran where its state is
	SessionUnavailable                       // hint: ran elsewhere, state not there
	SessionReset                             // its worker was gone: state lost, bound afresh
)

// MaxIDLen bounds session, request and correlation ids.
const MaxIDLen = 1024

// Check validates what a request carries before anything runs: a tool, ids
// within MaxIDLen, args that are a JSON object.
func (r *Request) Check() error {
	if r.Tool == "" {
		return &InvalidArgumentError{Field: "tool", Reason: "must name a tool (see ListTools)"}
	}
	if len(r.SessionID) > MaxIDLen || len(r.RequestID) > MaxIDLen {
		return &InvalidArgumentError{Field: "session_id/request_id", Reason: fmt.Sprintf("must be at most %d bytes", MaxIDLen)}
	}
	return checkArgs(r.Args)
}

// checkArgs checks that args is a JSON object without decoding it.
func checkArgs(args []byte) error {
	if len(args) == 0 {
		return nil
	}
	i := 0
	for i < len(args) && (args[i] == ' ' || args[i] == '\t' || args[i] == '\n' || args[i] == '\r') {
		i++
	}
	if i == len(args) || args[i] != '{' {
		return &InvalidArgumentError{Field: "args", Reason: "must be a JSON object (like {\"x\": 1}), got " + describeJSON(args)}
	}
	if !json.Valid(args) {
		return &InvalidArgumentError{Field: "args", Reason: "is not valid JSON"}
	}
	return nil
}

func describeJSON(b []byte) string {
	if !json.Valid(b) {
		return "something that is not JSON"
	}
	var v any
	_ = json.Unmarshal(b, &v)
	switch v.(type) {
	case []any:
		return "an array"
	case string:
		return "a string"
	case float64:
		return "a number"
	case bool:
		return "a boolean"
	case nil:
		return "null"
	}
	return "a non-object"
}
