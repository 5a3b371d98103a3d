// Package cluster is the node's cluster layer: for every call it decides
// which node runs it (the pool's node selector over the routing table of
// the peers discovery lists), and runs it there in one hop, locally
// through the pool engine (the Local interface) or forwarded over gRPC. It
// owns what that takes: one connection per peer with its circuit breaker,
// the peers' load signals, the retry budget, the affinity modes across
// nodes (strict owners, the break-glass lease) and the deduplication of
// caller-supplied request ids on the executing node (docs/forwarding.md).
// Routing happens here, before the engine; the engine never routes.
package cluster

import (
	"context"
	crand "crypto/rand"
	"errors"
	"fmt"
	"math"
	"math/rand/v2"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/rs/zerolog"
	"github.com/sony/gobreaker/v2"
	"google.golang.org/grpc"
	"google.golang.org/grpc/connectivity"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/snakepit/snakepit/pkg/agent/call"
	"github.com/snakepit/snakepit/pkg/agent/policy"
	"github.com/snakepit/snakepit/pkg/agent/wire"
	"github.com/snakepit/snakepit/pkg/discovery"
	"github.com/snakepit/snakepit/pkg/router"
	snakepitv1 "github.com/snakepit/snakepit/proto/snakepit/v1"
)

// Config configures the cluster layer (config section router). The node
// fills every field; its defaults live in pkg/agent.
type Config struct {
	// DedupWindow is how long the executing node remembers a
	// caller-supplied request id and its outcome.
	DedupWindow time.Duration `mapstructure:"dedup_window"`
	// DedupMaxEntries bounds the remembered request ids (oldest dropped).
	DedupMaxEntries int `mapstructure:"dedup_max_entries"`
	// BreakGlassLease: a strict_queue session whose owner has been down
	// this long moves to its next-ranked node.
	BreakGlassLease time.Duration `mapstructure:"break_glass_lease"`
	// RetryBudgetRatio and RetryBudgetMin bound retries on other nodes.
	RetryBudgetRatio float64 `mapstructure:"retry_budget_ratio"`
	RetryBudgetMin   int     `mapstructure:"retry_budget_min"`
	// LoadRefreshInterval is how often idle peers that discovery lists as
	// healthy are asked for their load.
	LoadRefreshInterval time.Duration `mapstructure:"load_refresh_interval"`
	// BreakerFailures and BreakerBackoff: consecutive failures that eject
	// a peer, and for how long before a probe.
	BreakerFailures int           `mapstructure:"breaker_failures"`
	BreakerBackoff  time.Duration `mapstructure:"breaker_backoff"`
	// MaxCandidates is how many nodes one call may be tried on.
	MaxCandidates int `mapstructure:"max_candidates"`
}

// Local is the pool engine of this node, as the cluster layer uses it.
type Local interface {
	// Execute runs a call here (engine.Engine.Execute).
	Execute(ctx context.Context, req *call.Request, emit func([]byte) error) (*call.Result, error)
	// DefaultPool is the pool of requests that name none.
	DefaultPool() string
	// Pools lists the node's pools.
	Pools() []string
	// Slots is a pool's worker slots (0: not here).
	Slots(pool string) int
	// Load is a pool's load now (NaN: not here).
	Load(pool string) float64
	// CallTimeout is a pool's call_timeout, false when not here.
	CallTimeout(pool string) (time.Duration, bool)
	// Healthy says whether every pool can serve.
	Healthy() bool
	// Admission says whether the node is cordoned and whether draining.
	Admission() (cordoned, draining bool)
}

// PeerSource gives the cluster's peers: discovery.Directory has it.
type PeerSource interface {
	Current() *discovery.Snapshot
}

// Observer is told what the cluster layer does (the node's metrics).
type Observer interface {
	Forwarded(peer, outcome string)
	Retried(reason string)
	Ejected(peer string)
}

// Deps are what the cluster layer is given.
type Deps struct {
	Log zerolog.Logger
	// NodeID is this node's id.
	NodeID string
	// Local is this node's pool engine.
	Local Local
	// Peers is discovery's view of the cluster.
	Peers PeerSource
	// Creds dial peers (nil: plaintext).
	Creds credentials.TransportCredentials
	// Policies returns a pool's policies; nil, or a nil Set, means the
	// shipped defaults.
	Policies func(pool string) *policy.Set
	// CallTimeout is the deadline of calls for pools this node lacks.
	CallTimeout time.Duration
	// MaxMessageBytes sizes the messages to peers.
	MaxMessageBytes int
	// Observer may be nil.
	Observer Observer
}

type nopObserver struct{}

func (nopObserver) Forwarded(string, string) {}
func (nopObserver) Retried(string)           {}
func (nopObserver) Ejected(string)           {}

// Router is the node's cluster layer. Create it with New; calls run here
// (without routing) until Run has its first snapshot.
type Router struct {
	cfg      Config
	d        Deps
	log      zerolog.Logger
	obs      Observer
	creds    grpc.DialOption
	budget   *retryBudget
	dedup    *dedup
	defaults *policy.Set
	reqBase  string
	reqSeq   atomic.Uint64

	state atomic.Pointer[routeState]

	mu     sync.Mutex // guards peers and table rebuilds
	peers  map[string]*peerConn
	info   map[string]discovery.Peer // last listing of each peer
	self   *discovery.Peer           // the local node as published
	lastSt string                    // fingerprint of the local peer state
	snap   *discovery.Snapshot
	rebuld chan struct{}
}

// New builds the cluster layer. It does no I/O.
func New(cfg Config, deps Deps) *Router {
	creds := grpc.WithTransportCredentials(insecure.NewCredentials())
	if deps.Creds != nil {
		creds = grpc.WithTransportCredentials(deps.Creds)
	}
	r := &Router{
		cfg: cfg, d: deps, creds: creds, obs: deps.Observer,
		log:      deps.Log.With().Str("component", "router").Logger(),
		budget:   newRetryBudget(cfg.RetryBudgetRatio, cfg.RetryBudgetMin),
		dedup:    newDedup(cfg.DedupWindow, cfg.DedupMaxEntries),
		defaults: policy.Default(),
		peers:    make(map[string]*peerConn),
		info:     make(map[string]discovery.Peer),
		rebuld:   make(chan struct{}, 1),
	}
	if r.obs == nil {
		r.obs = nopObserver{}
	}
	var b [6]byte
	_, _ = crand.Read(b[:])
	r.reqBase = fmt.Sprintf("%x-", b)
	return r
}

// routeState is what one call needs, swapped whole on every change.
type routeState struct {
	// table ranks sessionless calls: cordoned nodes take none.
	table *router.Table
	// sessions ranks session calls: the same peers, but a cordoned (not
	// draining) node still ranks, so the sessions it holds keep going to
	// it; it refuses the ones it does not hold (ErrCordoned), which then
	// go to the next-ranked node.
	sessions *router.Table
	conns    []*peerConn // by table index (both tables); nil for the local node
	// changed is closed when a newer routeState replaces this one.
	changed chan struct{}
}

// Run follows the peer source's snapshots, keeps one connection per peer,
// refreshes idle peers' load every load_refresh_interval, and rebuilds the
// routing table on every change, until ctx is done; then it closes the
// peer connections and returns nil. Calls are routed only while Run runs
// (and run locally before its first snapshot).
func (r *Router) Run(ctx context.Context) error {
	defer r.closeAll()
	tick := time.NewTicker(r.cfg.LoadRefreshInterval)
	defer tick.Stop()
	for {
		snap := r.d.Peers.Current()
		r.sync(snap, time.Now())
		select {
		case <-ctx.Done():
			return nil
		case <-snap.Changed():
		case <-r.rebuld:
		case <-tick.C:
			r.refreshIdle(ctx)
		}
	}
}

func (r *Router) closeAll() {
	if old := r.state.Swap(nil); old != nil {
		close(old.changed)
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	for id, p := range r.peers {
		p.close()
		delete(r.peers, id)
	}
}

// breakerChanged counts an ejection and asks Run to rebuild the table.
func (r *Router) breakerChanged(id string, to gobreaker.State) {
	if to == gobreaker.StateOpen {
		r.obs.Ejected(id)
		r.log.Warn().Str("node_id", id).Dur("backoff", r.cfg.BreakerBackoff).Msg("peer ejected: calls to it failed or it stopped answering")
	} else if to == gobreaker.StateClosed {
		r.log.Info().Str("node_id", id).Msg("peer readmitted")
	}
	r.Kick()
}

// Kick asks Run to rebuild the routing table now: the node's own health or
// admission changed. It does not block.
func (r *Router) Kick() {
	select {
	case r.rebuld <- struct{}{}:
	default:
	}
}

// sync applies a snapshot: new peers are dialled, departed ones kept (as
// unhealthy, for strict sessions' break-glass lease) and then closed, and
// the table rebuilt when anything routing depends on changed.
func (r *Router) sync(snap *discovery.Snapshot, now time.Time) {
	r.mu.Lock()
	defer r.mu.Unlock()
	local := r.d.NodeID
	changed := snap != r.snap
	r.snap = snap
	if changed {
		listed := map[string]bool{}
		r.self = nil
		for _, dp := range snap.Peers() {
			id := string(dp.ID)
			if id == local {
				r.self = &dp
				continue
			}
			listed[id] = dp.Healthy
			pc := r.peers[id]
			if pc != nil && pc.addr != dp.Addr {
				pc.close()
				pc = nil
			}
			if pc == nil {
				var err error
				if pc, err = dialPeer(id, dp.Addr, r.cfg, r.d.MaxMessageBytes, r.creds, r.breakerChanged); err != nil {
					r.log.Warn().Err(err).Str("node_id", id).Str("addr", dp.Addr).Msg("cannot dial peer")
					continue
				}
				r.peers[id] = pc
			}
			r.info[id] = dp
		}
		for id, pc := range r.peers {
			h, ok := listed[id]
			pc.mu.Lock()
			pc.listed = ok && h
			if ok {
				pc.goneAt = time.Time{}
			} else if pc.goneAt.IsZero() {
				pc.goneAt = now
			}
			pc.mu.Unlock()
			if !pc.listed {
				pc.markDown(now)
			}
		}
	}
	// Forget peers gone longer than the lease.
	for id, pc := range r.peers {
		pc.mu.Lock()
		gone := !pc.goneAt.IsZero() && now.Sub(pc.goneAt) > r.cfg.BreakGlassLease
		pc.mu.Unlock()
		if gone {
			pc.close()
			delete(r.peers, id)
			delete(r.info, id)
			changed = true
		}
	}
	self := r.localPeer()
	fp := fmt.Sprint(self.Healthy, self.Cordoned, self.Draining, self.Pools)
	for _, pc := range r.peers {
		pc.down(now) // starts (or stops) the peer's down clock
		// The breaker's state too: a change wakes strict_queue waiters.
		fp += fmt.Sprint(pc.id, pc.usable(), pc.br.State())
	}
	if !changed && fp == r.lastSt && r.state.Load() != nil {
		return
	}
	r.lastSt = fp
	peers := []router.Peer{self}
	conns := []*peerConn{nil}
	for id, pc := range r.peers {
		dp := r.info[id]
		rp := routerPeer(dp)
		pc.mu.Lock()
		rp.Healthy = pc.listed
		pc.mu.Unlock()
		peers = append(peers, rp)
		conns = append(conns, pc)
	}
	t, err := router.NewTable(peers, router.NodeID(local))
	if err != nil {
		r.log.Error().Err(err).Msg("cannot build the routing table; keeping the previous one")
		return
	}
	for i := range peers {
		peers[i].Cordoned = false // Draining still takes a node out
	}
	ts, err := router.NewTable(peers, router.NodeID(local))
	if err != nil {
		r.log.Error().Err(err).Msg("cannot build the session routing table; keeping the previous one")
		return
	}
	// Both tables index peers in order of ID: one conns slice serves both.
	byIndex := make([]*peerConn, t.Len())
	for i, p := range peers {
		j, _ := t.Index(p.ID)
		byIndex[j] = conns[i]
	}
	old := r.state.Swap(&routeState{table: t, sessions: ts, conns: byIndex, changed: make(chan struct{})})
	if old != nil {
		close(old.changed)
	}
}

// localPeer describes this node to its own router: as published when
// discovery lists it (so every router of the cluster weighs it the same),
// with its live health, cordon and drain state.
func (r *Router) localPeer() router.Peer {
	var rp router.Peer
	if r.self != nil {
		rp = routerPeer(*r.self)
	} else {
		pools := r.d.Local.Pools()
		rp.Pools = make(map[string]int, len(pools))
		for _, name := range pools {
			rp.Pools[name] = r.d.Local.Slots(name)
		}
	}
	rp.ID = router.NodeID(r.d.NodeID)
	rp.Healthy = r.d.Local.Healthy()
	rp.Cordoned, rp.Draining = r.d.Local.Admission()
	return rp
}

func routerPeer(dp discovery.Peer) router.Peer {
	rp := router.Peer{
		ID: router.NodeID(dp.ID), Healthy: dp.Healthy, Cordoned: dp.Cordoned, Draining: dp.Draining,
		GPUCount: dp.GPUs.Count, GPUModels: dp.GPUs.Models, Labels: dp.Labels,
		ProtoMin: dp.ProtoMin, ProtoMax: dp.ProtoMax,
		Pools: make(map[string]int, len(dp.Pools)),
	}
	if dp.GPUs.Count > 0 {
		rp.GPUMemoryMiB = int(dp.GPUs.MemoryBytes / uint64(dp.GPUs.Count) >> 20)
	}
	for name, o := range dp.Pools {
		rp.Pools[name] = o.Slots
	}
	return rp
}

// refreshIdle asks every peer that discovery lists as healthy and that was
// not heard from within the refresh interval for its health and load, in
// parallel, each bounded by the interval.
func (r *Router) refreshIdle(ctx context.Context) {
	r.mu.Lock()
	var idle []*peerConn
	cut := time.Now().Add(-r.cfg.LoadRefreshInterval).UnixNano()
	for _, pc := range r.peers {
		pc.mu.Lock()
		listed := pc.listed
		pc.mu.Unlock()
		if !listed {
			// Kept only for its down clock (break-glass lease): it takes
			// no calls, so its load does not matter, and discovery says
			// when it is back. Probing it would only trip its breaker,
			// log an ejection of a node that left, and hold it back for a
			// back-off once it returns.
			continue
		}
		if pc.conn.GetState() == connectivity.TransientFailure {
			// Try a failing peer again now rather than after grpc's
			// growing back-off (up to 2 minutes): a restarted node
			// takes traffic again within one refresh interval.
			pc.conn.ResetConnectBackoff()
		}
		if pc.lastHeard.Load() < cut {
			idle = append(idle, pc)
		}
	}
	r.mu.Unlock()
	var wg sync.WaitGroup
	for _, pc := range idle {
		wg.Go(func() { pc.check(ctx, r.cfg.LoadRefreshInterval) })
	}
	wg.Wait()
}

// outcome classifies one attempt.
type outcome int

const (
	done       outcome = iota // an answer (result or the executing node's error): final
	notStarted                // provably not executed, and another node may: try the next candidate
	unknown                   // may have executed: retry only if idempotent
)

func (r *Router) policies(pool string) *policy.Set {
	if r.d.Policies != nil {
		if s := r.d.Policies(pool); s != nil {
			return s
		}
	}
	return r.defaults
}

func (r *Router) newID() string {
	return r.reqBase + strconv.FormatUint(r.reqSeq.Add(1), 10)
}

// Execute runs a call where it belongs: this node's entry point for every
// call. It checks the request, gives it a deadline (the pool's
// call_timeout when the caller set none), and either runs it here (it was
// forwarded here, the router has no table yet, or this node is alone and
// the call has no placement constraints) or ranks the nodes with the
// pool's node selector and runs it on the first that takes it, here or
// forwarded in one hop. A caller-supplied request id is deduplicated on
// the node that executes the call. With emit set the call is a stream.
func (r *Router) Execute(ctx context.Context, req *call.Request, emit func([]byte) error) (*call.Result, error) {
	if err := req.Check(); err != nil {
		return nil, err
	}
	pool := req.Pool
	if pool == "" {
		pool = r.d.Local.DefaultPool()
	}
	if _, ok := ctx.Deadline(); !ok {
		timeout, ok := r.d.Local.CallTimeout(pool)
		if !ok {
			timeout = r.d.CallTimeout
		}
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, timeout)
		defer cancel()
	}
	if req.ForwardedBy != "" {
		req.Routed = true
		return r.runLocal(ctx, req, emit)
	}
	set := r.policies(pool)
	need := set.Constraints(req.Need)
	st := r.state.Load()
	if st == nil || st.table.Len() == 1 && noConstraints(need) {
		return r.runLocal(ctx, req, emit)
	}
	if req.CorrelationID == "" {
		req.CorrelationID = r.newID()
	}
	rq := router.Request{SessionID: req.SessionID, Pool: pool, Need: need, Max: r.cfg.MaxCandidates, Rand: rand.Uint64()}
	if rq.SessionID == "" && req.RequestID != "" {
		// A caller-supplied request id is placed like a session, so a retry
		// through any node reaches the node that deduplicates it.
		rq.SessionID = "request:" + req.RequestID
	}
	if req.SessionID != "" {
		if aff := set.AffinityFor(req.Affinity); aff.OwnerOnly() {
			res, err := r.strict(ctx, st, set, aff, req, rq)
			return res, r.explain(set, err)
		}
	}
	for i := 0; i < st.table.Len(); i++ {
		if pc := st.conns[i]; pc != nil && !pc.usable() {
			rq.Exclude = append(rq.Exclude, router.NodeID(pc.id))
		}
	}
	sel, table := set.Node, st.table
	if rq.SessionID != "" {
		sel = set.SessionNode
	}
	if req.SessionID != "" {
		table = st.sessions
	}
	var buf [16]router.Candidate
	cands, err := sel.Select(table, &rq, poolLoads{st: st, local: r.d.Local, pool: pool}, buf[:0])
	if err != nil {
		return nil, r.explain(set, err)
	}
	now := time.Now()
	r.budget.request(now)
	var last error
	for i, c := range cands {
		// Moving past a cordoned node's refusal is placement, not a retry:
		// it costs the retry budget nothing.
		if i > 0 && call.ReasonOf(last) != call.ReasonCordoned && !r.budget.allowRetry(now) {
			r.log.Debug().Str("request_id", req.RequestID).Msg("retry budget spent")
			break
		}
		if i > 0 {
			r.obs.Retried(retryReason(last))
		}
		req.Movable = i < len(cands)-1
		res, err, oc := r.attempt(ctx, st, c, req, emit)
		switch oc {
		case done:
			return res, err
		case unknown:
			if !req.Idempotent || emit != nil {
				return nil, &call.MayHaveExecutedError{Node: string(c.ID), RequestID: req.RequestID, Err: err}
			}
			err = &fateUnknownError{err}
		}
		last = err
		if ctx.Err() != nil {
			break
		}
	}
	return nil, last
}

// explain names the pool's node filters in an unsatisfiable placement.
func (r *Router) explain(set *policy.Set, err error) error {
	var use *router.UnsatisfiableError
	if set.FilterKey != "" && errors.As(err, &use) {
		use.Detail += "; the pool's " + set.FilterKey + " require it"
	}
	return err
}

// runLocal runs a call on this node's engine, deduplicating a
// caller-supplied request id (unary calls; a stream's items cannot be
// replayed).
func (r *Router) runLocal(ctx context.Context, req *call.Request, emit func([]byte) error) (*call.Result, error) {
	callerID := req.RequestID != ""
	if !callerID {
		req.RequestID = r.newID()
	}
	if req.CorrelationID == "" {
		req.CorrelationID = req.RequestID
	}
	if callerID && emit == nil {
		return r.dedup.do(ctx, req.RequestID, func() (*call.Result, error) { return r.d.Local.Execute(ctx, req, nil) })
	}
	return r.d.Local.Execute(ctx, req, emit)
}

// strict routes a session call whose affinity policy allows only the
// owner: ranked with unhealthy peers included so a down owner stays the
// owner. When the owner is down, the policy decides: fail now, wait for it
// (woken by every routing change) or, past the break-glass lease, hand the
// session to the next-ranked node. A cordoned owner that does not hold the
// session refuses it (not executed): the session is new, and is placed on
// the next-ranked node.
func (r *Router) strict(ctx context.Context, st *routeState, set *policy.Set, aff policy.AffinityPolicy, req *call.Request, rq router.Request) (*call.Result, error) {
	rq.IncludeUnhealthy, rq.Max = true, 1
	req.Movable = false
	var buf [1]router.Candidate
	for {
		cands, err := set.SessionNode.Select(st.sessions, &rq, nil, buf[:0])
		if err != nil {
			return nil, err
		}
		c := cands[0]
		now := time.Now()
		isDown, since := false, time.Time{}
		why := "unhealthy"
		if pc := st.conns[c.Index]; pc != nil {
			isDown, since = pc.down(now)
			if !pc.usable() {
				why = "unreachable or ejected"
			}
		} else {
			isDown = !c.Healthy
		}
		var downFor time.Duration
		if !since.IsZero() {
			downFor = now.Sub(since)
		}
		ownerErr := &call.OwnerUnavailableError{Pool: rq.Pool, SessionID: req.SessionID, Owner: string(c.ID), Mode: aff.Mode(), Why: why}
		if !since.IsZero() && aff.OwnerDown(downFor, r.cfg.BreakGlassLease) == policy.TakeOver {
			// Break glass: the owner has been down (failing every probe)
			// for the lease; the next-ranked node takes the session over.
			r.log.Warn().Str("session_id", req.SessionID).Str("owner", string(c.ID)).Dur("down_for", downFor).
				Msg("strict session owner down past the break-glass lease; moving the session")
			rq.Exclude = append(rq.Exclude, c.ID)
			rq.IncludeUnhealthy = false
			continue
		}
		if !isDown {
			res, err, oc := r.attempt(ctx, st, c, req, nil)
			switch {
			case oc == unknown:
				return nil, &call.MayHaveExecutedError{Node: string(c.ID), RequestID: req.RequestID, Err: err}
			case oc == notStarted && call.ReasonOf(err) == call.ReasonCordoned:
				// A new session of a cordoned owner: place it on the next.
				rq.Exclude = append(rq.Exclude, c.ID)
				continue
			case oc == notStarted && isPeerUnavailable(err):
				// The owner's breaker is deciding (a probe is out) or its
				// connection just failed: the owner is down for now.
				ownerErr.Why = err.Error()
			default:
				return res, err
			}
		}
		if aff.OwnerDown(downFor, r.cfg.BreakGlassLease) == policy.FailOwner {
			return nil, ownerErr
		}
		// Wait for the owner (or the lease), within the deadline: any
		// routing change (breaker, connection, discovery) wakes us.
		var lease *time.Timer
		var leaseC <-chan time.Time
		if !since.IsZero() {
			lease = time.NewTimer(since.Add(r.cfg.BreakGlassLease).Sub(now))
			leaseC = lease.C
		}
		select {
		case <-ctx.Done():
			ownerErr.Why += fmt.Sprintf("; waited until the deadline (break_glass_lease %s)", r.cfg.BreakGlassLease)
		case <-st.changed:
		case <-leaseC:
		}
		if lease != nil {
			lease.Stop()
		}
		if ctx.Err() != nil {
			return nil, ownerErr
		}
		cur := r.state.Load()
		if cur == nil {
			ownerErr.Why += "; this node's router stopped"
			return nil, ownerErr // the node is shutting down
		}
		st = cur
	}
}

// fateUnknownError marks an attempt that may have run, retried because
// the call is idempotent.
type fateUnknownError struct{ error }

func (e *fateUnknownError) Unwrap() error { return e.error }

// retryReason labels snakepit_retries_total for a move to the next node
// after the attempt that failed with err.
func retryReason(err error) string {
	var fu *fateUnknownError
	switch {
	case errors.As(err, &fu):
		return "idempotent_fate_unknown"
	case isPeerUnavailable(err):
		return "peer_unreachable"
	case call.ReasonOf(err) == call.ReasonCordoned:
		return "peer_cordoned"
	default:
		return "peer_refused"
	}
}

// isPeerUnavailable: the call was not delivered to a peer (its breaker or
// connection refused it).
func isPeerUnavailable(err error) bool {
	var pue *call.PeerUnavailableError
	return errors.As(err, &pue)
}

// poolLoads gives the node selector the loads of one pool: the local
// node's measured now, the peers' as last reported.
type poolLoads struct {
	st    *routeState
	local Local
	pool  string
}

var nan = math.NaN()

func (l poolLoads) Load(i int) float64 {
	if pc := l.st.conns[i]; pc != nil {
		return pc.load(l.pool)
	}
	return l.local.Load(l.pool)
}

// attempt runs the call on one candidate and says what its outcome means:
// the same table (call.FateOf) decides for a local answer and a peer's.
func (r *Router) attempt(ctx context.Context, st *routeState, c router.Candidate, req *call.Request, emit func([]byte) error) (*call.Result, error, outcome) {
	pc := st.conns[c.Index]
	if pc == nil {
		req.Routed = true
		res, err := r.runLocal(ctx, req, emit)
		if call.FateOf(err) == call.Movable {
			return nil, err, notStarted
		}
		return res, err, done
	}
	res, err, oc := r.forward(ctx, pc, req, emit)
	r.obs.Forwarded(pc.id, forwardOutcome(err, oc))
	return res, err, oc
}

// forwardOutcome labels snakepit_forwards_total.
func forwardOutcome(err error, oc outcome) string {
	if err == nil {
		return "ok"
	}
	var re *wire.RemoteError
	isAnswer := errors.As(err, &re)
	switch {
	case oc == done && isAnswer:
		return "error"
	case oc == done:
		return "no_answer"
	case oc == notStarted && isAnswer:
		return "refused"
	case oc == notStarted:
		return "not_delivered"
	default:
		return "fate_unknown"
	}
}

// forward sends the call to a peer: attempt's remote half.
func (r *Router) forward(ctx context.Context, pc *peerConn, req *call.Request, emit func([]byte) error) (*call.Result, error, outcome) {
	finish, err := pc.br.Allow()
	if err != nil {
		return nil, &call.PeerUnavailableError{Node: pc.id, Err: err}, notStarted
	}
	kv := []string{wire.ForwardedHeader, r.d.NodeID, wire.CorrelationHeader, req.CorrelationID}
	if req.Movable {
		kv = append(kv, wire.MovableHeader, "1")
	}
	octx := metadata.AppendToOutgoingContext(ctx, kv...)
	sent := &sentFlag{}
	octx = withSentFlag(octx, sent)
	in := wire.RequestToProto(req)
	var (
		res    *call.Result
		tr     metadata.MD
		chunks bool
	)
	if emit == nil {
		var out *snakepitv1.ExecuteResponse
		out, err = pc.client.Execute(octx, in, grpc.Trailer(&tr))
		if err == nil {
			res = wire.ResultFromProto(out)
		}
	} else {
		res, chunks, err = forwardStream(octx, pc.client, in, emit, &tr)
	}
	if len(tr) > 0 {
		pc.heard(tr)
	}
	if err == nil {
		finish(nil)
		return res, nil, done
	}
	s, _ := status.FromError(err)
	re, isAnswer := wire.NewRemoteError(pc.id, s)
	if chunks {
		finish(nil)
		if isAnswer {
			return nil, re, done
		}
		return nil, err, unknown
	}
	if isAnswer {
		finish(nil) // the peer answered: it is alive
		if call.FateOf(re) == call.Movable {
			return nil, re, notStarted
		}
		return nil, re, done
	}
	if ctx.Err() != nil {
		// Our deadline or our caller ended the call before the peer
		// answered: a slow tool, or a frozen peer. The breaker ignores the
		// call; a liveness probe tells the two apart.
		finish(errNoAnswer)
		pc.probe()
		if errors.Is(ctx.Err(), context.DeadlineExceeded) {
			return nil, fmt.Errorf("node %s did not answer within the deadline: %w", pc.id, context.DeadlineExceeded), done
		}
		return nil, ctx.Err(), done
	}
	finish(errPeerFailed)
	if !sent.sent.Load() {
		return nil, &call.PeerUnavailableError{Node: pc.id, Err: err}, notStarted
	}
	return nil, err, unknown
}

func forwardStream(ctx context.Context, c snakepitv1.SnakepitClient, in *snakepitv1.ExecuteRequest, emit func([]byte) error, tr *metadata.MD) (*call.Result, bool, error) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	st, err := c.ExecuteStream(ctx, in, grpc.Trailer(tr))
	if err != nil {
		return nil, false, err
	}
	chunks := false
	for {
		m, err := st.Recv()
		if err != nil {
			return nil, chunks, err
		}
		switch v := m.GetMsg().(type) {
		case *snakepitv1.ExecuteStreamResponse_Chunk:
			chunks = true
			if err := emit(v.Chunk.GetData()); err != nil {
				return nil, chunks, err
			}
		case *snakepitv1.ExecuteStreamResponse_Done:
			return wire.ResultFromProto(v.Done), chunks, nil
		}
	}
}

// PeerIDs lists the peers the router knows, for diagnostics and tests.
func (r *Router) PeerIDs() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	ids := make([]string, 0, len(r.peers))
	for id := range r.peers {
		ids = append(ids, id)
	}
	slices.Sort(ids)
	return ids
}

// NextOwner names the node that would own a session of a pool if this
// node left the ranking: rendezvous ranking without this node. "" when
// routing has no table yet or no other node serves the pool.
func (r *Router) NextOwner(pool, sessionID string) string {
	st := r.state.Load()
	if st == nil || st.table == nil {
		return ""
	}
	c, err := st.table.Owner(router.Request{SessionID: sessionID, Pool: pool, Exclude: []router.NodeID{router.NodeID(r.d.NodeID)}})
	if err != nil {
		return ""
	}
	return string(c.ID)
}

// PeerAddrs lists the cluster's nodes as the last snapshot has them: node
// id -> gRPC address.
func (r *Router) PeerAddrs() map[string]string {
	r.mu.Lock()
	defer r.mu.Unlock()
	out := map[string]string{}
	if r.snap == nil {
		return out
	}
	for _, p := range r.snap.Peers() {
		out[string(p.ID)] = p.Addr
	}
	return out
}

func noConstraints(c router.Constraints) bool {
	return !c.GPU && c.MinGPUMemoryMiB <= 0 && c.GPUModel == "" && len(c.Labels) == 0
}
