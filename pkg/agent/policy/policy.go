// Package policy holds the node's swappable policies (DESIGN.md decision
// 10): four kinds of small interfaces, the implementations shipped beside
// them, and a Registry that maps (kind, name) to a constructor, as
// containerd registers its plugins. A pool selects one policy of each kind
// by name in its config (pools[].policies); a program that imports this
// package can register its own and select it the same way
// (docs/policies.md).
//
//   - NodeSelector (cluster layer): which nodes a call may go to, in order.
//     Shipped: two_choices (sessionless default), rendezvous (sessions),
//     locality. NodeFilter narrows the peers of a pool by hardware and
//     labels and composes with any selector: labels, gpu.
//   - WorkerSelector (pool engine): which worker of the node runs a call.
//     Shipped: session_sticky (default), least_loaded, most_recently_used.
//   - QueuePolicy (pool engine): what a call does when no worker is free.
//     Shipped: queue (default), reject, spillover.
//   - AffinityPolicy (both): what a session's call does when its worker or
//     its node cannot take it. Shipped: hint (default), strict_queue,
//     strict_fail_fast.
//
// Policies are consulted on the call path: their methods must not block,
// must be safe for concurrent use and should not allocate. Constructors
// check their options and do no I/O.
package policy

import (
	"time"

	"github.com/snakepit/snakepit/pkg/agent/call"
	"github.com/snakepit/snakepit/pkg/router"
)

// Kind is a kind of policy.
type Kind string

// The kinds of policy, as they are named in config (pools[].policies.*).
const (
	KindNode       Kind = "node"
	KindNodeFilter Kind = "node_filter"
	KindWorker     Kind = "worker"
	KindQueue      Kind = "queue"
	KindAffinity   Kind = "affinity"
)

// Names of the shipped policies.
const (
	TwoChoices       = "two_choices"
	Rendezvous       = "rendezvous"
	Locality         = "locality"
	FilterLabels     = "labels"
	FilterGPU        = "gpu"
	SessionSticky    = "session_sticky"
	LeastLoaded      = "least_loaded"
	MostRecentlyUsed = "most_recently_used"
	Queue            = "queue"
	Reject           = "reject"
	Spillover        = "spillover"
	Hint             = "hint"
	StrictQueue      = "strict_queue"
	StrictFailFast   = "strict_fail_fast"
)

// NodeSelector orders the nodes a call may run on. The cluster layer calls
// it with the current routing table; it appends the candidates, best
// first, at most req.Max, to dst (router.Table.Rendezvous and
// router.Table.TwoChoices are the building blocks). Errors are the
// router's (no eligible peer, and why).
type NodeSelector interface {
	Select(t *router.Table, req *router.Request, loads router.Loads, dst []router.Candidate) ([]router.Candidate, error)
}

// NodeFilter narrows the nodes a pool's calls may run on. It is applied
// once, when the pool's policies are built, by adding to the pool's
// placement constraints; the router then applies them to every call of the
// pool, together with the call's own. It returns an error (naming its
// option) when it conflicts with what is already there.
type NodeFilter interface {
	Constrain(c *router.Constraints) error
}

// Worker is what a worker selector sees of one worker of the pool.
type Worker struct {
	// Busy is how many calls it holds; Capacity how many it can.
	Busy, Capacity int
	// Sessions is how many sessions are bound to it; SessionRoom says
	// whether another may be (max_sessions_per_worker).
	Sessions    int
	SessionRoom bool
	// LastUsed orders workers by their last finished call: higher is more
	// recent (warmer).
	LastUsed uint64
	// Recycling: its replacement is starting; it takes no new calls.
	Recycling bool
}

// Free reports whether the worker can take a new call now.
func (w Worker) Free() bool { return w.Busy < w.Capacity && !w.Recycling }

// HasRoom reports whether the worker has a free slot: a recycling worker
// still takes its own sessions' calls until it retires.
func (w Worker) HasRoom() bool { return w.Busy < w.Capacity }

// Workers is the pool's ready workers, as a selector reads them.
type Workers interface {
	Len() int
	At(i int) Worker
}

// Purpose says what a worker is picked for.
type Purpose struct {
	// NewSession: the call opens a session, which is bound to the worker
	// picked (it must have SessionRoom).
	NewSession bool
	// Bound is the index of the worker that holds the call's session, -1
	// when the call has none (or it is new).
	Bound int
}

// WorkerSelector picks the worker of the node that runs a call. The pool
// engine calls it under its lock: Pick must be quick and must not call
// back into the pool. It returns the index of a Free worker (with
// SessionRoom for a new session; the session's own worker, Bound, may be
// picked whenever it HasRoom, recycling or not), or -1 when none suits: the call then
// waits as the queue policy says.
type WorkerSelector interface {
	Pick(ws Workers, p Purpose) int
}

// QueueState is what a queue policy sees when a call finds no free worker.
type QueueState struct {
	// Queued is how many calls wait already; Depth is the pool's
	// queue_depth.
	Queued, Depth int
	// Movable: the router has another node to try if this one refuses.
	Movable bool
}

// QueueAction is a queue policy's decision.
type QueueAction int

// Queue actions.
const (
	// Wait in the pool's queue (bounded by queue_max_wait and the deadline).
	Wait QueueAction = iota
	// Refuse now: QueueFullError, not executed.
	Refuse
	// Spill: refuse now as not executed so that the router moves the call
	// to its next candidate (only when QueueState.Movable).
	Spill
)

// QueuePolicy decides what a call does when no worker of its pool is free.
type QueuePolicy interface {
	Admit(s QueueState) QueueAction
}

// BusyAction is what a session's call does when the worker holding its
// state cannot take it now.
type BusyAction int

// Busy actions.
const (
	// RunElsewhere: on another worker, with an empty, throwaway session
	// store; the result says SessionUnavailable.
	RunElsewhere BusyAction = iota
	// WaitForWorker: queue for that worker only.
	WaitForWorker
	// RefuseBusy: fail at once with SessionBusyError (not executed).
	RefuseBusy
)

// GoneAction is what a session's call does when the worker that held its
// state is gone.
type GoneAction int

// Gone actions.
const (
	// Rebind the session to a new worker; the result says SessionReset.
	Rebind GoneAction = iota
	// Lose: fail with SessionLostError and drop the session.
	Lose
)

// OwnerAction is what a session's call does when its owner node is down.
type OwnerAction int

// Owner actions.
const (
	// WaitForOwner until it is back (woken by routing changes), within the
	// call's deadline.
	WaitForOwner OwnerAction = iota
	// FailOwner at once with OwnerUnavailableError.
	FailOwner
	// TakeOver: the next-ranked node takes the session over.
	TakeOver
)

// AffinityPolicy says how strictly a session's calls must run where its
// state is, on the node (cluster layer) and on the worker (pool engine).
type AffinityPolicy interface {
	// Mode is the mode the policy is reported and forwarded as.
	Mode() call.Affinity
	// OwnerOnly: only the session's owner node may run the call; when
	// false, the cluster layer falls over to the next-ranked node like a
	// sessionless call.
	OwnerOnly() bool
	// OwnerDown decides for an OwnerOnly call whose owner has been down
	// for downFor (0: it just refused) and break_glass_lease is lease.
	OwnerDown(downFor, lease time.Duration) OwnerAction
	// WorkerBusy and WorkerGone decide on the node that runs the call.
	WorkerBusy() BusyAction
	WorkerGone() GoneAction
}

// Config selects a pool's policies by name (config key pools[].policies).
// Empty names take the defaults the node configures.
type Config struct {
	// Node orders the nodes of sessionless calls.
	Node Ref `mapstructure:"node"`
	// SessionNode orders the nodes of session calls (and of calls with a
	// caller-supplied request id, placed like sessions).
	SessionNode Ref `mapstructure:"session_node"`
	// NodeFilters narrow the nodes of every call of the pool.
	NodeFilters []Ref `mapstructure:"node_filters"`
	// Worker picks the worker inside the node.
	Worker Ref `mapstructure:"worker"`
	// Queue decides what a call does when no worker is free.
	Queue Ref `mapstructure:"queue"`
	// Affinity is the pool's default affinity mode; a request's own mode
	// overrides it.
	Affinity Ref `mapstructure:"affinity"`
}

// Ref names one policy and its options.
type Ref struct {
	Name    string         `mapstructure:"name"`
	Options map[string]any `mapstructure:"options"`
}

// Env is what a policy's constructor knows of where it runs.
type Env struct {
	// Pool is the pool the policy serves.
	Pool string
	// Key is the config key of the policy's block, for error messages
	// ("pools[gpu].policies.queue"); its options are Key + ".options".
	Key string
	// Labels are this node's labels (discovery.labels).
	Labels map[string]string
}

// Set is a pool's policies, built by Registry.Build.
type Set struct {
	Node        NodeSelector
	SessionNode NodeSelector
	// Need is the pool's placement constraints (its node filters merged);
	// FilterKey names them in errors.
	Need      router.Constraints
	FilterKey string
	Worker    WorkerSelector
	Queue     QueuePolicy
	// Affinity is the pool's default mode.
	Affinity AffinityPolicy
}

// AffinityFor returns the policy of a request's mode: the pool's default
// for call.AffinityDefault, else the shipped policy of that mode.
func (s *Set) AffinityFor(a call.Affinity) AffinityPolicy {
	switch a {
	case call.AffinityHint:
		return HintPolicy
	case call.AffinityStrictQueue:
		return StrictQueuePolicy
	case call.AffinityStrictFailFast:
		return StrictFailFastPolicy
	}
	return s.Affinity
}

// Constraints merges a call's own placement constraints with the pool's.
// It allocates only when both carry labels.
func (s *Set) Constraints(c router.Constraints) router.Constraints {
	n := &s.Need
	if !n.GPU && n.MinGPUMemoryMiB == 0 && n.GPUModel == "" && len(n.Labels) == 0 {
		return c
	}
	c.GPU = c.GPU || n.GPU
	c.MinGPUMemoryMiB = max(c.MinGPUMemoryMiB, n.MinGPUMemoryMiB)
	if n.GPUModel != "" {
		c.GPUModel = n.GPUModel // the pool's filter wins
	}
	switch {
	case len(c.Labels) == 0:
		c.Labels = n.Labels
	case len(n.Labels) > 0:
		m := make(map[string]string, len(c.Labels)+len(n.Labels))
		for k, v := range c.Labels {
			m[k] = v
		}
		for k, v := range n.Labels {
			m[k] = v // the pool's filter wins
		}
		c.Labels = m
	}
	return c
}

// Default returns a Set of the shipped defaults, for a pool whose config
// this node does not have (a call forwarded for a pool it does not serve
// is refused there, but routing needs a Set).
func Default() *Set {
	return &Set{
		Node:        twoChoices{},
		SessionNode: rendezvous{},
		Worker:      sessionSticky{},
		Queue:       boundedQueue{},
		Affinity:    HintPolicy,
	}
}
