package engine

import (
	"github.com/snakepit/snakepit/pkg/agent/call"

	"errors"
	"fmt"
	"slices"
	"time"
)

// errNotRunning reports a resize of a pool that is not running.
var errNotRunning = errors.New("pool is not running")

// resize changes the number of worker slots to size. Growing starts new
// workers (the pool is degraded until they are ready). Shrinking removes
// slots whose workers are idle first (no call, then no session), then busy
// ones; a removed worker takes no new calls, finishes those it holds for
// at most deadline, and is stopped. It returns the previous size.
func (p *Pool) resize(size int, deadline time.Duration) (int, error) {
	if size < 1 {
		return 0, &call.InvalidArgumentError{Field: "size", Reason: fmt.Sprintf("must be at least 1 (got %d); to stop serving a pool, drain the node", size)}
	}
	if deadline <= 0 {
		deadline = p.cfg.RecycleDrainTimeout
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	prev := len(p.slots)
	if p.runCtx == nil || p.state == PoolStopping {
		return prev, errNotRunning
	}
	switch {
	case size > prev:
		if p.exclusiveGPUs() {
			if free := p.eng.gpuBook.available(p.cfg); free < size-prev {
				return prev, &call.InvalidArgumentError{Field: "size", Reason: fmt.Sprintf(
					"pool %q is exclusive with gpus.per_worker=%d: GPUs are free for %d more worker(s), not %d (every other GPU is held by a worker of an exclusive pool or used by a shared one; a retiring worker keeps its GPUs until it stops)",
					p.cfg.Name, p.cfg.GPUs.PerWorker, free, size-prev)}
			}
		}
		for i := prev; i < size; i++ {
			s := newSlot(p.nextSlot)
			p.nextSlot++
			if p.exclusiveGPUs() {
				g, err := p.eng.gpuBook.take(p.cfg)
				if err != nil {
					return prev, err // available said there were enough
				}
				s.gpus = g
			}
			p.slots = append(p.slots, s)
			p.startSupervisorLocked(p.runCtx, s)
		}
	case size < prev:
		order := slices.Clone(p.slots)
		rank := func(s *slot) int {
			switch {
			case s.cur == nil:
				return 0 // nothing running there yet
			case s.cur.busy == 0 && s.cur.sessions == 0:
				return 1
			case s.cur.busy == 0:
				return 2
			}
			return 3
		}
		slices.SortStableFunc(order, func(a, b *slot) int {
			if ra, rb := rank(a), rank(b); ra != rb {
				return ra - rb
			}
			return int(b.id) - int(a.id) // newest slots first
		})
		for _, s := range order[:prev-size] {
			s.stopDeadline = deadline
			close(s.stop)
			p.slots = slices.DeleteFunc(p.slots, func(o *slot) bool { return o == s })
		}
	}
	p.updateStateLocked()
	p.log.Info().Int("from", prev).Int("to", size).Msg("pool resized")
	return prev, nil
}
