package engine

import (
	"context"
	"slices"
	"time"

	"github.com/snakepit/snakepit/pkg/agent/call"
	"github.com/snakepit/snakepit/pkg/agent/policy"
	"github.com/snakepit/snakepit/pkg/worker"
)

// session is a session id bound to a worker process of a pool. Guarded by
// Pool.mu.
type session struct {
	id       string
	pr       *proc
	created  time.Time
	lastUsed time.Time
	calls    uint64
	inFlight int
}

// acquireSession reserves a worker slot for a call of a session, binding
// the session on its first call, and says what the call will find of the
// session's state. The affinity policy decides what happens when the
// session's worker is busy or gone; the worker selector chooses among the
// others.
func (p *Pool) acquireSession(ctx context.Context, req *call.Request, aff policy.AffinityPolicy) (*proc, call.SessionOutcome, error) {
	now := time.Now()
	p.mu.Lock()
	s := p.sessions[req.SessionID]
	if s != nil && s.pr != nil && s.pr.live {
		pr := s.pr
		s.lastUsed = now
		switch aff.WorkerBusy() {
		case policy.RunElsewhere: // anywhere now; state only where it lives
			if i := p.pol.Worker.Pick(&p.ready, policy.Purpose{Bound: p.ready.index(pr)}); i >= 0 {
				got := p.ready[i]
				got.busy++
				p.noteCallLocked(s)
				p.mu.Unlock()
				return got, outcomeOn(got, pr), nil
			}
			got, err := p.queueLocked(ctx, nil, req)
			if err != nil {
				return nil, 0, err
			}
			p.mu.Lock()
			outcome := outcomeOn(got, s.pr)
			p.noteCallLocked(s)
			p.mu.Unlock()
			return got, outcome, nil
		default:
			if pr.busy < pr.w.Capacity() {
				pr.busy++
				p.noteCallLocked(s)
				p.mu.Unlock()
				return pr, call.SessionBound, nil
			}
		}
		if aff.WorkerBusy() == policy.RefuseBusy {
			p.mu.Unlock()
			return nil, 0, &call.SessionBusyError{Pool: p.cfg.Name, SessionID: s.id, WorkerID: pr.w.ID(), Generation: pr.w.Generation(), RetryAfter: p.retryAfter()}
		}
		got, err := p.queueLocked(ctx, pr, req)
		if err == errTargetGone {
			return p.lost(s, pr, aff.Mode())
		}
		if err != nil {
			return nil, 0, err
		}
		p.mu.Lock()
		p.noteCallLocked(s)
		p.mu.Unlock()
		return got, call.SessionBound, nil
	}
	outcome := call.SessionNew
	if s != nil {
		// The worker that held the state is gone.
		if aff.WorkerGone() == policy.Lose {
			pr := s.pr
			p.mu.Unlock()
			return p.lost(s, pr, aff.Mode())
		}
		outcome = call.SessionReset
		p.unbindLocked(s)
	} else {
		if ok, wait := p.eng.sessRate.allow(req.Client, now); !ok {
			p.mu.Unlock()
			return nil, 0, &call.SessionRateError{Client: req.Client, Rate: p.eng.cfg.NewSessionsPerSecond, RetryAfter: wait}
		}
		if p.eng.sessions.Load() >= int64(p.eng.cfg.MaxSessions) {
			p.mu.Unlock()
			return nil, 0, &call.SessionLimitError{Pool: p.cfg.Name, Limit: "max_sessions", Max: p.eng.cfg.MaxSessions}
		}
		s = &session{id: req.SessionID, created: now}
		p.sessions[s.id] = s
		p.eng.sessions.Add(1)
	}
	s.lastUsed = now
	if i := p.pol.Worker.Pick(&p.ready, policy.Purpose{NewSession: true, Bound: -1}); i >= 0 {
		best := p.ready[i]
		best.busy++
		p.bindLocked(s, best)
		p.noteCallLocked(s)
		p.mu.Unlock()
		return best, outcome, nil
	}
	roomy := false
	for _, pr := range p.ready {
		if !pr.recycling && pr.sessions < p.cfg.MaxSessionsPerWorker {
			roomy = true
			break
		}
	}
	if !roomy && len(p.ready) > 0 {
		p.dropLocked(s)
		p.mu.Unlock()
		return nil, 0, &call.SessionLimitError{Pool: p.cfg.Name, Limit: "max_sessions_per_worker", Max: p.cfg.MaxSessionsPerWorker}
	}
	got, err := p.queueLocked(ctx, nil, req)
	p.mu.Lock()
	if err == nil && got.sessions >= p.cfg.MaxSessionsPerWorker {
		err = &call.SessionLimitError{Pool: p.cfg.Name, Limit: "max_sessions_per_worker", Max: p.cfg.MaxSessionsPerWorker}
		p.mu.Unlock()
		p.release(got)
		p.mu.Lock()
	}
	if err != nil {
		if s.pr == nil && p.sessions[s.id] == s {
			p.dropLocked(s) // not bound: do not keep it
		}
		p.mu.Unlock()
		return nil, 0, err
	}
	p.bindLocked(s, got)
	p.noteCallLocked(s)
	p.mu.Unlock()
	return got, outcome, nil
}

// outcomeOn says what a session call running on got finds of the state
// that held keeps.
func outcomeOn(got, held *proc) call.SessionOutcome {
	if got == held {
		return call.SessionBound
	}
	return call.SessionUnavailable
}

// holds reports whether the pool has a session of that id (a cordoned
// node keeps serving those).
func (p *Pool) holds(id string) bool {
	if id == "" {
		return false
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.sessions[id] != nil
}

// acceptWhileDraining says whether a call may still run here during a
// drain: only a call of a session that has a call running here (its state
// is here until that call ends).
func (p *Pool) acceptWhileDraining(req *call.Request) bool {
	if req.SessionID == "" {
		return false
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	s := p.sessions[req.SessionID]
	return s != nil && s.inFlight > 0
}

// lost drops a session whose worker is gone and reports it to a strict
// call.
func (p *Pool) lost(s *session, pr *proc, mode call.Affinity) (*proc, call.SessionOutcome, error) {
	p.mu.Lock()
	if p.sessions[s.id] == s {
		p.dropLocked(s)
	}
	p.mu.Unlock()
	err := &call.SessionLostError{Pool: p.cfg.Name, SessionID: s.id, Mode: mode}
	if pr != nil {
		err.WorkerID, err.Generation = pr.w.ID(), pr.w.Generation()
	}
	return nil, 0, err
}

func (p *Pool) noteCallLocked(s *session) {
	s.calls++
	s.inFlight++
}

// callDone ends a session call's bookkeeping.
func (p *Pool) callDone(id string) {
	p.mu.Lock()
	// The session may have been closed and opened again during the call;
	// a fresh one has nothing in flight to count down.
	if s := p.sessions[id]; s != nil && s.inFlight > 0 {
		s.inFlight--
		s.lastUsed = time.Now()
	}
	p.mu.Unlock()
}

func (p *Pool) bindLocked(s *session, pr *proc) {
	s.pr = pr
	pr.sessions++
}

func (p *Pool) unbindLocked(s *session) {
	if s.pr != nil {
		s.pr.sessions--
		s.pr = nil
	}
}

// dropLocked forgets a session; it returns the worker that held its state,
// if that one is still alive.
func (p *Pool) dropLocked(s *session) *proc {
	pr := s.pr
	p.unbindLocked(s)
	delete(p.sessions, s.id)
	p.eng.sessions.Add(-1)
	if pr != nil && pr.live {
		return pr
	}
	return nil
}

// closeSession drops a session and its state in Python.
func (p *Pool) closeSession(id string) bool {
	p.mu.Lock()
	s := p.sessions[id]
	if s == nil {
		p.mu.Unlock()
		return false
	}
	pr := p.dropLocked(s)
	p.mu.Unlock()
	if pr != nil {
		if err := pr.w.CloseSession(id); err != nil {
			p.log.Debug().Err(err).Str("session_id", id).Msg("closing session in worker")
		}
	}
	return true
}

// expireSessions drops the sessions idle for longer than
// session_idle_timeout.
func (p *Pool) expireSessions(now time.Time) {
	type victim struct {
		id string
		pr *proc
	}
	var victims []victim
	p.mu.Lock()
	for id, s := range p.sessions {
		if s.inFlight == 0 && now.Sub(s.lastUsed) > p.cfg.SessionIdleTimeout {
			victims = append(victims, victim{id, p.dropLocked(s)})
		}
	}
	p.mu.Unlock()
	for _, v := range victims {
		p.log.Debug().Str("session_id", v.id).Msg("session expired")
		if v.pr != nil {
			_ = v.pr.w.CloseSession(v.id)
		}
	}
}

// SessionStatus is a snapshot of one session.
type SessionStatus struct {
	ID         string
	Pool       string
	WorkerID   worker.ID
	Generation worker.Generation
	Created    time.Time
	LastUsed   time.Time
	Calls      uint64
	InFlight   int
	// Lost is true when its worker is gone (the next call will say so).
	Lost bool
}

func (p *Pool) sessionList() []SessionStatus {
	p.mu.Lock()
	defer p.mu.Unlock()
	out := make([]SessionStatus, 0, len(p.sessions))
	for _, s := range p.sessions {
		st := SessionStatus{ID: s.id, Pool: p.cfg.Name, Created: s.created, LastUsed: s.lastUsed, Calls: s.calls, InFlight: s.inFlight}
		if s.pr != nil {
			st.WorkerID, st.Generation = s.pr.w.ID(), s.pr.w.Generation()
			st.Lost = !s.pr.live
		}
		out = append(out, st)
	}
	slices.SortFunc(out, func(a, b SessionStatus) int {
		if a.ID < b.ID {
			return -1
		}
		if a.ID > b.ID {
			return 1
		}
		return 0
	})
	return out
}
