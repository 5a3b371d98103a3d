package policy_test

import (
	"testing"

	"github.com/snakepit/snakepit/pkg/agent/policy"
)

// workers is a pool's workers as a selector reads them. Selectors get a
// *workers: a pointer in an interface does not allocate.
type workers []policy.Worker

func (w *workers) Len() int               { return len(*w) }
func (w *workers) At(i int) policy.Worker { return (*w)[i] }

// Worker shorthands: free (idle, of capacity c), busy (b of c), with
// sessions and LastUsed set by the helpers below.
func idle(c int) policy.Worker    { return policy.Worker{Capacity: c, SessionRoom: true} }
func busy(b, c int) policy.Worker { return policy.Worker{Busy: b, Capacity: c, SessionRoom: true} }

func used(w policy.Worker, last uint64) policy.Worker { w.LastUsed = last; return w }
func sess(w policy.Worker, n int) policy.Worker       { w.Sessions = n; return w }
func noRoom(w policy.Worker) policy.Worker            { w.SessionRoom = false; return w }
func recycling(w policy.Worker) policy.Worker         { w.Recycling = true; return w }

var (
	sessionless = policy.Purpose{Bound: -1}
	newSession  = policy.Purpose{NewSession: true, Bound: -1}
)

func bound(i int) policy.Purpose { return policy.Purpose{Bound: i} }

type pickCase struct {
	name string
	ws   workers
	p    policy.Purpose
	want int
}

func runPicks(t *testing.T, sel policy.WorkerSelector, cases []pickCase) {
	t.Helper()
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			ws := tc.ws
			if got := sel.Pick(&ws, tc.p); got != tc.want {
				t.Errorf("Pick(%+v, %+v) = %d, want %d", tc.ws, tc.p, got, tc.want)
			}
		})
	}
}

// commonPicks hold for every shipped worker selector.
func commonPicks() []pickCase {
	return []pickCase{
		{"no workers", nil, sessionless, -1},
		{"no workers new session", nil, newSession, -1},
		{"only worker", workers{busy(1, 2)}, sessionless, 0},
		{"all full", workers{busy(1, 1), busy(4, 4)}, sessionless, -1},
		{"all recycling", workers{recycling(idle(1)), recycling(idle(2))}, sessionless, -1},
		{"zero capacity", workers{idle(0)}, sessionless, -1},
		{"full skipped", workers{used(busy(1, 1), 9), used(busy(2, 4), 1)}, sessionless, 1},
		{"recycling skipped", workers{used(recycling(idle(4)), 9), used(busy(3, 4), 1)}, sessionless, 1},
		{"new session needs room", workers{used(noRoom(idle(4)), 9), used(busy(3, 4), 1)}, newSession, 1},
		{"new session, no room anywhere", workers{noRoom(idle(4)), noRoom(busy(1, 4))}, newSession, -1},
		{"sessionless ignores room", workers{noRoom(idle(4))}, sessionless, 0},
		{"bound full, none free", workers{busy(1, 1), busy(2, 2)}, bound(0), -1},
		{"recycling bound full, none free", workers{recycling(busy(1, 1)), busy(2, 2)}, bound(0), -1},
	}
}

func TestSessionSticky(t *testing.T) {
	sel := workerSelector(t, policy.SessionSticky, nil)
	runPicks(t, sel, append(commonPicks(),
		pickCase{"least loaded", workers{busy(2, 4), busy(1, 4), busy(3, 4)}, sessionless, 1},
		pickCase{"least loaded whatever warmth", workers{used(busy(2, 4), 9), used(busy(1, 4), 1)}, sessionless, 1},
		pickCase{"tie to the warmest", workers{used(busy(1, 4), 5), used(busy(1, 4), 9), used(busy(1, 4), 7)}, sessionless, 1},
		pickCase{"full tie to the first", workers{used(busy(1, 4), 5), used(busy(1, 4), 5)}, sessionless, 0},
		pickCase{"sessionless tie ignores sessions", workers{sess(used(idle(4), 9), 3), sess(used(idle(4), 1), 0)}, sessionless, 0},
		pickCase{"new session to the least loaded", workers{sess(busy(1, 4), 0), sess(idle(4), 5)}, newSession, 1},
		pickCase{"new session tie to fewer sessions", workers{sess(used(idle(4), 9), 3), sess(used(idle(4), 1), 1), sess(used(idle(4), 5), 2)}, newSession, 1},
		pickCase{"new session equal sessions to the warmest", workers{sess(used(idle(4), 1), 2), sess(used(idle(4), 9), 2)}, newSession, 1},
		pickCase{"new session skips roomless before fewer sessions", workers{sess(noRoom(idle(4)), 0), sess(idle(4), 3)}, newSession, 1},
		pickCase{"bound free honoured", workers{used(idle(4), 9), used(busy(3, 4), 1)}, bound(1), 1},
		pickCase{"bound free honoured without session room", workers{idle(4), noRoom(busy(1, 4))}, bound(1), 1},
		pickCase{"bound full falls back to least loaded", workers{busy(2, 4), busy(2, 2), busy(1, 4)}, bound(1), 2},
		pickCase{"bound recycling honoured while it has room", workers{recycling(busy(3, 4)), idle(4)}, bound(0), 0},
		pickCase{"bound recycling and full falls back", workers{recycling(busy(4, 4)), busy(1, 4)}, bound(0), 1},
		pickCase{"recycling skipped for a new session", workers{recycling(idle(4)), busy(3, 4)}, newSession, 1},
	))
}

func TestLeastLoaded(t *testing.T) {
	sel := workerSelector(t, policy.LeastLoaded, nil)
	runPicks(t, sel, append(commonPicks(),
		pickCase{"least loaded", workers{busy(2, 4), busy(1, 4), busy(3, 4)}, sessionless, 1},
		pickCase{"least loaded whatever warmth", workers{used(busy(2, 4), 9), used(busy(1, 4), 1)}, sessionless, 1},
		pickCase{"tie to the warmest", workers{used(busy(1, 4), 5), used(busy(1, 4), 9), used(busy(1, 4), 7)}, sessionless, 1},
		pickCase{"full tie to the first", workers{used(busy(1, 4), 5), used(busy(1, 4), 5)}, sessionless, 0},
		pickCase{"new session tie to the warmest, whatever its sessions", workers{sess(used(idle(4), 1), 0), sess(used(idle(4), 9), 5)}, newSession, 1},
		pickCase{"bound ignored when more loaded", workers{used(idle(4), 1), used(busy(1, 4), 9)}, bound(1), 0},
		pickCase{"bound ignored when colder at equal load", workers{used(busy(1, 4), 9), used(busy(1, 4), 1)}, bound(1), 0},
		pickCase{"bound wins a tie, after the others", workers{used(busy(1, 4), 5), used(busy(1, 4), 5)}, bound(1), 1},
		pickCase{"bound wins a tie, before the others", workers{used(busy(1, 4), 5), used(busy(1, 4), 5), used(busy(1, 4), 5)}, bound(0), 0},
		pickCase{"bound wins a tie, in the middle", workers{used(busy(1, 4), 5), used(busy(1, 4), 5), used(busy(1, 4), 5)}, bound(1), 1},
		pickCase{"bound least loaded", workers{used(busy(2, 4), 9), used(idle(4), 1)}, bound(1), 1},
		pickCase{"bound full", workers{busy(1, 1), busy(2, 4)}, bound(0), 1},
		pickCase{"bound recycling skipped", workers{recycling(idle(4)), busy(3, 4)}, bound(0), 1},
		pickCase{"bound recycling, none other free", workers{recycling(idle(4)), busy(4, 4)}, bound(0), -1},
	))
}

func TestMostRecentlyUsed(t *testing.T) {
	sel := workerSelector(t, policy.MostRecentlyUsed, nil)
	runPicks(t, sel, append(commonPicks(),
		pickCase{"warmest whatever the load", workers{used(idle(4), 1), used(busy(3, 4), 9), used(busy(1, 4), 5)}, sessionless, 1},
		pickCase{"warmth tie to the least loaded", workers{used(busy(2, 4), 9), used(busy(1, 4), 9), used(busy(3, 4), 9)}, sessionless, 1},
		pickCase{"full tie to the first", workers{used(busy(1, 4), 5), used(busy(1, 4), 5)}, sessionless, 0},
		pickCase{"warmest full skipped", workers{used(busy(4, 4), 9), used(busy(2, 4), 5), used(idle(4), 1)}, sessionless, 1},
		pickCase{"warmest recycling skipped", workers{used(recycling(idle(4)), 9), used(idle(4), 1)}, sessionless, 1},
		pickCase{"new session to the warmest with room", workers{used(noRoom(idle(4)), 9), sess(used(busy(1, 4), 5), 4), used(idle(4), 1)}, newSession, 1},
		pickCase{"bound free honoured", workers{used(idle(4), 9), used(busy(3, 4), 1)}, bound(1), 1},
		pickCase{"bound full falls back to the warmest", workers{used(idle(4), 1), used(busy(4, 4), 9), used(busy(3, 4), 5)}, bound(1), 2},
		pickCase{"bound recycling honoured while it has room", workers{used(recycling(busy(1, 4)), 1), used(idle(4), 9)}, bound(0), 0},
		pickCase{"bound recycling and full falls back", workers{used(recycling(busy(4, 4)), 9), used(idle(4), 1)}, bound(0), 1},
	))
}

// TestPickDoesNotAllocate: Pick runs under the pool's lock on every call.
func TestPickDoesNotAllocate(t *testing.T) {
	ws := workers{used(busy(1, 4), 3), used(idle(4), 1), noRoom(used(idle(2), 9)), recycling(idle(4)), used(busy(2, 2), 7)}
	for _, name := range []string{policy.SessionSticky, policy.LeastLoaded, policy.MostRecentlyUsed} {
		sel := workerSelector(t, name, nil)
		for _, p := range []policy.Purpose{sessionless, newSession, bound(0), bound(4)} {
			var got int
			if n := testing.AllocsPerRun(100, func() { got = sel.Pick(&ws, p) }); n != 0 {
				t.Errorf("%s: Pick(%+v) allocates %v times per call, want 0", name, p, n)
			}
			if got < 0 {
				t.Errorf("%s: Pick(%+v) = %d, want a worker", name, p, got)
			}
		}
	}
}

// TestPickReturnsFree checks, over many pools, that every selector returns
// a free worker (with room for a new session) whenever there is one, and
// -1 only when there is none; a session's call may also go to its own
// recycling worker while that one has room.
func TestPickReturnsFree(t *testing.T) {
	sels := map[string]policy.WorkerSelector{}
	for _, name := range []string{policy.SessionSticky, policy.LeastLoaded, policy.MostRecentlyUsed} {
		sels[name] = workerSelector(t, name, nil)
	}
	x := uint64(0x9e3779b97f4a7c15)
	next := func(n int) int { // xorshift: deterministic, no clock
		x ^= x << 13
		x ^= x >> 7
		x ^= x << 17
		return int(x % uint64(n))
	}
	for round := range 2000 {
		ws := make(workers, next(6))
		for i := range ws {
			c := next(3)
			ws[i] = policy.Worker{Busy: next(c + 2), Capacity: c, Sessions: next(3), SessionRoom: next(2) == 0,
				LastUsed: uint64(next(4)), Recycling: next(5) == 0}
		}
		purposes := []policy.Purpose{sessionless, newSession}
		if len(ws) > 0 {
			purposes = append(purposes, bound(next(len(ws))))
		}
		for _, p := range purposes {
			anyFree := false
			for _, w := range ws {
				anyFree = anyFree || w.Free() && (!p.NewSession || w.SessionRoom)
			}
			for name, sel := range sels {
				got := sel.Pick(&ws, p)
				switch {
				case got == -1 && anyFree:
					t.Fatalf("round %d: %s: Pick(%+v, %+v) = -1, want a free worker", round, name, ws, p)
				case got == -1:
				case got < 0 || got >= len(ws):
					t.Fatalf("round %d: %s: Pick(%+v, %+v) = %d, out of range", round, name, ws, p, got)
				case got == p.Bound && name != policy.LeastLoaded && ws[got].HasRoom():
				case !ws[got].Free():
					t.Fatalf("round %d: %s: Pick(%+v, %+v) = %d, not free", round, name, ws, p, got)
				case p.NewSession && !ws[got].SessionRoom:
					t.Fatalf("round %d: %s: Pick(%+v, %+v) = %d, no session room", round, name, ws, p, got)
				}
			}
		}
	}
}
