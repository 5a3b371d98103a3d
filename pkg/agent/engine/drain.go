package agent

import (
	"context"
	"errors"
	"time"
)

// ErrDraining reports a call refused because the node is draining: it was
// not executed, so a router may send it to another node at once.
var ErrDraining = errors.New("node is draining: call not executed here (another node can take it)")

// ErrCordoned reports a routed call refused because the node is cordoned
// and does not hold the call's session: it was not executed, and the router
// that sent it places it on the next node. A cordoned node keeps serving the
// sessions it holds (docs/operations.md).
var ErrCordoned = errors.New("node is cordoned and takes no new sessions or sessionless work: call not executed here (another node can take it)")

// acceptWhileCordoned says whether a routed call may run on a cordoned (not
// draining) node: only a call of a session the node holds.
func (n *Node) acceptWhileCordoned(p *Pool, req *Request) bool {
	if req.SessionID == "" {
		return false
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.sessions[req.SessionID] != nil
}

// DefaultDrainDeadline bounds a drain that names no deadline.
const DefaultDrainDeadline = 5 * time.Minute

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

// acceptWhileDraining says whether a call may still run here during a
// drain: only a call of a session that has a call running here (its state
// is here until that call ends).
func (n *Node) acceptWhileDraining(p *Pool, req *Request) bool {
	if req.SessionID == "" {
		return false
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	s := p.sessions[req.SessionID]
	return s != nil && s.inFlight > 0
}

// Drain cordons the node and marks it draining (persistently; routers stop
// sending it work and hand its sessions to their next owners). The node
// then waits, on its own, until no call runs or is queued; at the deadline
// it cancels the calls still running (in Python) and refuses the queued
// ones. Drain reports progress to report every 100 ms until the node is
// drained; "drained" is reported only once no call runs. ctx ending (the
// operator's client going away) stops the reports, not the drain: the node
// stays draining until Uncordon.
func (n *Node) Drain(ctx context.Context, deadline time.Duration, report func(DrainProgress) error) error {
	if deadline <= 0 {
		deadline = DefaultDrainDeadline
	}
	if _, err := n.intent.update(func(i *Intent) { i.Cordoned, i.Draining = true, true }); err != nil {
		return err
	}
	d := n.startDrain(deadline)
	t := time.NewTicker(drainTick)
	defer t.Stop()
	for {
		select {
		case <-d.done:
			pr := n.drainState()
			pr.Drained, pr.Cancelled = true, d.cancelled
			return report(pr)
		default:
		}
		pr := n.drainState()
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
func (n *Node) startDrain(deadline time.Duration) *drainRun {
	n.drainMu.Lock()
	defer n.drainMu.Unlock()
	if n.drain != nil {
		select {
		case <-n.drain.done:
		default:
			return n.drain
		}
	}
	d := &drainRun{end: time.Now().Add(deadline), done: make(chan struct{})}
	n.drain = d
	n.log.Info().Dur("deadline", deadline).Msg("draining")
	go n.watchDrain(d)
	return d
}

func (n *Node) watchDrain(d *drainRun) {
	defer close(d.done)
	t := time.NewTicker(drainTick)
	defer t.Stop()
	cancelled := false
	for {
		st := n.drainState()
		if st.InFlight == 0 && st.Queued == 0 {
			n.log.Info().Int("cancelled", d.cancelled).Msg("drained")
			return
		}
		if !cancelled && !time.Now().Before(d.end) {
			d.cancelled = n.cancelAll()
			cancelled = true
			n.log.Warn().Int("cancelled", d.cancelled).Msg("drain deadline passed; cancelled the remaining calls")
		}
		select {
		case <-n.runDone:
			return
		case <-t.C:
		}
	}
}

func (n *Node) drainState() DrainProgress {
	var d DrainProgress
	for _, name := range n.order {
		p := n.pools[name]
		busy, queued := p.inFlight()
		d.InFlight += busy
		d.Queued += queued
		p.mu.Lock()
		d.Sessions += len(p.sessions)
		p.mu.Unlock()
	}
	return d
}

// cancelAll cancels every running call in Python and refuses every queued
// one; it returns how many calls it ended.
func (n *Node) cancelAll() int {
	total := 0
	for _, name := range n.order {
		p := n.pools[name]
		p.mu.Lock()
		total += p.abortQueuedLocked(ErrDraining)
		procs := append([]*proc(nil), p.ready...)
		p.mu.Unlock()
		for _, pr := range procs {
			total += pr.w.CancelAll()
		}
	}
	return total
}

// SessionMove says where a session would go if this node drained.
type SessionMove struct {
	ID, Pool string
	// Next is the node that would own it next; "" when no other node
	// serves its pool.
	Next string
}

// drainPlan lists the node's sessions and their next owners. The node asks
// NextOwner, which cluster routing sets; a standalone node has no other
// owner to offer.
func (n *Node) drainPlan() []SessionMove {
	var out []SessionMove
	for _, name := range n.order {
		for _, s := range n.pools[name].sessionList() {
			m := SessionMove{ID: s.ID, Pool: name}
			if n.NextOwner != nil {
				m.Next = n.NextOwner(name, s.ID)
			}
			out = append(out, m)
		}
	}
	return out
}
