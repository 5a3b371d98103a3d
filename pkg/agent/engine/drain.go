package engine

import (
	"context"
	"time"

	"github.com/snakepit/snakepit/pkg/agent/call"
)

// drainTick is how often a drain reports progress.
const drainTick = 100 * time.Millisecond

// DrainProgress is one report of a drain.
type DrainProgress struct {
	InFlight  int
	Queued    int
	Sessions  int
	Remaining time.Duration
	Drained   bool
	Cancelled int
}

// Drain cordons the node and marks it draining (persistently; routers stop
// sending it work and hand its sessions to their next owners). The node
// then waits, on its own, until no call runs or is queued; at the deadline
// it cancels the calls still running (in Python) and refuses the queued
// ones. Drain reports progress to report every 100 ms until the node is
// drained; "drained" is reported only once no call runs. ctx ending (the
// operator's client going away) stops the reports, not the drain: the node
// stays draining until Uncordon.
func (e *Engine) Drain(ctx context.Context, deadline time.Duration, report func(DrainProgress) error) error {
	if deadline <= 0 {
		deadline = e.cfg.DrainDeadline
	}
	if _, err := e.intent.update(func(i *Intent) { i.Cordoned, i.Draining = true, true }); err != nil {
		return err
	}
	d := e.startDrain(deadline)
	t := time.NewTicker(drainTick)
	defer t.Stop()
	for {
		select {
		case <-d.done:
			pr := e.DrainState()
			pr.Drained, pr.Cancelled = true, d.cancelled
			return report(pr)
		default:
		}
		pr := e.DrainState()
		pr.Remaining = max(0, time.Until(d.end))
		if err := report(pr); err != nil {
			return err
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-d.done:
		case <-t.C:
		}
	}
}

// drainRun is the node's one drain in progress.
type drainRun struct {
	end       time.Time
	done      chan struct{}
	cancelled int // set before done closes
}

// startDrain starts the drain's watch, or joins the one running.
func (e *Engine) startDrain(deadline time.Duration) *drainRun {
	e.drainMu.Lock()
	defer e.drainMu.Unlock()
	if e.drain != nil {
		select {
		case <-e.drain.done:
		default:
			return e.drain
		}
	}
	d := &drainRun{end: time.Now().Add(deadline), done: make(chan struct{})}
	e.drain = d
	e.log.Info().Dur("deadline", deadline).Msg("draining")
	go e.watchDrain(d)
	return d
}

func (e *Engine) watchDrain(d *drainRun) {
	defer close(d.done)
	t := time.NewTicker(drainTick)
	defer t.Stop()
	cancelled := false
	for {
		st := e.DrainState()
		if st.InFlight == 0 && st.Queued == 0 {
			e.log.Info().Int("cancelled", d.cancelled).Msg("drained")
			return
		}
		if !cancelled && !time.Now().Before(d.end) {
			d.cancelled = e.cancelAll()
			cancelled = true
			e.log.Warn().Int("cancelled", d.cancelled).Msg("drain deadline passed; cancelled the remaining calls")
		}
		select {
		case <-e.runDone:
			return
		case <-t.C:
		}
	}
}

// DrainState reports the calls and sessions a drain waits for.
func (e *Engine) DrainState() DrainProgress {
	var d DrainProgress
	for _, name := range e.order {
		busy, queued, sessions := e.pools[name].counts()
		d.InFlight += busy
		d.Queued += queued
		d.Sessions += sessions
	}
	return d
}

// cancelAll cancels every running call in Python and refuses every queued
// one; it returns how many calls it ended.
func (e *Engine) cancelAll() int {
	total := 0
	for _, name := range e.order {
		total += e.pools[name].cancelAll(call.ErrDraining)
	}
	return total
}
