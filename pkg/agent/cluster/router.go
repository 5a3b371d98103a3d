package agent

import (
	"context"
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
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/connectivity"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/snakepit/snakepit/pkg/discovery"
	"github.com/snakepit/snakepit/pkg/router"
	"github.com/snakepit/snakepit/pkg/worker"
	snakepitv1 "github.com/snakepit/snakepit/proto/snakepit/v1"
)

// Defaults of the cluster router (config section router.*).
const (
	// DefaultDedupWindow is how long a caller-supplied request id is
	// remembered by the node that executed it.
	DefaultDedupWindow = 5 * time.Minute
	// DefaultDedupMaxEntries bounds the request ids remembered.
	DefaultDedupMaxEntries = 100000
	// DefaultBreakGlassLease is how long a strict_queue session waits for
	// its unhealthy owner before the next-ranked node takes it over.
	DefaultBreakGlassLease = 30 * time.Second
	// DefaultRetryBudgetRatio and DefaultRetryBudgetMin bound retries to
	// other nodes: allowed while retries over the last 10s are below this
	// fraction of requests, or below the minimum.
	DefaultRetryBudgetRatio = 0.1
	DefaultRetryBudgetMin   = 10
	// DefaultLoadRefreshInterval is how often a peer that sent no answer
	// recently is asked for its health and load; it also bounds each
	// liveness probe of a peer that let a call time out.
	DefaultLoadRefreshInterval = time.Second
	// DefaultBreakerFailures consecutive failures to a peer (lost
	// connections, failed health checks or liveness probes) eject it from
	// this node's choices for DefaultBreakerBackoff; then one probe decides
	// whether it is readmitted.
	DefaultBreakerFailures = 3
	DefaultBreakerBackoff  = 5 * time.Second
	// DefaultMaxCandidates is how many nodes one call may be tried on.
	DefaultMaxCandidates = router.DefaultMax
)

// RouterConfig configures the cluster router (config section router).
type RouterConfig struct {
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

// DefaultRouterConfig returns the router's defaults.
func DefaultRouterConfig() RouterConfig {
	return RouterConfig{
		DedupWindow:         DefaultDedupWindow,
		DedupMaxEntries:     DefaultDedupMaxEntries,
		BreakGlassLease:     DefaultBreakGlassLease,
		RetryBudgetRatio:    DefaultRetryBudgetRatio,
		RetryBudgetMin:      DefaultRetryBudgetMin,
		LoadRefreshInterval: DefaultLoadRefreshInterval,
		BreakerFailures:     DefaultBreakerFailures,
		BreakerBackoff:      DefaultBreakerBackoff,
		MaxCandidates:       DefaultMaxCandidates,
	}
}

func (c RouterConfig) withDefaults() RouterConfig {
	d := DefaultRouterConfig()
	if c.DedupWindow == 0 {
		c.DedupWindow = d.DedupWindow
	}
	if c.DedupMaxEntries == 0 {
		c.DedupMaxEntries = d.DedupMaxEntries
	}
	if c.BreakGlassLease == 0 {
		c.BreakGlassLease = d.BreakGlassLease
	}
	if c.RetryBudgetRatio == 0 {
		c.RetryBudgetRatio = d.RetryBudgetRatio
	}
	if c.RetryBudgetMin == 0 {
		c.RetryBudgetMin = d.RetryBudgetMin
	}
	if c.LoadRefreshInterval == 0 {
		c.LoadRefreshInterval = d.LoadRefreshInterval
	}
	if c.BreakerFailures == 0 {
		c.BreakerFailures = d.BreakerFailures
	}
	if c.BreakerBackoff == 0 {
		c.BreakerBackoff = d.BreakerBackoff
	}
	if c.MaxCandidates == 0 {
		c.MaxCandidates = d.MaxCandidates
	}
	return c
}

func (c RouterConfig) validate(bad func(string, ...any)) {
	for _, d := range []struct {
		key string
		v   time.Duration
	}{{"dedup_window", c.DedupWindow}, {"break_glass_lease", c.BreakGlassLease},
		{"load_refresh_interval", c.LoadRefreshInterval}, {"breaker_backoff", c.BreakerBackoff}} {
		if d.v < 0 {
			bad("router.%s must not be negative (got %s)", d.key, d.v)
		}
	}
	if c.DedupMaxEntries < 0 || c.RetryBudgetMin < 0 || c.BreakerFailures < 0 {
		bad("router.dedup_max_entries, retry_budget_min and breaker_failures must not be negative (got %d, %d, %d)",
			c.DedupMaxEntries, c.RetryBudgetMin, c.BreakerFailures)
	}
	if c.RetryBudgetRatio < 0 || c.RetryBudgetRatio > 1 || math.IsNaN(c.RetryBudgetRatio) {
		bad("router.retry_budget_ratio must be between 0 and 1 (got %g)", c.RetryBudgetRatio)
	}
	if c.MaxCandidates < 0 || c.MaxCandidates > 16 {
		bad("router.max_candidates must be between 1 and 16 (got %d)", c.MaxCandidates)
	}
}

// Errors of the cluster router.
type (
	// MayHaveExecutedError: the call was sent to Node and the connection
	// failed before its answer came; it may have run there. It is not
	// retried elsewhere because it was not marked idempotent.
	MayHaveExecutedError struct {
		Node      string
		RequestID string
		Err       error
	}
	// OwnerUnavailableError: a strict-affinity session's owner cannot take
	// the call (strict_fail_fast: now; strict_queue: within the deadline,
	// before the break-glass lease ran out).
	OwnerUnavailableError struct {
		Pool      string
		SessionID string
		Owner     string
		Mode      Affinity
		Reason    string
	}
	// PeerUnavailableError: the call could not be delivered to Node (not
	// executed).
	PeerUnavailableError struct {
		Node string
		Err  error
	}
	// remoteError is a peer's own answer to a forwarded call, passed on to
	// the caller unchanged.
	remoteError struct {
		node string
		st   *status.Status
	}
)

func (e *MayHaveExecutedError) Error() string {
	return fmt.Sprintf("call may have executed on node %s: the connection failed after the call was sent, and the call is not marked idempotent, so it was not retried: %v", e.Node, e.Err)
}

func (e *MayHaveExecutedError) Unwrap() error { return e.Err }

func (e *OwnerUnavailableError) Error() string {
	return fmt.Sprintf("session %q of pool %q: its owner %s is unavailable (%s) and affinity is %s", e.SessionID, e.Pool, e.Owner, e.Reason, e.Mode)
}

func (e *PeerUnavailableError) Error() string {
	return fmt.Sprintf("node %s could not take the call (not executed): %v", e.Node, e.Err)
}

func (e *PeerUnavailableError) Unwrap() error { return e.Err }

func (e *remoteError) Error() string { return e.st.Message() }

// GRPCStatus lets status.FromError see the peer's status.
func (e *remoteError) GRPCStatus() *status.Status { return e.st }

// PeerSource gives the cluster's peers: discovery.Directory has it.
type PeerSource interface {
	Current() *discovery.Snapshot
}

// forwarder is the node's cluster router: for each call it ranks the
// nodes with pkg/router and runs the call on the first that takes it,
// locally or forwarded in one hop (docs/forwarding.md).
type forwarder struct {
	n      *Node
	cfg    RouterConfig
	log    zerolog.Logger
	creds  grpc.DialOption
	budget *retryBudget

	state atomic.Pointer[routeState]

	mu     sync.Mutex // guards peers and table rebuilds
	peers  map[string]*peerConn
	info   map[string]discovery.Peer // last listing of each peer
	self   *discovery.Peer           // the local node as published
	lastSt string                    // fingerprint of the local peer state
	snap   *discovery.Snapshot
	rebuld chan struct{}
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

// tableFor returns the table that ranks req.
func (st *routeState) tableFor(req *Request) *router.Table {
	if req.SessionID != "" {
		return st.sessions
	}
	return st.table
}

// run is Run for Serve, which logs its error (a TLS file that cannot be
// read: the node then serves locally only).
func (f *forwarder) run(ctx context.Context, src PeerSource) {
	if err := f.Run(ctx, src); err != nil {
		f.log.Error().Err(err).Msg("cluster router not started; calls run on this node only")
	}
}

// newForwarder builds the cluster router of n. creds are the transport
// credentials to dial peers with (nil: plaintext). No I/O.
func newForwarder(n *Node, creds grpc.DialOption) *forwarder {
	if creds == nil {
		creds = grpc.WithTransportCredentials(insecure.NewCredentials())
	}
	cfg := n.cfg.Router
	return &forwarder{
		n: n, cfg: cfg, creds: creds,
		log:    n.baseLog.With().Str("component", "router").Logger(),
		budget: newRetryBudget(cfg.RetryBudgetRatio, cfg.RetryBudgetMin),
		peers:  make(map[string]*peerConn),
		info:   make(map[string]discovery.Peer),
		rebuld: make(chan struct{}, 1),
	}
}

// Run follows src's snapshots, keeps one connection per peer, refreshes
// idle peers' load every load_refresh_interval, and rebuilds the routing
// table on every change, until ctx is done; then it closes the peer
// connections and returns nil. Calls are routed only while Run runs (and
// run locally before its first snapshot).
func (f *forwarder) Run(ctx context.Context, src PeerSource) error {
	creds, err := f.n.PeerCredentials()
	if err != nil {
		return err
	}
	if creds != nil {
		f.creds = grpc.WithTransportCredentials(creds)
	}
	defer f.closeAll()
	tick := time.NewTicker(f.cfg.LoadRefreshInterval)
	defer tick.Stop()
	for {
		snap := src.Current()
		f.sync(snap, time.Now())
		select {
		case <-ctx.Done():
			return nil
		case <-snap.Changed():
		case <-f.rebuld:
		case <-tick.C:
			f.refreshIdle(ctx)
		}
	}
}

func (f *forwarder) closeAll() {
	if old := f.state.Swap(nil); old != nil {
		close(old.changed)
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	for id, p := range f.peers {
		p.close()
		delete(f.peers, id)
	}
}

// breakerChanged counts an ejection and asks Run to rebuild the table.
func (f *forwarder) breakerChanged(id string, to gobreaker.State) {
	if to == gobreaker.StateOpen {
		f.n.metrics.ejections.WithLabelValues(id).Inc()
		f.log.Warn().Str("node_id", id).Dur("backoff", f.cfg.BreakerBackoff).Msg("peer ejected: calls to it failed or it stopped answering")
	} else if to == gobreaker.StateClosed {
		f.log.Info().Str("node_id", id).Msg("peer readmitted")
	}
	f.kick()
}

// kick asks Run to rebuild the table.
func (f *forwarder) kick() {
	select {
	case f.rebuld <- struct{}{}:
	default:
	}
}

// sync applies a snapshot: new peers are dialled, departed ones kept (as
// unhealthy, for strict sessions' break-glass lease) and then closed, and
// the table rebuilt when anything routing depends on changed.
func (f *forwarder) sync(snap *discovery.Snapshot, now time.Time) {
	f.mu.Lock()
	defer f.mu.Unlock()
	local := f.n.cfg.NodeID
	changed := snap != f.snap
	f.snap = snap
	if changed {
		listed := map[string]bool{}
		f.self = nil
		for _, dp := range snap.Peers() {
			id := string(dp.ID)
			if id == local {
				f.self = &dp
				continue
			}
			listed[id] = dp.Healthy
			pc := f.peers[id]
			if pc != nil && pc.addr != dp.Addr {
				pc.close()
				pc = nil
			}
			if pc == nil {
				var err error
				if pc, err = dialPeer(id, dp.Addr, f.cfg, f.creds, f.breakerChanged); err != nil {
					f.log.Warn().Err(err).Str("node_id", id).Str("addr", dp.Addr).Msg("cannot dial peer")
					continue
				}
				f.peers[id] = pc
			}
			f.info[id] = dp
		}
		for id, pc := range f.peers {
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
	for id, pc := range f.peers {
		pc.mu.Lock()
		gone := !pc.goneAt.IsZero() && now.Sub(pc.goneAt) > f.cfg.BreakGlassLease
		pc.mu.Unlock()
		if gone {
			pc.close()
			delete(f.peers, id)
			delete(f.info, id)
			changed = true
		}
	}
	self := f.localPeer()
	fp := fmt.Sprint(self.Healthy, self.Cordoned, self.Draining, self.Pools)
	for _, pc := range f.peers {
		pc.down(now) // starts (or stops) the peer's down clock
		// The breaker's state too: a change wakes strict_queue waiters.
		fp += fmt.Sprint(pc.id, pc.usable(), pc.br.State())
	}
	if !changed && fp == f.lastSt && f.state.Load() != nil {
		return
	}
	f.lastSt = fp
	peers := []router.Peer{self}
	conns := []*peerConn{nil}
	for id, pc := range f.peers {
		dp := f.info[id]
		rp := routerPeer(dp)
		pc.mu.Lock()
		rp.Healthy = pc.listed
		pc.mu.Unlock()
		peers = append(peers, rp)
		conns = append(conns, pc)
	}
	t, err := router.NewTable(peers, router.NodeID(local))
	if err != nil {
		f.log.Error().Err(err).Msg("cannot build the routing table; keeping the previous one")
		return
	}
	for i := range peers {
		peers[i].Cordoned = false // Draining still takes a node out
	}
	ts, err := router.NewTable(peers, router.NodeID(local))
	if err != nil {
		f.log.Error().Err(err).Msg("cannot build the session routing table; keeping the previous one")
		return
	}
	// Both tables index peers in order of ID: one conns slice serves both.
	byIndex := make([]*peerConn, t.Len())
	for i, p := range peers {
		j, _ := t.Index(p.ID)
		byIndex[j] = conns[i]
	}
	old := f.state.Swap(&routeState{table: t, sessions: ts, conns: byIndex, changed: make(chan struct{})})
	if old != nil {
		close(old.changed)
	}
}

// localPeer describes this node to its own router: as published when
// discovery lists it (so every router of the cluster weighs it the same),
// with its live health, cordon and drain state.
func (f *forwarder) localPeer() router.Peer {
	var rp router.Peer
	if f.self != nil {
		rp = routerPeer(*f.self)
	} else {
		rp.Pools = make(map[string]int, len(f.n.order))
		for _, name := range f.n.order {
			p := f.n.pools[name]
			p.mu.Lock()
			rp.Pools[name] = len(p.slots) * p.cfg.Capacity
			p.mu.Unlock()
		}
	}
	rp.ID = router.NodeID(f.n.cfg.NodeID)
	rp.Healthy = f.n.Healthy()
	in := f.n.intent.get()
	rp.Cordoned, rp.Draining = in.Cordoned, in.Draining
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
func (f *forwarder) refreshIdle(ctx context.Context) {
	f.mu.Lock()
	var idle []*peerConn
	cut := time.Now().Add(-f.cfg.LoadRefreshInterval).UnixNano()
	for _, pc := range f.peers {
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
	f.mu.Unlock()
	var wg sync.WaitGroup
	for _, pc := range idle {
		wg.Go(func() { pc.check(ctx, f.cfg.LoadRefreshInterval) })
	}
	wg.Wait()
}

type localOnlyKey struct{}

// routed reports whether the call reached this node through a router: this
// node's (it chose this node) or an entry node's (forwarded).
func routed(ctx context.Context) bool {
	return ctx.Value(localOnlyKey{}) != nil || forwardedBy(ctx) != ""
}

// forwardedBy returns the entry node of a forwarded call, "" otherwise.
func forwardedBy(ctx context.Context) string {
	if v := metadata.ValueFromIncomingContext(ctx, ForwardedHeader); len(v) > 0 {
		return v[0]
	}
	return ""
}

// outcome classifies one attempt.
type outcome int

const (
	done       outcome = iota // an answer (result or the executing node's error): final
	notStarted                // provably not executed: try the next candidate
	unknown                   // may have executed: retry only if idempotent
)

// route runs req where it belongs. handled is false when the call should
// simply run here: it was forwarded to this node (one hop at most), the
// router has no table yet, or this node is alone and the call has no
// placement constraints.
func (f *forwarder) route(ctx context.Context, req *Request, emit func([]byte) error) (res *Result, err error, handled bool) {
	if ctx.Value(localOnlyKey{}) != nil || forwardedBy(ctx) != "" {
		return nil, nil, false
	}
	st := f.state.Load()
	if st == nil {
		return nil, nil, false
	}
	if st.table.Len() == 1 && noConstraints(req.Need) {
		return nil, nil, false
	}
	pool := req.Pool
	if pool == "" {
		pool = f.n.order[0]
	}
	if req.CorrelationID == "" {
		req.CorrelationID = f.n.reqBase + strconv.FormatUint(f.n.reqSeq.Add(1), 10)
	}
	if _, ok := ctx.Deadline(); !ok {
		timeout := DefaultCallTimeout
		if p, ok := f.n.pools[pool]; ok {
			timeout = p.cfg.CallTimeout
		}
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, timeout)
		defer cancel()
	}
	rq := router.Request{SessionID: req.SessionID, Pool: pool, Need: req.Need, Max: f.cfg.MaxCandidates, Rand: rand.Uint64()}
	if rq.SessionID == "" && req.RequestID != "" {
		// A caller-supplied request id is placed like a session, so a retry
		// through any node reaches the node that deduplicates it.
		rq.SessionID = "request:" + req.RequestID
	}
	if req.SessionID != "" && req.Affinity != AffinityHint {
		res, err := f.strict(ctx, st, req, rq)
		return res, err, true
	}
	for i := 0; i < st.table.Len(); i++ {
		if pc := st.conns[i]; pc != nil && !pc.usable() {
			rq.Exclude = append(rq.Exclude, router.NodeID(pc.id))
		}
	}
	var buf [16]router.Candidate
	cands, err := st.tableFor(req).Rank(rq, poolLoads{st: st, n: f.n, pool: pool}, buf[:0])
	if err != nil {
		return nil, err, true
	}
	now := time.Now()
	f.budget.request(now)
	var last error
	for i, c := range cands {
		// Moving past a cordoned node's refusal is placement, not a retry:
		// it costs the retry budget nothing.
		if i > 0 && !isReasonErr(last, ReasonCordoned) && !f.budget.allowRetry(now) {
			f.log.Debug().Str("request_id", req.RequestID).Msg("retry budget spent")
			break
		}
		if i > 0 {
			f.n.metrics.retries.WithLabelValues(retryReason(last)).Inc()
		}
		res, err, oc := f.attempt(ctx, st, c, req, emit)
		switch oc {
		case done:
			return res, err, true
		case unknown:
			if !req.Idempotent || emit != nil {
				return nil, &MayHaveExecutedError{Node: string(c.ID), RequestID: req.RequestID, Err: err}, true
			}
			err = &fateUnknownError{err}
		}
		last = err
		if ctx.Err() != nil {
			break
		}
	}
	return nil, last, true
}

// strict routes a session call in strict_queue or strict_fail_fast mode:
// only the owner, ranked with unhealthy peers included so a down owner
// stays the owner; strict_fail_fast fails at once when it is down,
// strict_queue waits for it (woken by every routing change), and once it
// has been down past the break-glass lease hands the session to the
// next-ranked node. A cordoned owner that does not hold the session
// refuses it (not executed): the session is new, and is placed on the
// next-ranked node.
func (f *forwarder) strict(ctx context.Context, st *routeState, req *Request, rq router.Request) (*Result, error) {
	rq.IncludeUnhealthy, rq.Max = true, 1
	var buf [1]router.Candidate
	for {
		cands, err := st.sessions.Rank(rq, nil, buf[:0])
		if err != nil {
			return nil, err
		}
		c := cands[0]
		now := time.Now()
		isDown, since := false, time.Time{}
		reason := "unhealthy"
		if pc := st.conns[c.Index]; pc != nil {
			isDown, since = pc.down(now)
			if !pc.usable() {
				reason = "unreachable or ejected"
			}
		} else {
			isDown = !c.Healthy
		}
		ownerErr := &OwnerUnavailableError{Pool: rq.Pool, SessionID: req.SessionID, Owner: string(c.ID), Mode: req.Affinity, Reason: reason}
		if req.Affinity == AffinityStrictQueue && !since.IsZero() && now.Sub(since) >= f.cfg.BreakGlassLease {
			// Break glass: the owner has been down (failing every probe)
			// for the lease; the next-ranked node takes the session over.
			f.log.Warn().Str("session_id", req.SessionID).Str("owner", string(c.ID)).Dur("down_for", now.Sub(since)).
				Msg("strict session owner down past the break-glass lease; moving the session")
			rq.Exclude = append(rq.Exclude, c.ID)
			rq.IncludeUnhealthy = false
			continue
		}
		if !isDown {
			res, err, oc := f.attempt(ctx, st, c, req, nil)
			switch {
			case oc == unknown:
				return nil, &MayHaveExecutedError{Node: string(c.ID), RequestID: req.RequestID, Err: err}
			case oc == notStarted && isReasonErr(err, ReasonCordoned):
				// A new session of a cordoned owner: place it on the next.
				rq.Exclude = append(rq.Exclude, c.ID)
				continue
			case oc == notStarted && isPeerUnavailable(err):
				// The owner's breaker is deciding (a probe is out) or its
				// connection just failed: the owner is down for now.
				ownerErr.Reason = err.Error()
			default:
				return res, err
			}
		}
		if req.Affinity == AffinityStrictFailFast {
			return nil, ownerErr
		}
		// Wait for the owner (or the lease), within the deadline: any
		// routing change (breaker, connection, discovery) wakes us.
		var lease *time.Timer
		var leaseC <-chan time.Time
		if !since.IsZero() {
			lease = time.NewTimer(since.Add(f.cfg.BreakGlassLease).Sub(now))
			leaseC = lease.C
		}
		select {
		case <-ctx.Done():
			ownerErr.Reason += fmt.Sprintf("; waited until the deadline (break_glass_lease %s)", f.cfg.BreakGlassLease)
		case <-st.changed:
		case <-leaseC:
		}
		if lease != nil {
			lease.Stop()
		}
		if ctx.Err() != nil {
			return nil, ownerErr
		}
		cur := f.state.Load()
		if cur == nil {
			ownerErr.Reason += "; this node's router stopped"
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
	case isReasonErr(err, ReasonCordoned):
		return "peer_cordoned"
	default:
		return "peer_refused"
	}
}

// isPeerUnavailable: the call was not delivered to a peer (its breaker or
// connection refused it).
func isPeerUnavailable(err error) bool {
	var pue *PeerUnavailableError
	return errors.As(err, &pue)
}

// isReasonErr reports whether err is a snakepit node's answer (this node's
// or a peer's) with the given reason.
func isReasonErr(err error, reason string) bool {
	if err == nil {
		return false
	}
	if s, ok := status.FromError(err); ok && s.Code() != codes.OK && nodeReason(s) != "" {
		return nodeReason(s) == reason
	}
	return reason == ReasonCordoned && errors.Is(err, ErrCordoned)
}

// poolLoads gives Rank the loads of one pool: the local node's measured
// now, the peers' as last reported.
type poolLoads struct {
	st   *routeState
	n    *Node
	pool string
}

var nan = math.NaN()

func (l poolLoads) Load(i int) float64 {
	if pc := l.st.conns[i]; pc != nil {
		return pc.load(l.pool)
	}
	if p, ok := l.n.pools[l.pool]; ok {
		return p.load()
	}
	return nan
}

// attempt runs the call on one candidate and says what its outcome means.
func (f *forwarder) attempt(ctx context.Context, st *routeState, c router.Candidate, req *Request, emit func([]byte) error) (*Result, error, outcome) {
	pc := st.conns[c.Index]
	if pc == nil {
		res, err := f.n.execute(context.WithValue(ctx, localOnlyKey{}, true), req, emit)
		if notExecuted(err) {
			return nil, err, notStarted
		}
		return res, err, done
	}
	res, err, oc := f.forward(ctx, pc, req, emit)
	f.n.metrics.forwards.WithLabelValues(pc.id, forwardOutcome(err, oc)).Inc()
	return res, err, oc
}

// forwardOutcome labels snakepit_forwards_total.
func forwardOutcome(err error, oc outcome) string {
	if err == nil {
		return "ok"
	}
	var re *remoteError
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
func (f *forwarder) forward(ctx context.Context, pc *peerConn, req *Request, emit func([]byte) error) (*Result, error, outcome) {
	finish, err := pc.br.Allow()
	if err != nil {
		return nil, &PeerUnavailableError{Node: pc.id, Err: err}, notStarted
	}
	octx := metadata.AppendToOutgoingContext(ctx, ForwardedHeader, f.n.cfg.NodeID, CorrelationHeader, req.CorrelationID)
	sent := &sentFlag{}
	octx = withSentFlag(octx, sent)
	in := requestToProto(req)
	var (
		res    *Result
		tr     metadata.MD
		chunks bool
	)
	if emit == nil {
		var out *snakepitv1.ExecuteResponse
		out, err = pc.client.Execute(octx, in, grpc.Trailer(&tr))
		if err == nil {
			res = resultFromProto(out)
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
	if chunks {
		finish(nil)
		if s, ok := status.FromError(err); ok && isNodeAnswer(s) {
			return nil, &remoteError{node: pc.id, st: s}, done
		}
		return nil, err, unknown
	}
	s, _ := status.FromError(err)
	if isNodeAnswer(s) {
		finish(nil) // the peer answered: it is alive
		if peerRefused(s) {
			return nil, &remoteError{node: pc.id, st: s}, notStarted
		}
		return nil, &remoteError{node: pc.id, st: s}, done
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
		return nil, &PeerUnavailableError{Node: pc.id, Err: err}, notStarted
	}
	return nil, err, unknown
}

// isNodeAnswer: the status was built by a snakepit node's handler (it
// carries our ErrorInfo), not by the transport.
func isNodeAnswer(s *status.Status) bool {
	return nodeReason(s) != ""
}

func nodeReason(s *status.Status) string {
	if s == nil {
		return ""
	}
	for _, d := range s.Details() {
		if ei, ok := d.(*errdetails.ErrorInfo); ok && ei.GetDomain() == ErrorDomain {
			return ei.GetReason()
		}
	}
	return ""
}

// peerRefused: the peer's answer says it did not execute the call and
// another node may.
func peerRefused(s *status.Status) bool {
	switch nodeReason(s) {
	case ReasonQueueFull, ReasonQueueTimeout, ReasonSessionBusy, ReasonDraining, ReasonCordoned, ReasonShuttingDown,
		ReasonPoolUnavailable, ReasonUnknownPool, ReasonSessionLimit:
		return true
	case ReasonDeadline:
		for _, d := range s.Details() {
			if ei, ok := d.(*errdetails.ErrorInfo); ok && ei.GetMetadata()["stage"] == StageQueued {
				return false // the deadline is gone: no time to try elsewhere
			}
		}
	}
	return false
}

func forwardStream(ctx context.Context, c snakepitv1.SnakepitClient, in *snakepitv1.ExecuteRequest, emit func([]byte) error, tr *metadata.MD) (*Result, bool, error) {
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
			return resultFromProto(v.Done), chunks, nil
		}
	}
}

func requestToProto(req *Request) *snakepitv1.ExecuteRequest {
	out := &snakepitv1.ExecuteRequest{
		Tool: req.Tool, Pool: req.Pool, Args: req.Args, SessionId: req.SessionID,
		RequestId: req.RequestID, Idempotent: req.Idempotent,
	}
	switch req.Affinity {
	case AffinityStrictQueue:
		out.Affinity = snakepitv1.Affinity_AFFINITY_STRICT_QUEUE
	case AffinityStrictFailFast:
		out.Affinity = snakepitv1.Affinity_AFFINITY_STRICT_FAIL_FAST
	default:
		out.Affinity = snakepitv1.Affinity_AFFINITY_HINT
	}
	return out
}

func resultFromProto(r *snakepitv1.ExecuteResponse) *Result {
	res := &Result{
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
		res.Session = SessionNew
	case snakepitv1.SessionOutcome_SESSION_OUTCOME_BOUND:
		res.Session = SessionBound
	case snakepitv1.SessionOutcome_SESSION_OUTCOME_UNAVAILABLE:
		res.Session = SessionUnavailable
	case snakepitv1.SessionOutcome_SESSION_OUTCOME_RESET:
		res.Session = SessionReset
	}
	return res
}

// constraintsFromProto converts a request's placement constraints.
func constraintsFromProto(c *snakepitv1.Constraints) router.Constraints {
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

// peerIDs lists the peers the router knows, for diagnostics and tests.
func (f *forwarder) peerIDs() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	ids := make([]string, 0, len(f.peers))
	for id := range f.peers {
		ids = append(ids, id)
	}
	slices.Sort(ids)
	return ids
}

func noConstraints(c router.Constraints) bool {
	return !c.GPU && c.MinGPUMemoryMiB <= 0 && c.GPUModel == "" && len(c.Labels) == 0
}
