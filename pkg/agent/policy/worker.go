package policy

// sessionSticky (the default) runs a session's call on the worker that
// holds its state whenever that worker is free; binds a new session to the
// least loaded worker, ties to the one with the fewest sessions (spreading
// state); and runs a sessionless call on the least loaded worker, ties to
// the warmest (the one that finished a call last: its caches are hot).
type sessionSticky struct{}

func newSessionSticky(env Env, opts Options) (WorkerSelector, error) {
	return sessionSticky{}, env.Options(opts).Err()
}

func (sessionSticky) Pick(ws Workers, p Purpose) int {
	if p.Bound >= 0 && ws.At(p.Bound).HasRoom() {
		return p.Bound
	}
	best := -1
	var bw Worker
	for i := range ws.Len() {
		w := ws.At(i)
		if !w.Free() || p.NewSession && !w.SessionRoom {
			continue
		}
		if best < 0 || w.Busy < bw.Busy || w.Busy == bw.Busy && better(w, bw, p.NewSession) {
			best, bw = i, w
		}
	}
	return best
}

// better breaks a tie of load: fewer sessions for a new session, else the
// warmer worker.
func better(w, than Worker, newSession bool) bool {
	if newSession && w.Sessions != than.Sessions {
		return w.Sessions < than.Sessions
	}
	return w.LastUsed > than.LastUsed
}

// leastLoaded runs every call on the free worker with the fewest calls,
// ties to the warmest, sessions or not: a session's call runs where its
// state is only when that worker is the least loaded (under hint affinity
// it runs elsewhere and says SessionUnavailable). For pools whose session
// state is a cache.
type leastLoaded struct{}

func newLeastLoaded(env Env, opts Options) (WorkerSelector, error) {
	return leastLoaded{}, env.Options(opts).Err()
}

func (leastLoaded) Pick(ws Workers, p Purpose) int {
	best := -1
	var bw Worker
	for i := range ws.Len() {
		w := ws.At(i)
		if !w.Free() || p.NewSession && !w.SessionRoom {
			continue
		}
		if best < 0 || w.Busy < bw.Busy || w.Busy == bw.Busy && w.LastUsed > bw.LastUsed || w.Busy == bw.Busy && w.LastUsed == bw.LastUsed && i == p.Bound {
			best, bw = i, w
		}
	}
	return best
}

// mostRecentlyUsed runs a call on the warmest free worker (the one that
// finished a call last), whatever the load: a lightly loaded pool keeps
// one worker hot and lets the others idle, where max_age or max_memory_mb
// can recycle them undisturbed. A session's call runs on its worker when
// that one has room (a recycling worker still serves its sessions).
type mostRecentlyUsed struct{}

func newMostRecentlyUsed(env Env, opts Options) (WorkerSelector, error) {
	return mostRecentlyUsed{}, env.Options(opts).Err()
}

func (mostRecentlyUsed) Pick(ws Workers, p Purpose) int {
	if p.Bound >= 0 && ws.At(p.Bound).HasRoom() {
		return p.Bound
	}
	best := -1
	var bw Worker
	for i := range ws.Len() {
		w := ws.At(i)
		if !w.Free() || p.NewSession && !w.SessionRoom {
			continue
		}
		if best < 0 || w.LastUsed > bw.LastUsed || w.LastUsed == bw.LastUsed && w.Busy < bw.Busy {
			best, bw = i, w
		}
	}
	return best
}
