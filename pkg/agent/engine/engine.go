// Package engine is the node-local pool engine (the brief's PoolAgent): it
// supervises the pools of Python workers of one host and owns everything
// about them — the queue and admission, the choice of worker, sessions,
// resizing, the GPU book, operator intent (cordon, drain, pool sizes) and
// draining. It knows nothing of peers: the cluster layer decides where a
// call runs and calls Engine.Execute for the calls that run here.
//
// The engine's policies (worker choice, queueing, affinity) come from
// pkg/agent/policy, built per pool by the node.
package engine

import (
	"context"
	"crypto/rand"
	"encoding/hex"
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

	"github.com/snakepit/snakepit/pkg/agent/call"
	"github.com/snakepit/snakepit/pkg/agent/policy"
	"github.com/snakepit/snakepit/pkg/hw"
	"github.com/snakepit/snakepit/pkg/pyruntime"
	"github.com/snakepit/snakepit/pkg/worker"
)

// Config configures the engine. The node fills every field (its defaults
// live in pkg/agent); the engine applies none of its own.
type Config struct {
	// NodeID names the node in results.
	NodeID string
	// StateDir holds the runtime copy, generations, the worker record and
	// operator intent.
	StateDir string
	// MaxMessageBytes bounds a call's messages; a worker's frames and
	// results are sized from it.
	MaxMessageBytes int
	// StartConcurrency bounds how many workers start at once.
	StartConcurrency int
	// MonitorInterval is how often workers' age and memory are checked.
	MonitorInterval time.Duration
	// MaxSessions bounds the sessions of all pools together.
	MaxSessions int
	// NewSessionsPerSecond and NewSessionsBurst bound how fast one client
	// opens sessions; NewSessionsPerSecond <= 0 disables the bound.
	NewSessionsPerSecond float64
	NewSessionsBurst     int
	// StderrTail is how many stderr lines of a worker explain its crash.
	StderrTail int
	// DrainDeadline bounds a drain that names no deadline.
	DrainDeadline time.Duration
	// Pools are the pools; the first is the default pool.
	Pools []PoolConfig
}

// Observer is told of every finished call and worker-level retry (the
// node's metrics).
type Observer interface {
	Observe(pool string, res *call.Result, err error, took time.Duration)
	Retried(reason string)
}

// Deps are what the engine is given.
type Deps struct {
	Log zerolog.Logger
	// Policies are each pool's policies; a pool without a Set gets
	// policy.Default().
	Policies map[string]*policy.Set
	// Observer may be nil.
	Observer Observer
	// GPUs is the host's inventory (hw.Detect); pools' gpus keys are
	// planned against it.
	GPUs hw.Inventory
}

type nopObserver struct{}

func (nopObserver) Observe(string, *call.Result, error, time.Duration) {}
func (nopObserver) Retried(string)                                     {}

// Engine runs the pools of one host. Create it with New, start it with Run.
type Engine struct {
	cfg      Config
	log      zerolog.Logger // component=agent
	obs      Observer
	pools    map[string]*Pool
	order    []string
	started  time.Time
	gens     *generations
	startSem semaphore
	stopping atomic.Bool
	ready    chan struct{}
	runID    string
	procs    *procRecord
	sessions atomic.Int64 // sessions of all pools
	// gpuBook records the GPUs held by exclusive GPU pools' slots; nil on
	// a host without GPUs.
	gpuBook  *gpuBook
	intent   *intentStore
	sessRate *clientLimiter
	drainMu  sync.Mutex
	drain    *drainRun
	runDone  chan struct{} // closed when Run returns
	healthCh chan struct{}
}

// New builds an engine and plans its pools' GPUs against deps.GPUs. It
// does no I/O and starts nothing. cfg must be complete (see Config).
func New(cfg Config, deps Deps) (*Engine, error) {
	if len(cfg.Pools) == 0 {
		return nil, errors.New("engine: no pool configured")
	}
	e := &Engine{
		cfg:      cfg,
		log:      deps.Log.With().Str("component", "agent").Logger(),
		obs:      deps.Observer,
		pools:    make(map[string]*Pool, len(cfg.Pools)),
		startSem: newSemaphore(cfg.StartConcurrency),
		ready:    make(chan struct{}),
		healthCh: make(chan struct{}, 1),
		runDone:  make(chan struct{}),
	}
	if e.obs == nil {
		e.obs = nopObserver{}
	}
	var r [8]byte
	_, _ = rand.Read(r[:])
	e.runID = hex.EncodeToString(r[:])
	for _, pc := range cfg.Pools {
		set := deps.Policies[pc.Name]
		if set == nil {
			set = policy.Default()
		}
		e.pools[pc.Name] = newPool(e, pc, set)
		e.order = append(e.order, pc.Name)
	}
	e.intent = newIntentStore(cfg.StateDir)
	e.sessRate = newClientLimiter(cfg.NewSessionsPerSecond, cfg.NewSessionsBurst)
	if err := e.applyGPUs(deps.GPUs); err != nil {
		return nil, err
	}
	return e, nil
}

// Ready is closed once every pool has all its workers ready.
func (e *Engine) Ready() <-chan struct{} { return e.ready }

// Run starts the pools and supervises them until ctx is done; then it stops
// every worker (closing its sockets, then SIGTERM, then SIGKILL to its
// process group) and returns once all are gone. It returns an error at once
// when a pool fails to start (its adapter does not load); that error carries
// the Python traceback. Cancellation is not an error.
func (e *Engine) Run(ctx context.Context) error {
	defer close(e.runDone)
	e.started = time.Now()
	if err := os.MkdirAll(e.cfg.StateDir, 0o755); err != nil {
		return fmt.Errorf("state_dir: %w", err)
	}
	gens, err := openGenerations(filepath.Join(e.cfg.StateDir, "generation"))
	if err != nil {
		return err
	}
	e.gens = gens
	recordPath := filepath.Join(e.cfg.StateDir, "workers.json")
	if killed, err := sweep(recordPath, e.log); err != nil {
		return err
	} else if killed > 0 {
		e.log.Warn().Int("killed", killed).Msg("swept processes left by the previous run")
	}
	e.procs = newProcRecord(recordPath, e.runID, e.log)
	if err := e.intent.load(); err != nil {
		return err
	}
	e.applyIntentSizes()
	if e.Cordoned() {
		e.log.Warn().Msg("starting cordoned (operator intent from the previous run); uncordon to take routed work")
	}
	rt, err := pyruntime.Install(filepath.Join(e.cfg.StateDir, "runtime"))
	if err != nil {
		return err
	}
	for _, name := range e.order {
		p := e.pools[name]
		p.env = p.environment(rt)
		if err := p.resolvePython(ctx); err != nil {
			return err
		}
	}
	poolCtx, stopPools := context.WithCancel(context.WithoutCancel(ctx))
	defer stopPools()
	var wg sync.WaitGroup
	for _, name := range e.order {
		p := e.pools[name]
		wg.Go(func() { p.run(poolCtx) })
	}
	startErr := make(chan error, 1)
	go func() {
		for _, name := range e.order {
			if err := e.pools[name].waitReady(poolCtx); err != nil {
				startErr <- err
				return
			}
		}
		close(e.ready)
		e.log.Info().Dur("took", time.Since(e.started)).Msg("node ready")
	}()
	select {
	case <-ctx.Done():
		err = nil
	case err = <-startErr:
	}
	e.stopping.Store(true)
	for _, p := range e.pools {
		p.setStopping()
	}
	stopPools()
	wg.Wait()
	return err
}

// Started is when Run began.
func (e *Engine) Started() time.Time { return e.started }

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

func (e *Engine) pool(name string) (*Pool, error) {
	if name == "" {
		name = e.order[0]
	}
	p, ok := e.pools[name]
	if !ok {
		return nil, &call.UnknownPoolError{Pool: name, Known: slices.Clone(e.order)}
	}
	return p, nil
}

// Execute runs one call on this node: admission (the node stopping,
// draining or cordoned), then the pool's queue and worker. The call's
// deadline is ctx's, or the pool's call_timeout when ctx has none; time
// spent queued is subtracted before the worker gets the call. When ctx is
// cancelled (the client went away), the call is cancelled in Python. With
// emit set the call is a stream: each item the tool yields goes to emit,
// in order; emit blocking (a slow client) makes the generator wait, at
// most the pool's stream_window of items buffered, and an error from emit
// cancels the call. req must have passed call.Request.Check and carry a
// RequestID.
func (e *Engine) Execute(ctx context.Context, req *call.Request, emit func([]byte) error) (*call.Result, error) {
	arrived := time.Now()
	p, err := e.pool(req.Pool)
	if err != nil {
		return nil, err
	}
	if e.stopping.Load() {
		return nil, call.ErrShuttingDown
	}
	if in := e.intent.get(); in.Draining && !p.acceptWhileDraining(req) {
		return nil, call.ErrDraining
	} else if in.Cordoned && !in.Draining && req.Routed && !p.holds(req.SessionID) {
		return nil, call.ErrCordoned
	}
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, p.cfg.CallTimeout)
		defer cancel()
	}
	res, err := p.execute(ctx, req, arrived, emit)
	if res != nil {
		res.RequestID = req.RequestID
	}
	return res, err
}

// CloseSession drops a session, and its state in Python. It reports false
// when the pool had no such session.
func (e *Engine) CloseSession(pool, id string) (bool, error) {
	p, err := e.pool(pool)
	if err != nil {
		return false, err
	}
	if id == "" {
		return false, &call.InvalidArgumentError{Field: "session_id", Reason: "must not be empty"}
	}
	return p.closeSession(id), nil
}

// Sessions lists the sessions of one pool, or of all pools when pool is
// empty.
func (e *Engine) Sessions(pool string) ([]SessionStatus, error) {
	if pool != "" {
		p, err := e.pool(pool)
		if err != nil {
			return nil, err
		}
		return p.sessionList(), nil
	}
	var out []SessionStatus
	for _, name := range e.order {
		out = append(out, e.pools[name].sessionList()...)
	}
	return out, nil
}

// Tools lists the tools of one pool, or of all pools when pool is empty.
func (e *Engine) Tools(pool string) (map[string][]worker.Tool, error) {
	out := map[string][]worker.Tool{}
	if pool != "" {
		p, err := e.pool(pool)
		if err != nil {
			return nil, err
		}
		out[p.cfg.Name] = p.status().Tools
		return out, nil
	}
	for _, name := range e.order {
		out[name] = e.pools[name].status().Tools
	}
	return out, nil
}

// Status is a snapshot of the node's pools.
type Status struct {
	NodeID  string
	Started time.Time
	Pools   []PoolStatus
}

// Status returns a snapshot of the pools.
func (e *Engine) Status() Status {
	st := Status{NodeID: e.cfg.NodeID, Started: e.started}
	for _, name := range e.order {
		st.Pools = append(st.Pools, e.pools[name].status())
	}
	return st
}

// Pools returns the pools' names, the default one first.
func (e *Engine) Pools() []string { return slices.Clone(e.order) }

// DefaultPool is the pool of requests that name none.
func (e *Engine) DefaultPool() string { return e.order[0] }

// Pool returns the configuration of a pool, and whether the node has it.
func (e *Engine) Pool(name string) (PoolConfig, bool) {
	p, ok := e.pools[name]
	if !ok {
		return PoolConfig{}, false
	}
	return p.cfg, true
}

// Slots returns a pool's worker slots now (workers × capacity; 0 when the
// node has no such pool).
func (e *Engine) Slots(pool string) int {
	p, ok := e.pools[pool]
	if !ok {
		return 0
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.slots) * p.cfg.Capacity
}

// Load returns a pool's load: calls in flight plus queued, per ready
// worker slot (more than 1 when nothing is ready); NaN for a pool the node
// does not have.
func (e *Engine) Load(pool string) float64 {
	p, ok := e.pools[pool]
	if !ok {
		return nan
	}
	return p.load()
}

// Healthy reports whether every pool can serve calls: each has a ready
// worker and none failed or is stopping.
func (e *Engine) Healthy() bool {
	for _, p := range e.pools {
		if !p.serving() {
			return false
		}
	}
	return true
}

// HealthChanges delivers a value whenever the node's health may have
// changed; read Healthy then.
func (e *Engine) HealthChanges() <-chan struct{} { return e.healthCh }

// healthChanged tells whoever watches the node's health to look again.
func (e *Engine) healthChanged() {
	select {
	case e.healthCh <- struct{}{}:
	default:
	}
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

// CallTimeout returns a pool's call_timeout, and whether the node has the
// pool.
func (e *Engine) CallTimeout(pool string) (time.Duration, bool) {
	p, ok := e.pools[pool]
	if !ok {
		return 0, false
	}
	return p.cfg.CallTimeout, true
}

// Admission says whether the node is cordoned (it takes no new routed
// work) and whether it is draining.
func (e *Engine) Admission() (cordoned, draining bool) {
	in := e.intent.get()
	return in.Cordoned || in.Draining, in.Draining
}

// Loads returns the pools' names and loads, for the load trailer.
func (e *Engine) Loads() ([]string, []float64) {
	loads := make([]float64, len(e.order))
	for i, name := range e.order {
		loads[i] = e.pools[name].load()
	}
	return e.order, loads
}
