package engine

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"math"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/rs/zerolog"

	"github.com/snakepit/snakepit/pkg/agent/call"
	"github.com/snakepit/snakepit/pkg/agent/policy"
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
	w         *worker.Worker
	slot      *slot
	busy      int  // calls given to the worker and not yet released
	live      bool // in p.ready, taking calls
	recycling bool // a replacement was asked for
	// retireWhenIdle: leave service the moment no call runs (a recycled
	// worker that still serves its sessions).
	retireWhenIdle bool
	idle           chan struct{}
	idleShut       bool
	// waiters are calls that wait for this worker only (strict affinity).
	waiters []*waiter
	// sessions counts the sessions bound to this worker.
	sessions int
	// lastUsed orders processes by their last finished call.
	lastUsed uint64
	// maxSessions is the pool's max_sessions_per_worker.
	maxSessions int
}

// markIdleLocked closes pr.idle once pr is out of service and holds no call.
func (pr *proc) markIdleLocked() {
	if !pr.live && pr.busy == 0 && !pr.idleShut {
		pr.idleShut = true
		close(pr.idle)
	}
}

// recycleRequest asks a slot's supervisor to replace one generation.
type recycleRequest struct {
	gen    worker.Generation
	reason string
	// soft requests (max_calls, max_age) let the worker's sessions finish
	// their calls; the others (memory, ignored cancellation) do not wait.
	soft bool
}

// slot is one worker position of a pool, served by a succession of
// processes (generations).
type slot struct {
	id      worker.ID
	cur     *proc // the process serving the slot, nil while none is ready
	recycle chan recycleRequest
	// stop is closed when a resize removes the slot; its worker then
	// finishes its calls (at most stopDeadline) and is stopped.
	stop         chan struct{}
	stopDeadline time.Duration

	// gpus are the GPUs an exclusive GPU pool's slot holds (from the
	// node's gpuBook, given back when the slot is gone); guarded by
	// Pool.mu.
	gpus []string

	// Crash accounting, guarded by Pool.mu.
	crashes      []time.Time
	lastCause    string
	taintedUntil time.Time
	startFails   int
}

type waiter struct {
	ch        chan *proc
	abandoned bool  // guarded by Pool.mu
	err       error // why a nil was sent on ch, when not errTargetGone
}

// Pool is a set of identical workers with a bounded queue in front of them.
// Each worker slot has a supervisor goroutine that starts its process,
// replaces it when it dies (with back-off, and a cool-down once it has
// crashed past the restart budget) and recycles it on request, starting the
// replacement before retiring the old process.
type Pool struct {
	cfg PoolConfig
	eng *Engine
	pol *policy.Set
	log zerolog.Logger
	env []string
	// python is the interpreter's resolved path (see resolvePython).
	python string
	// gpus is the start-time GPU assignment (planGPUs): for a shared GPU
	// pool, slot i uses gpus[i % len(gpus)] (round-robin); an exclusive
	// pool's slots take theirs from the node's gpuBook instead (slot.gpus).
	// nil when the pool uses no GPU. Set before run and never changed.
	gpus [][]string
	wg   sync.WaitGroup // supervisors, drains and exit watchers

	mu      sync.Mutex
	slots   []*slot
	ready   readyList // processes taking calls
	waiters []*waiter
	queued  int
	useSeq  uint64
	state   PoolState
	reason  string
	tools   map[string]worker.Tool
	names   []string // sorted tool names
	readyCh chan struct{}
	failCh  chan struct{}
	// sessions maps session ids to their binding.
	sessions map[string]*session
	// runCtx is run's context, for supervisors that resize starts.
	runCtx   context.Context
	nextSlot worker.ID

	served   atomic.Uint64
	errors   atomic.Uint64
	rejected atomic.Uint64
	restarts sync.Map // cause -> *atomic.Uint64
	latency  histogram
}

func newPool(e *Engine, cfg PoolConfig, pol *policy.Set) *Pool {
	p := &Pool{
		cfg:      cfg,
		eng:      e,
		pol:      pol,
		log:      e.log.With().Str("pool", cfg.Name).Logger(),
		state:    PoolStarting,
		readyCh:  make(chan struct{}),
		failCh:   make(chan struct{}),
		sessions: map[string]*session{},
	}
	for i := 0; i < cfg.Size; i++ {
		p.slots = append(p.slots, newSlot(worker.ID(i)))
	}
	p.nextSlot = worker.ID(cfg.Size)
	return p
}

// mathThreadVars are the variables that size the thread pools of math
// libraries; each worker gets its capacity unless the pool sets them.
var mathThreadVars = []string{
	"OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "BLIS_NUM_THREADS",
	"VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS",
}

// environment builds the workers' environment: the daemon's, the Python
// runtime on PYTHONPATH, the virtualenv, thread counts of math libraries,
// then the pool's own variables, which win.
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
	env["SNAKEPIT_RUN_ID"] = p.eng.runID
	if p.cfg.Virtualenv != "" {
		venv, _ := filepath.Abs(p.cfg.Virtualenv)
		env["VIRTUAL_ENV"] = venv
		env["PATH"] = filepath.Join(venv, "bin") + string(os.PathListSeparator) + env["PATH"]
		delete(env, "PYTHONHOME")
	}
	for _, k := range mathThreadVars {
		env[k] = strconv.Itoa(p.cfg.Capacity)
	}
	maps.Copy(env, p.cfg.Env)
	out := make([]string, 0, len(env))
	for _, k := range slices.Sorted(maps.Keys(env)) {
		out = append(out, k+"="+env[k])
	}
	return out
}

// resolvePython asks the pool's interpreter for its real path, once, so
// that launchers in front of it (pyenv shims, wrapper scripts) are paid for
// once and not at every worker start: with a pyenv shim that is about 100
// ms of each start. A virtualenv's interpreter reports its own path, so the
// virtualenv is kept.
func (p *Pool) resolvePython(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, p.cfg.StartTimeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, p.cfg.Python, "-c", "import sys; sys.stdout.write(sys.executable or '')")
	cmd.Env = p.env
	cmd.Dir = p.cfg.Dir
	out, err := cmd.Output()
	if err != nil {
		var ee *exec.ExitError
		detail := err.Error()
		if errors.As(err, &ee) && len(ee.Stderr) > 0 {
			detail = strings.TrimSpace(string(ee.Stderr))
		}
		return fmt.Errorf("pools[%s].python: cannot run %q: %s", p.cfg.Name, p.cfg.Python, detail)
	}
	p.python = p.cfg.Python
	if path := strings.TrimSpace(string(out)); path != "" {
		if st, err := os.Stat(path); err == nil && !st.IsDir() && st.Mode()&0o111 != 0 {
			p.python = path
		}
	}
	return nil
}

// exclusiveGPUs reports whether the pool's slots hold GPUs of their own
// (gpus.exclusive), booked in the node's gpuBook.
func (p *Pool) exclusiveGPUs() bool {
	return p.cfg.GPUs.Exclusive && p.cfg.GPUs.PerWorker > 0 && p.eng.gpuBook != nil
}

// slotGPUsLocked returns the GPUs of slot s (nil: none or not yet taken).
func (p *Pool) slotGPUsLocked(s *slot) []string {
	if p.exclusiveGPUs() {
		return s.gpus
	}
	if len(p.gpus) == 0 {
		return nil
	}
	return p.gpus[int(s.id)%len(p.gpus)]
}

// slotEnv is the environment of slot s's workers: the pool's, and the
// slot's GPUs. An exclusive pool's slot takes its GPUs here, at its first
// start, if a resize did not give it some already.
func (p *Pool) slotEnv(s *slot) ([]string, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.exclusiveGPUs() && s.gpus == nil {
		g, err := p.eng.gpuBook.take(p.cfg)
		if err != nil {
			return nil, err
		}
		s.gpus = g
	}
	ids := p.slotGPUsLocked(s)
	if ids == nil {
		return p.env, nil
	}
	v := strings.Join(ids, ",")
	return append(slices.Clip(p.env), "CUDA_VISIBLE_DEVICES="+v, "NVIDIA_VISIBLE_DEVICES="+v), nil
}

// releaseGPUs gives the GPUs of a slot that is gone back to the book.
func (p *Pool) releaseGPUs(s *slot) {
	if !p.exclusiveGPUs() {
		return
	}
	p.mu.Lock()
	ids := s.gpus
	s.gpus = nil
	p.mu.Unlock()
	p.eng.gpuBook.give(p.cfg.Name, ids)
}

// run supervises every slot of the pool until ctx is done, then stops the
// workers. It returns when all worker processes are gone.
func (p *Pool) run(ctx context.Context) {
	p.mu.Lock()
	p.runCtx = ctx
	for _, s := range p.slots {
		p.startSupervisorLocked(ctx, s)
	}
	p.mu.Unlock()
	p.wg.Add(1)
	go func() {
		defer p.wg.Done()
		p.monitor(ctx)
	}()
	p.wg.Wait()
}

func newSlot(id worker.ID) *slot {
	return &slot{id: id, recycle: make(chan recycleRequest, 1), stop: make(chan struct{})}
}

func (p *Pool) startSupervisorLocked(ctx context.Context, s *slot) {
	p.wg.Add(1)
	go func() {
		defer p.wg.Done()
		p.superviseSlot(ctx, s)
		p.releaseGPUs(s)
	}()
}

// superviseSlot keeps a worker process running in the slot until ctx ends
// or a resize removes the slot.
func (p *Pool) superviseSlot(ctx context.Context, s *slot) {
	backoff := p.cfg.RestartBackoffMin
	var pr *proc
	for {
		select {
		case <-s.stop:
			if pr != nil {
				p.retire(pr)
				p.drainAndStop(ctx, pr, s.stopDeadline)
			}
			return
		default:
		}
		if pr == nil {
			var err error
			pr, err = p.startProc(ctx, s)
			if err != nil {
				if ctx.Err() != nil {
					return
				}
				p.startFailed(s, err)
				if !sleepCtx(ctx, backoff) {
					return
				}
				backoff = min(2*backoff, p.cfg.RestartBackoffMax)
				continue
			}
		}
		select {
		case <-pr.w.Exited():
			p.retire(pr)
			<-pr.w.Done()
			lived := time.Since(pr.w.Started())
			delay := p.crashed(s, pr)
			if lived > restartBackoffReset {
				backoff = p.cfg.RestartBackoffMin
			}
			delay = max(delay, backoff)
			backoff = min(2*backoff, p.cfg.RestartBackoffMax)
			pr = nil
			if !sleepCtx(ctx, delay) {
				return
			}
		case <-s.stop:
			continue // handled at the top of the loop
		case req := <-s.recycle:
			if req.gen != pr.w.Generation() {
				continue // asked for a generation already gone
			}
			p.log.Info().Uint64("worker_id", uint64(s.id)).Uint64("generation", uint64(req.gen)).Str("reason", req.reason).Msg("recycling worker")
			p.countRestart("recycle_" + req.reason)
			next, err := p.startProc(ctx, s)
			if err != nil {
				if ctx.Err() != nil {
					continue // the ctx case stops pr
				}
				p.log.Error().Err(err).Uint64("worker_id", uint64(s.id)).Msg("replacement worker failed to start; keeping the old one")
				p.mu.Lock()
				pr.recycling = false // the monitor asks again
				p.mu.Unlock()
				continue
			}
			old := pr
			pr = next
			p.mu.Lock()
			if old.sessions > 0 && old.busy > 0 && req.soft {
				// Its sessions' calls may still finish there; it leaves
				// service the moment none runs (see release).
				old.retireWhenIdle = true
			} else {
				p.retireLocked(old)
			}
			p.mu.Unlock()
			p.wg.Add(1)
			go func() {
				defer p.wg.Done()
				p.drainAndStop(ctx, old, p.cfg.RecycleDrainTimeout)
			}()
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

// restartBackoffReset: a worker that lived this long restarts after the
// minimum back-off again.
const restartBackoffReset = 30 * time.Second

func sleepCtx(ctx context.Context, d time.Duration) bool {
	if d <= 0 {
		return ctx.Err() == nil
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-ctx.Done():
		return false
	}
}

// drainAndStop waits until a retired process has finished its calls (at
// most timeout), then stops it.
func (p *Pool) drainAndStop(ctx context.Context, old *proc, timeout time.Duration) {
	t := time.NewTimer(timeout)
	defer t.Stop()
	select {
	case <-old.idle:
	case <-old.w.Exited():
	case <-t.C:
		p.log.Warn().Uint64("worker_id", uint64(old.w.ID())).Uint64("generation", uint64(old.w.Generation())).
			Dur("timeout", timeout).Msg("retired worker still busy; stopping it")
	case <-ctx.Done():
	}
	p.retire(old)
	old.w.Stop(p.cfg.StopGrace)
}

// crashed records the exit of a worker that the pool did not stop, and
// returns how long the slot must wait before its next start: the taint
// cool-down once it has crashed more than restart_budget times within
// restart_window, else 0 (the caller adds the back-off).
func (p *Pool) crashed(s *slot, pr *proc) time.Duration {
	cause := worker.CauseExited
	var ee *worker.ExitError
	if errors.As(pr.w.Err(), &ee) {
		cause = ee.Cause
	}
	if cause == worker.CauseStopped {
		return 0
	}
	p.countRestart(cause)
	now := time.Now()
	p.mu.Lock()
	defer p.mu.Unlock()
	kept := s.crashes[:0]
	for _, c := range s.crashes {
		if now.Sub(c) < p.cfg.RestartWindow {
			kept = append(kept, c)
		}
	}
	s.crashes = append(kept, now)
	s.lastCause = cause
	p.log.Warn().Err(pr.w.Err()).Uint64("worker_id", uint64(s.id)).Str("cause", cause).Int("recent_crashes", len(s.crashes)).Msg("worker exited")
	var wait time.Duration
	if len(s.crashes) > p.cfg.RestartBudget {
		s.taintedUntil = now.Add(p.cfg.TaintCooldown)
		wait = p.cfg.TaintCooldown
		p.log.Error().Uint64("worker_id", uint64(s.id)).Str("last_cause", cause).Dur("cooldown", p.cfg.TaintCooldown).Msg("restart budget exhausted; worker tainted")
	}
	p.updateStateLocked()
	return wait
}

func (p *Pool) countRestart(cause string) {
	v, _ := p.restarts.LoadOrStore(cause, new(atomic.Uint64))
	v.(*atomic.Uint64).Add(1)
}

// Restarts returns how many workers were replaced, by cause.
func (p *Pool) Restarts() map[string]uint64 {
	out := map[string]uint64{}
	p.restarts.Range(func(k, v any) bool {
		out[k.(string)] = v.(*atomic.Uint64).Load()
		return true
	})
	return out
}

// monitor expires idle sessions and recycles workers past their age or
// memory limits.
func (p *Pool) monitor(ctx context.Context) {
	t := time.NewTicker(min(p.eng.cfg.MonitorInterval, max(p.cfg.SessionIdleTimeout/2, time.Millisecond)))
	defer t.Stop()
	for {
		var now time.Time
		select {
		case <-ctx.Done():
			return
		case now = <-t.C:
		}
		p.expireSessions(now)
		if p.cfg.MaxAge <= 0 && p.cfg.MaxMemoryMB <= 0 {
			continue
		}
		p.mu.Lock()
		procs := slices.Clone(p.ready)
		p.mu.Unlock()
		var rss map[int]uint64
		if p.cfg.MaxMemoryMB > 0 {
			pids := make([]int, len(procs))
			for i, pr := range procs {
				pids[i] = pr.w.PID()
			}
			var err error
			if rss, err = worker.GroupRSS(pids); err != nil {
				p.log.Warn().Err(err).Msg("reading worker memory")
			}
		}
		for _, pr := range procs {
			if p.cfg.MaxAge > 0 && time.Since(pr.w.Started()) > p.cfg.MaxAge {
				p.requestRecycle(pr, "max_age")
			} else if m := rss[pr.w.PID()]; p.cfg.MaxMemoryMB > 0 && m > uint64(p.cfg.MaxMemoryMB)<<20 {
				p.log.Info().Uint64("worker_id", uint64(pr.w.ID())).Uint64("rss_bytes", m).Int("max_memory_mb", p.cfg.MaxMemoryMB).Msg("worker over its memory limit")
				p.requestRecycle(pr, "max_memory")
			}
		}
	}
}

// requestRecycle asks pr's supervisor to replace it (once).
func (p *Pool) requestRecycle(pr *proc, reason string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.requestRecycleLocked(pr, reason)
}

func (p *Pool) requestRecycleLocked(pr *proc, reason string) {
	if pr.recycling || !pr.live || p.state == PoolStopping {
		return
	}
	soft := reason == "max_calls" || reason == "max_age"
	if soft && pr.sessions > 0 {
		// Prefer recycling workers without sessions: one that holds some
		// waits while another worker of the pool is being recycled.
		for _, o := range p.ready {
			if o != pr && o.recycling {
				return
			}
		}
	}
	pr.recycling = true
	select {
	case pr.slot.recycle <- recycleRequest{gen: pr.w.Generation(), reason: reason, soft: soft}:
	default:
	}
}

func (p *Pool) startProc(ctx context.Context, s *slot) (*proc, error) {
	if err := p.eng.startSem.acquire(ctx); err != nil {
		return nil, err
	}
	defer p.eng.startSem.release()
	env, err := p.slotEnv(s)
	if err != nil {
		return nil, err
	}
	gen, err := p.eng.gens.take()
	if err != nil {
		return nil, err
	}
	pr := &proc{slot: s, idle: make(chan struct{}), maxSessions: p.cfg.MaxSessionsPerWorker}
	w, err := worker.Start(ctx, worker.Spec{
		Pool:              p.cfg.Name,
		ID:                s.id,
		Generation:        gen,
		Python:            p.python,
		Adapter:           p.cfg.Adapter,
		Capacity:          p.cfg.Capacity,
		Env:               env,
		Dir:               p.cfg.Dir,
		MaxFrame:          p.eng.cfg.MaxMessageBytes + 64<<10,
		MaxResult:         p.eng.cfg.MaxMessageBytes - responseOverhead,
		StartTimeout:      p.cfg.StartTimeout,
		StderrTail:        p.eng.cfg.StderrTail,
		HeartbeatInterval: p.cfg.HeartbeatInterval,
		HeartbeatTimeout:  p.cfg.HeartbeatTimeout,
		CancelGrace:       p.cfg.CancelGrace,
		OnCancelIgnored:   func(*worker.Worker) { p.requestRecycle(pr, "cancel_ignored") },
		OnRelease:         func(*worker.Worker) { p.release(pr) },
		OnExit:            func(*worker.Worker) { p.retire(pr) },
		Logger:            p.eng.log,
	})
	if err != nil {
		return nil, err
	}
	pr.w = w
	p.eng.procs.add(w)
	p.wg.Add(1)
	go func() {
		defer p.wg.Done()
		<-w.Done()
		p.eng.procs.remove(w)
	}()
	p.addReady(pr)
	return pr, nil
}

// startFailed records a worker that could not start. While the pool is
// starting, failures of more slots than min_ready leaves room for fail the
// pool: the node then reports the error (with the Python traceback) and
// exits rather than waiting forever.
func (p *Pool) startFailed(s *slot, err error) {
	p.log.Error().Err(err).Uint64("worker_id", uint64(s.id)).Msg("worker failed to start")
	p.countRestart("start_failed")
	p.mu.Lock()
	defer p.mu.Unlock()
	s.startFails++
	if p.state == PoolStarting {
		failing := 0
		for _, o := range p.slots {
			if o.startFails > 0 && o.cur == nil {
				failing++
			}
		}
		var se *worker.StartError
		deterministic := errors.As(err, &se) && se.Type != ""
		if deterministic || failing > len(p.slots)-p.cfg.MinReady {
			reason := err.Error()
			if se != nil && se.Traceback != "" {
				reason += "\n" + se.Traceback
			}
			p.state = PoolFailed
			p.reason = reason
			close(p.failCh)
		}
		return
	}
	p.updateStateLocked()
}

// updateStateLocked derives the pool's state from its workers.
func (p *Pool) updateStateLocked() {
	switch p.state {
	case PoolStopping, PoolFailed:
		return
	case PoolStarting:
		if len(p.ready) < min(p.cfg.MinReady, len(p.slots)) {
			return
		}
		close(p.readyCh)
	}
	now := time.Now()
	for _, s := range p.slots {
		if now.Before(s.taintedUntil) {
			p.state = PoolDegraded
			p.reason = fmt.Sprintf("worker %d crashed %d times within %s (last cause: %s): restart budget exhausted, tainted until %s",
				s.id, len(s.crashes), p.cfg.RestartWindow, s.lastCause, s.taintedUntil.Format(time.RFC3339))
			p.eng.healthChanged()
			return
		}
	}
	if len(p.ready) < len(p.slots) {
		p.state = PoolDegraded
		p.reason = fmt.Sprintf("%d of %d workers ready; starting the others", len(p.ready), len(p.slots))
	} else {
		p.state = PoolReady
		p.reason = ""
	}
	p.eng.healthChanged()
}

// addReady puts a started process into service and hands it queued calls.
func (p *Pool) addReady(pr *proc) {
	p.mu.Lock()
	defer p.mu.Unlock()
	pr.live = true
	pr.slot.cur = pr
	pr.slot.startFails = 0
	p.ready = append(p.ready, pr)
	h := pr.w.Hello()
	if p.tools == nil || !slices.Equal(p.names, toolNames(h.Tools)) {
		p.tools = make(map[string]worker.Tool, len(h.Tools))
		for _, t := range h.Tools {
			p.tools[t.Name] = t
		}
		p.names = toolNames(h.Tools)
	}
	p.updateStateLocked()
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
	p.retireLocked(pr)
}

func (p *Pool) retireLocked(pr *proc) {
	if !pr.live {
		return
	}
	for _, wt := range pr.waiters {
		if !wt.abandoned {
			p.queued--
			wt.ch <- nil // errTargetGone
		}
	}
	pr.waiters = nil
	pr.live = false
	if pr.slot.cur == pr {
		pr.slot.cur = nil
	}
	if i := slices.Index(p.ready, pr); i >= 0 {
		p.ready = slices.Delete(p.ready, i, i+1)
	}
	pr.markIdleLocked()
	p.updateStateLocked()
}

// pickLocked returns the worker the pool's worker selector picks for a
// sessionless call, nil when none is free.
func (p *Pool) pickLocked() *proc {
	if i := p.pol.Worker.Pick(&p.ready, policy.Purpose{Bound: -1}); i >= 0 {
		return p.ready[i]
	}
	return nil
}

// readyList is the pool's ready workers; it is the policy.Workers the
// worker selector reads (under Pool.mu).
type readyList []*proc

// Len implements policy.Workers.
func (l *readyList) Len() int { return len(*l) }

// At implements policy.Workers.
func (l *readyList) At(i int) policy.Worker {
	pr := (*l)[i]
	return policy.Worker{
		Busy: pr.busy, Capacity: pr.w.Capacity(), Sessions: pr.sessions,
		SessionRoom: pr.sessions < pr.maxSessions, LastUsed: pr.lastUsed, Recycling: pr.recycling,
	}
}

// index returns the position of pr, -1 when it is not ready.
func (l readyList) index(pr *proc) int {
	for i, x := range l {
		if x == pr {
			return i
		}
	}
	return -1
}

// grantLocked hands pr to the first live waiter, its own (strict session
// calls) before the pool's; it reports whether it did.
func (p *Pool) grantLocked(pr *proc) bool {
	for len(pr.waiters) > 0 {
		wt := pr.waiters[0]
		pr.waiters[0] = nil
		pr.waiters = pr.waiters[1:]
		if wt.abandoned {
			continue
		}
		p.queued--
		pr.busy++
		wt.ch <- pr
		return true
	}
	if pr.recycling {
		return false
	}
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
	p.useSeq++
	pr.lastUsed = p.useSeq
	if pr.live && pr.retireWhenIdle && pr.busy == 0 && len(pr.waiters) == 0 {
		p.retireLocked(pr)
	}
	if pr.live {
		if p.cfg.MaxCalls > 0 && pr.w.Served() >= uint64(p.cfg.MaxCalls) {
			p.requestRecycleLocked(pr, "max_calls")
		}
		if !p.grantLocked(pr) {
			// pr is recycling: a queued call may fit on another worker.
			if len(p.waiters) > 0 {
				if other := p.pickLocked(); other != nil {
					p.grantLocked(other)
				}
			}
		}
	} else {
		pr.markIdleLocked()
	}
	p.mu.Unlock()
}

// acquire reserves a slot on a worker for one call, waiting in the queue
// for at most queue_max_wait and the call's deadline.
func (p *Pool) acquire(ctx context.Context, req *call.Request) (*proc, error) {
	p.mu.Lock()
	if pr := p.pickLocked(); pr != nil {
		pr.busy++
		p.mu.Unlock()
		return pr, nil
	}
	return p.queueLocked(ctx, nil, req)
}

// queueLocked waits for a slot: on any worker when target is nil, else on
// target only, when the pool's queue policy lets the call wait. It is
// called with p.mu held and releases it. A target that leaves service
// while the call waits yields errTargetGone.
func (p *Pool) queueLocked(ctx context.Context, target *proc, req *call.Request) (*proc, error) {
	if p.state == PoolFailed || p.state == PoolStopping || (len(p.ready) == 0 && p.allTaintedLocked()) {
		err := &call.PoolUnavailableError{Pool: p.cfg.Name, State: p.state.String(), Reason: p.reason}
		p.mu.Unlock()
		return nil, err
	}
	switch p.pol.Queue.Admit(policy.QueueState{Queued: p.queued, Depth: p.cfg.QueueDepth, Movable: req.Movable && target == nil}) {
	case policy.Refuse:
		queued := p.queued
		p.mu.Unlock()
		p.rejected.Add(1)
		return nil, &call.QueueFullError{Pool: p.cfg.Name, Depth: queued, RetryAfter: p.retryAfter()}
	case policy.Spill:
		queued := p.queued
		p.mu.Unlock()
		return nil, &call.QueueFullError{Pool: p.cfg.Name, Depth: queued, RetryAfter: p.retryAfter(), Spilled: true}
	}
	wt := &waiter{ch: make(chan *proc, 1)}
	if target != nil {
		target.waiters = append(target.waiters, wt)
	} else {
		p.waiters = append(p.waiters, wt)
	}
	p.queued++
	p.mu.Unlock()

	t := time.NewTimer(p.cfg.QueueMaxWait)
	defer t.Stop()
	var err error
	select {
	case pr := <-wt.ch:
		if pr == nil {
			if wt.err != nil {
				return nil, wt.err
			}
			return nil, errTargetGone
		}
		return pr, nil
	case <-ctx.Done():
		err = ctx.Err()
	case <-t.C:
		p.rejected.Add(1)
		err = &call.QueueTimeoutError{Pool: p.cfg.Name, Waited: p.cfg.QueueMaxWait, RetryAfter: p.retryAfter()}
	}
	p.mu.Lock()
	select {
	case pr := <-wt.ch:
		// Granted (or failed) while we gave up: hand the slot on.
		p.mu.Unlock()
		if pr != nil {
			p.release(pr)
		}
		return nil, err
	default:
	}
	wt.abandoned = true
	p.queued--
	p.mu.Unlock()
	return nil, err
}

// abortQueuedLocked refuses every queued call with err; it returns how
// many it refused.
func (p *Pool) abortQueuedLocked(err error) int {
	n := 0
	abort := func(ws []*waiter) {
		for _, wt := range ws {
			if wt != nil && !wt.abandoned {
				wt.err = err
				wt.abandoned = true
				p.queued--
				wt.ch <- nil
				n++
			}
		}
	}
	abort(p.waiters)
	p.waiters = nil
	for _, pr := range p.ready {
		abort(pr.waiters)
		pr.waiters = nil
	}
	return n
}

// errTargetGone reports that the worker a call waited for left service.
var errTargetGone = errors.New("the worker left service while the call waited for it")

// allTaintedLocked reports whether every slot is in its taint cool-down.
func (p *Pool) allTaintedLocked() bool {
	now := time.Now()
	for _, s := range p.slots {
		if !now.Before(s.taintedUntil) {
			return false
		}
	}
	return true
}

// retryAfter suggests when a refused call may succeed: about the time a
// call takes, at least 10 ms.
func (p *Pool) retryAfter() time.Duration {
	q, _ := p.latency.quantiles(0.5)
	return max(q[0], 10*time.Millisecond)
}

// execute runs one call in the pool. With emit set, the call is a stream:
// each item the tool yields goes to emit.
func (p *Pool) execute(ctx context.Context, req *call.Request, arrived time.Time, emit func([]byte) error) (*call.Result, error) {
	p.mu.Lock()
	t, ok := p.tools[req.Tool]
	var known []string
	if !ok && p.tools != nil {
		known = p.names
	}
	hasTools := p.tools != nil
	p.mu.Unlock()
	if !ok && hasTools {
		return nil, &call.UnknownToolError{Pool: p.cfg.Name, Tool: req.Tool, Known: known}
	}
	if ok && t.Streaming && emit == nil {
		return nil, &call.InvalidArgumentError{Field: "tool", Reason: fmt.Sprintf("%s yields a stream: call ExecuteStream (spctl exec --stream)", req.Tool)}
	}
	emitted := false
	if emit != nil {
		inner := emit
		emit = func(b []byte) error { emitted = true; return inner(b) }
	}
	res, err := p.executeOnce(ctx, req, arrived, emit)
	var ee *worker.ExitError
	if err != nil && req.Idempotent && !emitted && errors.As(err, &ee) && ctx.Err() == nil {
		p.log.Info().Str("request_id", req.RequestID).Uint64("worker_id", uint64(ee.ID)).Uint64("generation", uint64(ee.Generation)).Msg("retrying idempotent call after worker exit")
		p.eng.obs.Retried("worker_exited")
		res, err = p.executeOnce(ctx, req, arrived, emit)
	}
	if err != nil {
		p.errors.Add(1)
	} else {
		p.served.Add(1)
	}
	took := time.Since(arrived)
	p.latency.record(took)
	p.eng.obs.Observe(p.cfg.Name, res, err, took)
	return res, err
}

func (p *Pool) executeOnce(ctx context.Context, req *call.Request, arrived time.Time, emit func([]byte) error) (*call.Result, error) {
	var (
		pr      *proc
		outcome call.SessionOutcome
		err     error
	)
	if req.SessionID != "" {
		pr, outcome, err = p.acquireSession(ctx, req, p.pol.AffinityFor(req.Affinity))
		if err == nil {
			defer p.callDone(req.SessionID)
		}
	} else {
		pr, err = p.acquire(ctx, req)
	}
	queued := time.Since(arrived)
	if err != nil {
		if errors.Is(err, context.DeadlineExceeded) {
			return nil, &call.DeadlineError{Pool: p.cfg.Name, Stage: call.StageQueued, Queued: queued}
		}
		return nil, err
	}
	var timeout time.Duration
	if dl, ok := ctx.Deadline(); ok {
		timeout = time.Until(dl)
		if timeout <= 0 {
			p.release(pr)
			return nil, &call.DeadlineError{Pool: p.cfg.Name, Stage: call.StageQueued, Queued: queued}
		}
	}
	wc := &worker.Call{
		Tool:             req.Tool,
		Args:             req.Args,
		SessionID:        req.SessionID,
		RequestID:        req.RequestID,
		CorrelationID:    req.CorrelationID,
		Timeout:          timeout,
		SessionTransient: outcome == call.SessionUnavailable,
	}
	var payload []byte
	if emit != nil {
		payload, err = pr.w.Stream(ctx, wc, p.cfg.StreamWindow, emit)
	} else {
		payload, err = pr.w.Call(ctx, wc)
	}
	ran := time.Since(arrived) - queued
	if err != nil {
		var te *worker.ToolError
		if errors.Is(err, context.DeadlineExceeded) || (errors.As(err, &te) && te.Kind == worker.KindCancelled && errors.Is(ctx.Err(), context.DeadlineExceeded)) {
			return nil, &call.DeadlineError{Pool: p.cfg.Name, Stage: call.StageRunning, Queued: queued, Ran: ran}
		}
		return nil, err
	}
	return &call.Result{
		Payload:    payload,
		Node:       p.eng.cfg.NodeID,
		Pool:       p.cfg.Name,
		WorkerID:   pr.w.ID(),
		Generation: pr.w.Generation(),
		Queued:     queued,
		Ran:        ran,
		Session:    outcome,
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
	Name       string
	State      PoolState
	Reason     string
	Adapter    string
	Size       int
	Capacity   int
	Ready      int
	Busy       int
	Queued     int
	QueueDepth int
	Served     uint64
	Errors     uint64
	Rejected   uint64
	P50, P90   time.Duration
	P99, Max   time.Duration
	Workers    []WorkerStatus
	Tools      []worker.Tool
	Restarts   map[string]uint64
	// Tainted is true while a worker is in its cool-down after crashing
	// past the restart budget.
	Tainted bool
	// Sessions is the number of live sessions.
	Sessions int
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
	GPUs       []string
	Sessions   int
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
		Restarts: p.Restarts(),
		Sessions: len(p.sessions),
	}
	now := time.Now()
	for _, s := range p.slots {
		if now.Before(s.taintedUntil) {
			st.Tainted = true
		}
	}
	for _, s := range p.slots {
		ws := WorkerStatus{ID: s.id, Capacity: p.cfg.Capacity, State: "starting"}
		ws.GPUs = p.slotGPUsLocked(s)
		if pr := s.cur; pr != nil {
			ws.Generation = pr.w.Generation()
			ws.PID = pr.w.PID()
			ws.State = pr.w.State().String()
			ws.InFlight = pr.busy
			ws.Served = pr.w.Served()
			ws.Started = pr.w.Started()
			ws.Sessions = pr.sessions
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

// counts returns the calls running and queued, and the sessions, for a
// drain's report.
func (p *Pool) counts() (busy, queued, sessions int) {
	busy, queued = p.inFlight()
	p.mu.Lock()
	defer p.mu.Unlock()
	return busy, queued, len(p.sessions)
}

// cancelAll refuses every queued call with err and cancels every running
// one in Python; it returns how many it ended.
func (p *Pool) cancelAll(err error) int {
	p.mu.Lock()
	n := p.abortQueuedLocked(err)
	procs := slices.Clone(p.ready)
	p.mu.Unlock()
	for _, pr := range procs {
		n += pr.w.CancelAll()
	}
	return n
}

// serving reports whether the pool can take calls: a ready worker, and
// the pool ready or degraded.
func (p *Pool) serving() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.ready) > 0 && (p.state == PoolReady || p.state == PoolDegraded)
}

// load is calls in flight plus queued per ready worker slot.
func (p *Pool) load() float64 {
	busy, queued := p.inFlight()
	p.mu.Lock()
	slots := len(p.ready) * p.cfg.Capacity
	p.mu.Unlock()
	if slots == 0 {
		return float64(busy+queued) + 1 // nothing ready: as loaded as can be
	}
	return float64(busy+queued) / float64(slots)
}

var nan = math.NaN()
