package agent

import (
	"context"
	"fmt"
	"slices"
	"time"

	"github.com/snakepit/snakepit/pkg/worker"
)

// Affinity says how strictly a session's call must run on the worker that
// holds the session's state (DESIGN.md decision 4, node-local half).
type Affinity int

// Affinity modes.
const (
	// AffinityHint prefers the session's worker; when it is busy another
	// worker runs the call with an empty, throwaway session store, and the
	// result says SessionUnavailable.
	AffinityHint Affinity = iota
	// AffinityStrictQueue waits for the session's worker, within the
	// call's deadline and the queue's limits.
	AffinityStrictQueue
	// AffinityStrictFailFast fails at once when the session's worker is busy.
	AffinityStrictFailFast
)

func (a Affinity) String() string {
	switch a {
	case AffinityHint:
		return "hint"
	case AffinityStrictQueue:
		return "strict_queue"
	case AffinityStrictFailFast:
		return "strict_fail_fast"
	}
	return fmt.Sprintf("affinity(%d)", int(a))
}

// SessionOutcome says what a call of a session found of its state.
type SessionOutcome int

// Session outcomes.
const (
	SessionNone        SessionOutcome = iota // the call had no session
	SessionNew                               // bound to a worker by this call
	SessionBound                             // ran where its state is
	SessionUnavailable                       // hint: ran elsewhere, state not there
	SessionReset                             // its worker was gone: state lost, bound afresh
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

// SessionLostError reports a strict-affinity call whose session's worker is
// gone: the state it held is lost. The session is dropped; the next call
// starts a new one.
type SessionLostError struct {
	Pool       string
	SessionID  string
	WorkerID   worker.ID
	Generation worker.Generation
	Mode       Affinity
}

func (e *SessionLostError) Error() string {
	return fmt.Sprintf("session %q lost its state: worker %d generation %d of pool %q is gone (affinity %s); call again to start the session afresh",
		e.SessionID, e.WorkerID, e.Generation, e.Pool, e.Mode)
}

// SessionBusyError reports a strict_fail_fast call whose session's worker
// is busy. Not executed.
type SessionBusyError struct {
	Pool       string
	SessionID  string
	WorkerID   worker.ID
	Generation worker.Generation
	RetryAfter time.Duration
}

func (e *SessionBusyError) Error() string {
	return fmt.Sprintf("session %q: its worker %d generation %d of pool %q is busy (affinity strict_fail_fast); not executed, retry after %s",
		e.SessionID, e.WorkerID, e.Generation, e.Pool, e.RetryAfter)
}

// SessionLimitError reports a call that would open a session past a limit.
type SessionLimitError struct {
	Pool  string
	Limit string // the config key
	Max   int
}

func (e *SessionLimitError) Error() string {
	return fmt.Sprintf("cannot open another session in pool %q: %s (%d) reached; close sessions (CloseSession) or raise the limit", e.Pool, e.Limit, e.Max)
}

// acquireSession reserves a worker slot for a call of a session, binding
// the session on its first call, and says what the call will find of the
// session's state.
func (p *Pool) acquireSession(ctx context.Context, req *Request) (*proc, SessionOutcome, error) {
	now := time.Now()
	p.mu.Lock()
	s := p.sessions[req.SessionID]
	if s != nil && s.pr != nil && s.pr.live {
		pr := s.pr
		s.lastUsed = now
		if pr.busy < pr.w.Capacity() {
			pr.busy++
			p.noteCallLocked(s)
			p.mu.Unlock()
			return pr, SessionBound, nil
		}
		switch req.Affinity {
		case AffinityStrictFailFast:
			p.mu.Unlock()
			return nil, 0, &SessionBusyError{Pool: p.cfg.Name, SessionID: s.id, WorkerID: pr.w.ID(), Generation: pr.w.Generation(), RetryAfter: p.retryAfter()}
		case AffinityStrictQueue:
			got, err := p.queueLocked(ctx, pr)
			if err == errTargetGone {
				return p.lost(s, pr, req.Affinity)
			}
			if err != nil {
				return nil, 0, err
			}
			p.mu.Lock()
			p.noteCallLocked(s)
			p.mu.Unlock()
			return got, SessionBound, nil
		default: // hint: anywhere now; state only where it lives
			if other := p.pickLocked(); other != nil {
				other.busy++
				p.noteCallLocked(s)
				p.mu.Unlock()
				return other, SessionUnavailable, nil
			}
			got, err := p.queueLocked(ctx, nil)
			if err != nil {
				return nil, 0, err
			}
			p.mu.Lock()
			outcome := SessionUnavailable
			if got == s.pr {
				outcome = SessionBound
			}
			p.noteCallLocked(s)
			p.mu.Unlock()
			return got, outcome, nil
		}
	}
	outcome := SessionNew
	if s != nil {
		// The worker that held the state is gone.
		if req.Affinity != AffinityHint {
			pr := s.pr
			p.mu.Unlock()
			return p.lost(s, pr, req.Affinity)
		}
		outcome = SessionReset
		p.unbindLocked(s)
	} else {
		if ok, wait := p.node.sessRate.allow(req.Client, now); !ok {
			p.mu.Unlock()
			return nil, 0, &SessionRateError{Client: req.Client, Rate: p.node.cfg.NewSessionsPerSecond, RetryAfter: wait}
		}
		if p.node.sessions.Load() >= int64(p.node.cfg.MaxSessions) {
			p.mu.Unlock()
			return nil, 0, &SessionLimitError{Pool: p.cfg.Name, Limit: "max_sessions", Max: p.node.cfg.MaxSessions}
		}
		s = &session{id: req.SessionID, created: now}
		p.sessions[s.id] = s
		p.node.sessions.Add(1)
	}
	s.lastUsed = now
	// Bind to the least-loaded worker with room for another session.
	var best *proc
	roomy := false
	for _, pr := range p.ready {
		if pr.recycling || pr.sessions >= p.cfg.MaxSessionsPerWorker {
			continue
		}
		roomy = true
		if pr.busy >= pr.w.Capacity() {
			continue
		}
		if best == nil || pr.busy < best.busy || (pr.busy == best.busy && pr.sessions < best.sessions) {
			best = pr
		}
	}
	if best != nil {
		best.busy++
		p.bindLocked(s, best)
		p.noteCallLocked(s)
		p.mu.Unlock()
		return best, outcome, nil
	}
	if !roomy && len(p.ready) > 0 {
		p.dropLocked(s)
		p.mu.Unlock()
		return nil, 0, &SessionLimitError{Pool: p.cfg.Name, Limit: "max_sessions_per_worker", Max: p.cfg.MaxSessionsPerWorker}
	}
	got, err := p.queueLocked(ctx, nil)
	p.mu.Lock()
	if err == nil && got.sessions >= p.cfg.MaxSessionsPerWorker {
		err = &SessionLimitError{Pool: p.cfg.Name, Limit: "max_sessions_per_worker", Max: p.cfg.MaxSessionsPerWorker}
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

// lost drops a session whose worker is gone and reports it to a strict
// call.
func (p *Pool) lost(s *session, pr *proc, mode Affinity) (*proc, SessionOutcome, error) {
	p.mu.Lock()
	if p.sessions[s.id] == s {
		p.dropLocked(s)
	}
	p.mu.Unlock()
	err := &SessionLostError{Pool: p.cfg.Name, SessionID: s.id, Mode: mode}
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
	p.node.sessions.Add(-1)
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
