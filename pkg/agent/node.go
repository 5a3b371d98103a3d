// Package agent is the node: it runs the pools of Python workers of one host,
// admits and queues calls, serves the gRPC API, and shuts down in order.
// cmd/snakepitd only turns configuration into a Config and calls Serve.
package agent

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/rs/zerolog"

	"github.com/snakepit/snakepit/pkg/pyruntime"
	"github.com/snakepit/snakepit/pkg/router"
	"github.com/snakepit/snakepit/pkg/worker"
)

// Version is the daemon's version, stamped at build time.
var Version = "dev"

// Request is one call of a tool, as the node sees it.
type Request struct {
	Tool string
	// Pool is empty for the default pool.
	Pool string
	// Args is a JSON object, passed to Python untouched; empty means {}.
	Args          []byte
	SessionID     string
	RequestID     string
	CorrelationID string
	Idempotent    bool
	// Affinity applies to calls with a SessionID.
	Affinity Affinity
	// Client identifies the caller (its address) for per-client limits.
	Client string
	// Need are the call's placement constraints (the cluster router's).
	Need router.Constraints
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

// Node runs the pools of one host. Create it with New, start it with Run.
type Node struct {
	cfg      Config
	log      zerolog.Logger // component=agent
	baseLog  zerolog.Logger // as given to New: parent of the other components' loggers
	pools    map[string]*Pool
	order    []string
	started  time.Time
	gens     *generations
	reqSeq   atomic.Uint64
	reqBase  string
	startSem semaphore
	stopping atomic.Bool
	ready    chan struct{}
	runID    string
	procs    *procRecord
	sessions atomic.Int64 // sessions of all pools
	metrics  *metrics
	// gpuBook records the GPUs held by exclusive GPU pools' slots; nil on
	// a host without GPUs (set by applyGPUs, before Run).
	gpuBook  *gpuBook
	intent   *intentStore
	sessRate *clientLimiter
	drainMu  sync.Mutex
	drain    *drainRun
	runDone  chan struct{} // closed when Run returns
	// NextOwner, when set (by cluster routing, before Run), names the node
	// that would own a session of a pool if this one left; Drain's dry run
	// reports it.
	NextOwner func(pool, sessionID string) string
	// PeerAddrs, when set (by cluster discovery, before Run), returns the
	// cluster's nodes as this node sees them: node id -> gRPC address.
	PeerAddrs func() map[string]string
	// addr is the gRPC address the node serves on, once bound.
	addr     atomic.Value
	healthCh chan struct{}
	// cluster routes calls to other nodes (forward.go); dedup remembers
	// caller-supplied request ids (dedup.go).
	cluster *forwarder
	dedup   *dedup
}

// New checks cfg and builds a node. It does no I/O and starts nothing.
func New(cfg Config, log zerolog.Logger) (*Node, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	cfg = cfg.withDefaults()
	n := &Node{
		cfg:      cfg,
		log:      log.With().Str("component", "agent").Logger(),
		baseLog:  log,
		pools:    make(map[string]*Pool, len(cfg.Pools)),
		startSem: newSemaphore(cfg.StartConcurrency),
		ready:    make(chan struct{}),
		healthCh: make(chan struct{}, 1),
		runDone:  make(chan struct{}),
	}
	var b [6]byte
	_, _ = rand.Read(b[:])
	n.reqBase = hex.EncodeToString(b[:]) + "-"
	var r [8]byte
	_, _ = rand.Read(r[:])
	n.runID = hex.EncodeToString(r[:])
	for _, pc := range cfg.Pools {
		n.pools[pc.Name] = newPool(n, pc)
		n.order = append(n.order, pc.Name)
	}
	n.metrics = newMetrics(n)
	n.intent = newIntentStore(cfg.StateDir)
	n.sessRate = newClientLimiter(cfg.NewSessionsPerSecond, cfg.NewSessionsBurst)
	n.dedup = newDedup(cfg.Router.DedupWindow, cfg.Router.DedupMaxEntries)
	n.cluster = newForwarder(n, nil)
	n.NextOwner = n.cluster.nextOwner
	n.PeerAddrs = n.cluster.peerAddrs
	return n, nil
}

// Config returns the node's configuration with defaults applied.
func (n *Node) Config() Config { return n.cfg }

// ID returns the node's id.
func (n *Node) ID() string { return n.cfg.NodeID }

// Ready is closed once every pool has all its workers ready.
func (n *Node) Ready() <-chan struct{} { return n.ready }

// Run starts the pools and supervises them until ctx is done; then it stops
// every worker (closing its sockets, then SIGTERM, then SIGKILL to its
// process group) and returns once all are gone. It returns an error at once
// when a pool fails to start (its adapter does not load); that error carries
// the Python traceback. Cancellation is not an error.
func (n *Node) Run(ctx context.Context) error {
	defer close(n.runDone)
	n.started = time.Now()
	if err := os.MkdirAll(n.cfg.StateDir, 0o755); err != nil {
		return fmt.Errorf("state_dir: %w", err)
	}
	gens, err := openGenerations(filepath.Join(n.cfg.StateDir, "generation"))
	if err != nil {
		return err
	}
	n.gens = gens
	recordPath := filepath.Join(n.cfg.StateDir, "workers.json")
	if killed, err := sweep(recordPath, n.log); err != nil {
		return err
	} else if killed > 0 {
		n.log.Warn().Int("killed", killed).Msg("swept processes left by the previous run")
	}
	n.procs = newProcRecord(recordPath, n.runID, n.log)
	if err := n.intent.load(); err != nil {
		return err
	}
	n.applyIntentSizes()
	if n.Cordoned() {
		n.log.Warn().Msg("starting cordoned (operator intent from the previous run); uncordon to take routed work")
	}
	rt, err := pyruntime.Install(filepath.Join(n.cfg.StateDir, "runtime"))
	if err != nil {
		return err
	}
	for _, name := range n.order {
		p := n.pools[name]
		p.env = p.environment(rt)
		if err := p.resolvePython(ctx); err != nil {
			return err
		}
	}
	poolCtx, stopPools := context.WithCancel(context.WithoutCancel(ctx))
	defer stopPools()
	var wg sync.WaitGroup
	for _, name := range n.order {
		p := n.pools[name]
		wg.Add(1)
		go func() {
			defer wg.Done()
			p.run(poolCtx)
		}()
	}
	startErr := make(chan error, 1)
	go func() {
		for _, name := range n.order {
			if err := n.pools[name].waitReady(poolCtx); err != nil {
				startErr <- err
				return
			}
		}
		close(n.ready)
		n.log.Info().Dur("took", time.Since(n.started)).Msg("node ready")
	}()
	select {
	case <-ctx.Done():
		err = nil
	case err = <-startErr:
	}
	n.stopping.Store(true)
	for _, p := range n.pools {
		p.setStopping()
	}
	stopPools()
	wg.Wait()
	return err
}

// generations hands out worker generations that are never reused, across
// restarts too: the state directory records a reservation, renewed a block
// at a time, and a restarted daemon starts above the last reservation.
type generations struct {
	mu       sync.Mutex
	path     string
	next     uint64
	reserved uint64 // generations below this may have been handed out
}

// generationBlock is how many generations one write to disk reserves.
const generationBlock = 1024

func openGenerations(path string) (*generations, error) {
	g := &generations{path: path, next: 1}
	if b, err := os.ReadFile(path); err == nil {
		v, perr := strconv.ParseUint(strings.TrimSpace(string(b)), 10, 64)
		if perr != nil {
			return nil, fmt.Errorf("state file %s is corrupt (%v): remove it to start generations afresh", path, perr)
		}
		g.next = v
	} else if !errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("read %s: %w", path, err)
	}
	g.reserved = g.next
	return g, nil
}

func (g *generations) take() (worker.Generation, error) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.next >= g.reserved {
		r := g.next + generationBlock
		if err := writeFile(g.path, []byte(strconv.FormatUint(r, 10)+"\n"), true); err != nil {
			return 0, fmt.Errorf("reserve worker generations: %w", err)
		}
		g.reserved = r
	}
	v := g.next
	g.next++
	return worker.Generation(v), nil
}

func (n *Node) nextGeneration() (worker.Generation, error) {
	return n.gens.take()
}

func (n *Node) pool(name string) (*Pool, error) {
	if name == "" {
		name = n.order[0]
	}
	p, ok := n.pools[name]
	if !ok {
		return nil, &UnknownPoolError{Pool: name, Known: slices.Clone(n.order)}
	}
	return p, nil
}

// Execute runs one call on this node. The call's deadline is ctx's, or the
// pool's call_timeout when ctx has none; time spent queued is subtracted
// before the worker gets the call. When ctx is cancelled (the client went
// away), the call is cancelled in Python.
func (n *Node) Execute(ctx context.Context, req *Request) (*Result, error) {
	return n.execute(ctx, req, nil)
}

// ExecuteStream runs a call of a streaming tool, handing each item it
// yields (as JSON) to emit, in order; the result carries the value the
// generator returned. emit blocking (a slow client) makes the generator
// wait: at most the pool's stream_window of items is buffered. An error
// from emit cancels the call.
func (n *Node) ExecuteStream(ctx context.Context, req *Request, emit func([]byte) error) (*Result, error) {
	return n.execute(ctx, req, emit)
}

func (n *Node) execute(ctx context.Context, req *Request, emit func([]byte) error) (*Result, error) {
	arrived := time.Now()
	if req.Tool == "" {
		return nil, &InvalidArgumentError{Field: "tool", Reason: "must name a tool (see ListTools)"}
	}
	if res, err, routed := n.cluster.route(ctx, req, emit); routed {
		return res, err
	}
	p, err := n.pool(req.Pool)
	if err != nil {
		return nil, err
	}
	if err := validateArgs(req.Args); err != nil {
		return nil, err
	}
	if n.stopping.Load() {
		return nil, ErrShuttingDown
	}
	if in := n.intent.get(); in.Draining && !n.acceptWhileDraining(p, req) {
		return nil, ErrDraining
	} else if in.Cordoned && !in.Draining && routed(ctx) && !n.acceptWhileCordoned(p, req) {
		return nil, ErrCordoned
	}
	callerID := req.RequestID != ""
	if req.RequestID == "" {
		req.RequestID = n.reqBase + strconv.FormatUint(n.reqSeq.Add(1), 10)
	}
	if req.CorrelationID == "" {
		req.CorrelationID = req.RequestID
	}
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, p.cfg.CallTimeout)
		defer cancel()
	}
	if len(req.SessionID) > maxIDLen || len(req.RequestID) > maxIDLen {
		return nil, &InvalidArgumentError{Field: "session_id/request_id", Reason: fmt.Sprintf("must be at most %d bytes", maxIDLen)}
	}
	var res *Result
	if callerID && emit == nil {
		res, err = n.dedup.do(ctx, req.RequestID, func() (*Result, error) { return p.execute(ctx, req, arrived, nil) })
	} else {
		res, err = p.execute(ctx, req, arrived, emit)
	}
	if res != nil {
		res.RequestID = req.RequestID
	}
	return res, err
}

// maxIDLen bounds session and request ids.
const maxIDLen = 1024

// CloseSession drops a session, and its state in Python. It reports false
// when the pool had no such session.
func (n *Node) CloseSession(pool, id string) (bool, error) {
	p, err := n.pool(pool)
	if err != nil {
		return false, err
	}
	if id == "" {
		return false, &InvalidArgumentError{Field: "session_id", Reason: "must not be empty"}
	}
	return p.closeSession(id), nil
}

// Sessions lists the sessions of one pool, or of all pools when pool is
// empty.
func (n *Node) Sessions(pool string) ([]SessionStatus, error) {
	if pool != "" {
		p, err := n.pool(pool)
		if err != nil {
			return nil, err
		}
		return p.sessionList(), nil
	}
	var out []SessionStatus
	for _, name := range n.order {
		out = append(out, n.pools[name].sessionList()...)
	}
	return out, nil
}

// validateArgs checks that args is a JSON object without decoding it.
func validateArgs(args []byte) error {
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

// Tools lists the tools of one pool, or of all pools when pool is empty.
func (n *Node) Tools(pool string) (map[string][]worker.Tool, error) {
	out := map[string][]worker.Tool{}
	if pool != "" {
		p, err := n.pool(pool)
		if err != nil {
			return nil, err
		}
		out[p.cfg.Name] = p.status().Tools
		return out, nil
	}
	for _, name := range n.order {
		out[name] = n.pools[name].status().Tools
	}
	return out, nil
}

// Status is a snapshot of the node.
type Status struct {
	NodeID  string
	Version string
	Started time.Time
	Pools   []PoolStatus
}

// Status returns a snapshot of the node and its pools.
func (n *Node) Status() Status {
	st := Status{NodeID: n.cfg.NodeID, Version: Version, Started: n.started}
	for _, name := range n.order {
		st.Pools = append(st.Pools, n.pools[name].status())
	}
	return st
}

// PoolNames returns the node's pools, the default one first.
func (n *Node) PoolNames() []string { return slices.Clone(n.order) }

// Healthy reports whether every pool can serve calls: each has a ready
// worker and none failed or is stopping.
func (n *Node) Healthy() bool {
	for _, p := range n.pools {
		p.mu.Lock()
		ok := len(p.ready) > 0 && (p.state == PoolReady || p.state == PoolDegraded)
		p.mu.Unlock()
		if !ok {
			return false
		}
	}
	return true
}

// semaphore bounds concurrent worker starts.
type semaphore chan struct{}

func newSemaphore(n int) semaphore { return make(semaphore, max(n, 1)) }

func (s semaphore) acquire(ctx context.Context) error {
	select {
	case s <- struct{}{}:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

func (s semaphore) release() { <-s }

// writeFile writes a file by renaming a temporary file over it; with sync,
// the data is on disk before the rename.
func writeFile(path string, data []byte, sync bool) error {
	f, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".tmp-")
	if err != nil {
		return err
	}
	defer os.Remove(f.Name())
	if _, err := f.Write(data); err != nil {
		f.Close()
		return err
	}
	if sync {
		if err := f.Sync(); err != nil {
			f.Close()
			return err
		}
	}
	if err := f.Close(); err != nil {
		return err
	}
	return os.Rename(f.Name(), path)
}

func killPID(pid int) error {
	err := syscall.Kill(pid, syscall.SIGKILL)
	if errors.Is(err, syscall.ESRCH) {
		return nil
	}
	return err
}

// healthChanged tells whoever watches the node's health to look again.
func (n *Node) healthChanged() {
	select {
	case n.healthCh <- struct{}{}:
	default:
	}
}

// HealthChanges delivers a value whenever the node's health may have
// changed; read Healthy then.
func (n *Node) HealthChanges() <-chan struct{} { return n.healthCh }

// advertised returns the address the node serves on ("" before it is
// bound).
func (n *Node) advertised() string {
	s, _ := n.addr.Load().(string)
	return s
}
