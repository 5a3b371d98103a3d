package agent

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/rs/zerolog"

	"github.com/snakepit/snakepit/pkg/worker"
)

// PoolState is where a pool is in its life.
type PoolState int

// Pool states.
const (
	PoolStarting PoolState = iota + 1
	PoolReady
	PoolDegraded
	PoolFailed
	PoolStopping
)

func (s PoolState) String() string {
	switch s {
	case PoolStarting:
		return "starting"
	case PoolReady:
		return "ready"
	case PoolDegraded:
		return "degraded"
	case PoolFailed:
		return "failed"
	case PoolStopping:
		return "stopping"
	}
	return "unknown"
}

// proc is one worker process of a pool, with the pool's count of calls it
// holds.
type proc struct {
	w    *worker.Worker
	slot *slot
	busy int // calls given to the worker and not yet released; guarded by Pool.mu
	live bool
}

// slot is one worker position of a pool, served by a succession of
// processes (generations).
type slot struct {
	id  worker.ID
	cur *proc // the process serving the slot, nil while none is ready
}

type waiter struct {
	ch        chan *proc
	abandoned bool // guarded by Pool.mu
}

// Pool is a set of identical workers with a bounded queue in front of them.
type Pool struct {
	cfg  PoolConfig
	node *Node
	log  zerolog.Logger
	env  []string

	mu      sync.Mutex
	slots   []*slot
	ready   []*proc // processes taking calls
	waiters []*waiter
	queued  int
	rr      int
	state   PoolState
	reason  string
	tools   map[string]worker.Tool
	names   []string // sorted tool names
	readyCh chan struct{}
	failCh  chan struct{}

	served   atomic.Uint64
	errors   atomic.Uint64
	rejected atomic.Uint64
	latency  histogram
}

func newPool(n *Node, cfg PoolConfig) *Pool {
	p := &Pool{
		cfg:     cfg,
		node:    n,
		log:     n.log.With().Str("pool", cfg.Name).Logger(),
		state:   PoolStarting,
		readyCh: make(chan struct{}),
		failCh:  make(chan struct{}),
	}
	for i := 0; i < cfg.Size; i++ {
		p.slots = append(p.slots, &slot{id: worker.ID(i)})
	}
	return p
}

// environment builds the workers' environment: the daemon's, the Python
// runtime on PYTHONPATH, then the pool's own variables, which win.
func (p *Pool) environment(runtimeDir string) []string {
	env := map[string]string{}
	for _, kv := range os.Environ() {
		if k, v, ok := strings.Cut(kv, "="); ok {
			env[k] = v
		}
	}
	paths := []string{runtimeDir}
	for _, d := range p.cfg.PythonPath {
		if abs, err := filepath.Abs(d); err == nil {
			d = abs
		}
		paths = append(paths, d)
	}
	if old := env["PYTHONPATH"]; old != "" {
		paths = append(paths, old)
	}
	env["PYTHONPATH"] = strings.Join(paths, string(os.PathListSeparator))
	env["PYTHONUNBUFFERED"] = "1"
	maps.Copy(env, p.cfg.Env)
	out := make([]string, 0, len(env))
	for _, k := range slices.Sorted(maps.Keys(env)) {
		out = append(out, k+"="+env[k])
	}
	return out
}

// run supervises every slot of the pool until ctx is done, then stops the
// workers. It returns when all worker processes are gone.
func (p *Pool) run(ctx context.Context) {
	var wg sync.WaitGroup
	for _, s := range p.slots {
		wg.Add(1)
		go func() {
			defer wg.Done()
			p.superviseSlot(ctx, s)
		}()
	}
	wg.Wait()
}

// superviseSlot keeps a worker process running in the slot until ctx ends.
func (p *Pool) superviseSlot(ctx context.Context, s *slot) {
	backoff := restartBackoffMin
	for ctx.Err() == nil {
		pr, err := p.startProc(ctx, s)
		if err != nil {
			if ctx.Err() != nil {
				return
			}
			p.startFailed(s, err)
			if !sleepCtx(ctx, backoff) {
				return
			}
			backoff = min(2*backoff, restartBackoffMax)
			continue
		}
		began := time.Now()
		select {
		case <-pr.w.Done():
			p.retire(pr)
			p.log.Warn().Err(pr.w.Err()).Uint64("worker_id", uint64(s.id)).Msg("worker exited")
			if time.Since(began) > restartBackoffReset {
				backoff = restartBackoffMin
			}
			if !sleepCtx(ctx, backoff) {
				return
			}
			backoff = min(2*backoff, restartBackoffMax)
		case <-ctx.Done():
			p.retire(pr)
			pr.w.Stop(p.cfg.StopGrace)
			return
		}
	}
}

// responseOverhead is room left in a response message for what surrounds
// the result.
const responseOverhead = 1 << 10

// Restart back-off of a slot whose worker keeps failing.
const (
	restartBackoffMin   = 50 * time.Millisecond
	restartBackoffMax   = 30 * time.Second
	restartBackoffReset = 30 * time.Second
)

func sleepCtx(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-ctx.Done():
		return false
	}
}

func (p *Pool) startProc(ctx context.Context, s *slot) (*proc, error) {
	if err := p.node.startSem.acquire(ctx); err != nil {
		return nil, err
	}
	defer p.node.startSem.release()
	gen, err := p.node.nextGeneration()
	if err != nil {
		return nil, err
	}
	pr := &proc{slot: s}
	w, err := worker.Start(ctx, worker.Spec{
		Pool:         p.cfg.Name,
		ID:           s.id,
		Generation:   gen,
		Python:       p.cfg.Python,
		Adapter:      p.cfg.Adapter,
		Capacity:     p.cfg.Capacity,
		Env:          p.env,
		Dir:          p.cfg.Dir,
		MaxFrame:     p.node.cfg.MaxMessageBytes + 64<<10,
		MaxResult:    p.node.cfg.MaxMessageBytes - responseOverhead,
		StartTimeout: p.cfg.StartTimeout,
		StderrTail:   DefaultStderrTail,
		OnRelease:    func(*worker.Worker) { p.release(pr) },
		Logger:       p.node.log,
	})
	if err != nil {
		return nil, err
	}
	pr.w = w
	p.addReady(pr)
	return pr, nil
}

// startFailed records a worker that could not start. While the pool has
// never been ready, an adapter that fails to load fails the pool.
func (p *Pool) startFailed(s *slot, err error) {
	p.log.Error().Err(err).Uint64("worker_id", uint64(s.id)).Msg("worker failed to start")
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.state == PoolStarting {
		var se *worker.StartError
		reason := err.Error()
		if errors.As(err, &se) && se.Traceback != "" {
			reason += "\n" + se.Traceback
		}
		p.state = PoolFailed
		p.reason = reason
		select {
		case <-p.failCh:
		default:
			close(p.failCh)
		}
		return
	}
	if len(p.ready) < len(p.slots) && p.state == PoolReady {
		p.state = PoolDegraded
		p.reason = "worker failed to start: " + err.Error()
	}
}

// addReady puts a started process into service and hands it queued calls.
func (p *Pool) addReady(pr *proc) {
	p.mu.Lock()
	defer p.mu.Unlock()
	pr.live = true
	pr.slot.cur = pr
	p.ready = append(p.ready, pr)
	h := pr.w.Hello()
	if p.tools == nil || !slices.Equal(p.names, toolNames(h.Tools)) {
		p.tools = make(map[string]worker.Tool, len(h.Tools))
		for _, t := range h.Tools {
			p.tools[t.Name] = t
		}
		p.names = toolNames(h.Tools)
	}
	if p.state == PoolStarting && len(p.ready) >= len(p.slots) {
		p.state = PoolReady
		close(p.readyCh)
	} else if p.state == PoolDegraded && len(p.ready) >= len(p.slots) {
		p.state = PoolReady
		p.reason = ""
	}
	for pr.busy < pr.w.Capacity() && p.grantLocked(pr) {
	}
}

func toolNames(ts []worker.Tool) []string {
	out := make([]string, len(ts))
	for i, t := range ts {
		out[i] = t.Name
	}
	slices.Sort(out)
	return out
}

// retire takes a process out of service; calls it holds finish or fail.
func (p *Pool) retire(pr *proc) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if !pr.live {
		return
	}
	pr.live = false
	if pr.slot.cur == pr {
		pr.slot.cur = nil
	}
	if i := slices.Index(p.ready, pr); i >= 0 {
		p.ready = slices.Delete(p.ready, i, i+1)
	}
	if p.state == PoolReady && !p.stoppingLocked() {
		p.state = PoolDegraded
		p.reason = fmt.Sprintf("worker %d generation %d exited; restarting", pr.w.ID(), pr.w.Generation())
	}
}

func (p *Pool) stoppingLocked() bool { return p.state == PoolStopping }

// pickLocked returns the least-loaded ready process with a free slot.
func (p *Pool) pickLocked() *proc {
	var best *proc
	n := len(p.ready)
	if n == 0 {
		return nil
	}
	p.rr++
	for i := 0; i < n; i++ {
		pr := p.ready[(p.rr+i)%n]
		if pr.busy >= pr.w.Capacity() {
			continue
		}
		if best == nil || pr.busy < best.busy {
			best = pr
			if pr.busy == 0 {
				break
			}
		}
	}
	return best
}

// grantLocked hands pr to the first live waiter; it reports whether it did.
func (p *Pool) grantLocked(pr *proc) bool {
	for len(p.waiters) > 0 {
		wt := p.waiters[0]
		p.waiters[0] = nil
		p.waiters = p.waiters[1:]
		if wt.abandoned {
			continue
		}
		p.queued--
		pr.busy++
		wt.ch <- pr
		return true
	}
	return false
}

// release returns a slot of pr; a queued call gets it at once.
func (p *Pool) release(pr *proc) {
	p.mu.Lock()
	pr.busy--
	if pr.live {
		p.grantLocked(pr)
	}
	p.mu.Unlock()
}

// acquire reserves a slot on a worker for one call, waiting in the queue
// for at most queue_max_wait and the call's deadline.
func (p *Pool) acquire(ctx context.Context) (*proc, error) {
	p.mu.Lock()
	if pr := p.pickLocked(); pr != nil {
		pr.busy++
		p.mu.Unlock()
		return pr, nil
	}
	switch p.state {
	case PoolFailed, PoolStopping:
		err := &PoolUnavailableError{Pool: p.cfg.Name, State: p.state.String(), Reason: p.reason}
		p.mu.Unlock()
		return nil, err
	}
	if p.queued >= p.cfg.QueueDepth {
		p.mu.Unlock()
		p.rejected.Add(1)
		return nil, &QueueFullError{Pool: p.cfg.Name, Depth: p.cfg.QueueDepth, RetryAfter: p.retryAfter()}
	}
	wt := &waiter{ch: make(chan *proc, 1)}
	p.waiters = append(p.waiters, wt)
	p.queued++
	p.mu.Unlock()

	t := time.NewTimer(p.cfg.QueueMaxWait)
	defer t.Stop()
	var err error
	select {
	case pr := <-wt.ch:
		return pr, nil
	case <-ctx.Done():
		err = ctx.Err()
	case <-t.C:
		p.rejected.Add(1)
		err = &QueueTimeoutError{Pool: p.cfg.Name, Waited: p.cfg.QueueMaxWait, RetryAfter: p.retryAfter()}
	}
	p.mu.Lock()
	select {
	case pr := <-wt.ch:
		// Granted while we gave up: hand the slot on.
		p.mu.Unlock()
		p.release(pr)
		return nil, err
	default:
	}
	wt.abandoned = true
	p.queued--
	p.mu.Unlock()
	return nil, err
}

// retryAfter suggests when a refused call may succeed: about the time a
// call takes, at least 10 ms.
func (p *Pool) retryAfter() time.Duration {
	q, _ := p.latency.quantiles(0.5)
	return max(q[0], 10*time.Millisecond)
}

// execute runs one call in the pool.
func (p *Pool) execute(ctx context.Context, req *Request, arrived time.Time) (*Result, error) {
	p.mu.Lock()
	_, ok := p.tools[req.Tool]
	var known []string
	if !ok && p.tools != nil {
		known = p.names
	}
	hasTools := p.tools != nil
	p.mu.Unlock()
	if !ok && hasTools {
		return nil, &UnknownToolError{Pool: p.cfg.Name, Tool: req.Tool, Known: known}
	}
	res, err := p.executeOnce(ctx, req, arrived)
	var ee *worker.ExitError
	if err != nil && req.Idempotent && errors.As(err, &ee) && ctx.Err() == nil {
		p.log.Info().Str("request_id", req.RequestID).Uint64("worker_id", uint64(ee.ID)).Uint64("generation", uint64(ee.Generation)).Msg("retrying idempotent call after worker exit")
		res, err = p.executeOnce(ctx, req, arrived)
	}
	if err != nil {
		p.errors.Add(1)
	} else {
		p.served.Add(1)
	}
	p.latency.record(time.Since(arrived))
	return res, err
}

func (p *Pool) executeOnce(ctx context.Context, req *Request, arrived time.Time) (*Result, error) {
	pr, err := p.acquire(ctx)
	queued := time.Since(arrived)
	if err != nil {
		if errors.Is(err, context.DeadlineExceeded) {
			return nil, &DeadlineError{Pool: p.cfg.Name, Stage: StageQueued, Queued: queued}
		}
		return nil, err
	}
	var timeout time.Duration
	if dl, ok := ctx.Deadline(); ok {
		timeout = time.Until(dl)
		if timeout <= 0 {
			p.release(pr)
			return nil, &DeadlineError{Pool: p.cfg.Name, Stage: StageQueued, Queued: queued}
		}
	}
	payload, err := pr.w.Call(ctx, &worker.Call{
		Tool:          req.Tool,
		Args:          req.Args,
		SessionID:     req.SessionID,
		RequestID:     req.RequestID,
		CorrelationID: req.CorrelationID,
		Timeout:       timeout,
	})
	ran := time.Since(arrived) - queued
	if err != nil {
		var te *worker.ToolError
		if errors.Is(err, context.DeadlineExceeded) || (errors.As(err, &te) && te.Kind == worker.KindCancelled && errors.Is(ctx.Err(), context.DeadlineExceeded)) {
			return nil, &DeadlineError{Pool: p.cfg.Name, Stage: StageRunning, Queued: queued, Ran: ran}
		}
		return nil, err
	}
	return &Result{
		Payload:    payload,
		Node:       p.node.cfg.NodeID,
		Pool:       p.cfg.Name,
		WorkerID:   pr.w.ID(),
		Generation: pr.w.Generation(),
		Queued:     queued,
		Ran:        ran,
	}, nil
}

// waitReady waits until every slot has a ready worker, the pool failed,
// or ctx ends.
func (p *Pool) waitReady(ctx context.Context) error {
	select {
	case <-p.readyCh:
		return nil
	case <-p.failCh:
		p.mu.Lock()
		defer p.mu.Unlock()
		return fmt.Errorf("pool %q failed to start: %s", p.cfg.Name, p.reason)
	case <-ctx.Done():
		return ctx.Err()
	}
}

// setStopping refuses new calls; queued ones still get workers.
func (p *Pool) setStopping() {
	p.mu.Lock()
	p.state = PoolStopping
	p.mu.Unlock()
}

// inFlight returns how many calls hold or wait for a worker.
func (p *Pool) inFlight() (busy, queued int) {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, s := range p.slots {
		if s.cur != nil {
			busy += s.cur.busy
		}
	}
	return busy, p.queued
}

// PoolStatus is a snapshot of a pool.
type PoolStatus struct {
	Name         string
	State        PoolState
	Reason       string
	Adapter      string
	Size         int
	Capacity     int
	Ready        int
	Busy         int
	Queued       int
	QueueDepth   int
	Served       uint64
	Errors       uint64
	Rejected     uint64
	P50, P90     time.Duration
	P99, Max     time.Duration
	Workers      []WorkerStatus
	Tools        []worker.Tool
	WorkerPython string
}

// WorkerStatus is a snapshot of one worker.
type WorkerStatus struct {
	ID         worker.ID
	Generation worker.Generation
	PID        int
	State      string
	InFlight   int
	Capacity   int
	Served     uint64
	Started    time.Time
}

func (p *Pool) status() PoolStatus {
	qs, mx := p.latency.quantiles(0.5, 0.9, 0.99)
	p.mu.Lock()
	defer p.mu.Unlock()
	st := PoolStatus{
		Name: p.cfg.Name, State: p.state, Reason: p.reason, Adapter: p.cfg.Adapter,
		Size: len(p.slots), Capacity: p.cfg.Capacity, Ready: len(p.ready),
		Queued: p.queued, QueueDepth: p.cfg.QueueDepth,
		Served: p.served.Load(), Errors: p.errors.Load(), Rejected: p.rejected.Load(),
		P50: qs[0], P90: qs[1], P99: qs[2], Max: mx,
	}
	for _, s := range p.slots {
		ws := WorkerStatus{ID: s.id, Capacity: p.cfg.Capacity, State: "starting"}
		if pr := s.cur; pr != nil {
			ws.Generation = pr.w.Generation()
			ws.PID = pr.w.PID()
			ws.State = pr.w.State().String()
			ws.InFlight = pr.busy
			ws.Served = pr.w.Served()
			ws.Started = pr.w.Started()
			st.Busy += pr.busy
		}
		st.Workers = append(st.Workers, ws)
	}
	for _, name := range p.names {
		st.Tools = append(st.Tools, p.tools[name])
	}
	return st
}

func itoa(i int) string { return strconv.Itoa(i) }
