package policy_test

import (
	"errors"
	"fmt"
	"reflect"
	"sync"
	"testing"

	"github.com/snakepit/snakepit/pkg/agent/policy"
	"github.com/snakepit/snakepit/pkg/router"
)

func mustTable(t testing.TB, peers []router.Peer, local router.NodeID) *router.Table {
	t.Helper()
	tb, err := router.NewTable(peers, local)
	if err != nil {
		t.Fatalf("NewTable: %v", err)
	}
	return tb
}

func ids(cs []router.Candidate) []router.NodeID {
	out := make([]router.NodeID, len(cs))
	for i, c := range cs {
		out[i] = c.ID
	}
	return out
}

func sessionID(i int) string { return fmt.Sprintf("session-%d", i) }

// zoned is a cluster of two zones: n0 (the local node) and n1 in zone a,
// n2..n7 in zone b. Every peer serves pool p; tier alternates x, y.
func zoned() []router.Peer {
	peers := make([]router.Peer, 8)
	for i := range peers {
		zone, tier := "b", "x"
		if i < 2 {
			zone = "a"
		}
		if i%2 == 0 {
			tier = "y"
		}
		peers[i] = router.Peer{
			ID: router.NodeID(fmt.Sprintf("n%d", i)), Healthy: true,
			Pools:  map[string]int{"p": 1 + i%3},
			Labels: map[string]string{"zone": zone, "tier": tier},
		}
	}
	return peers
}

// loadSets are load vectors over zoned(), as the router reads them. The
// zone-a peers are the most loaded in most of them, so that plain two
// choices would leave zone a.
var loadSets = map[string]router.Loads{
	"idle":        nil,
	"zero":        router.LoadSlice(make([]float64, 8)),
	"near hot":    router.LoadSlice{9, 8, 1, 2, 0.5, 3, 0, 1},
	"local hot":   router.LoadSlice{9, 0, 1, 1, 1, 1, 1, 1},
	"spread":      router.LoadSlice{0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8},
	"no signal":   router.LoadSlice{-1, 0, 2}, // negative and missing: 0
	"zone b cold": router.LoadSlice{5, 5},
}

func zoneOf(tb *router.Table, c router.Candidate) string { return tb.Peer(c.Index).Labels["zone"] }

func checkNoDup(t *testing.T, what string, got []router.Candidate) {
	t.Helper()
	seen := map[router.NodeID]bool{}
	for _, c := range got {
		if seen[c.ID] {
			t.Errorf("%s = %v: %s twice", what, ids(got), c.ID)
		}
		seen[c.ID] = true
	}
}

func TestTwoChoicesAgreesWithRouter(t *testing.T) {
	tb := mustTable(t, zoned(), "n0")
	sel := nodeSelector(t, policy.TwoChoices, nil)
	for name, loads := range loadSets {
		t.Run(name, func(t *testing.T) {
			for _, max := range []int{0, 1, 3, 8, 20} {
				for r := range uint64(100) {
					req := &router.Request{Pool: "p", Max: max, Rand: r * 0x9e3779b97f4a7c15}
					want, wantErr := tb.TwoChoices(req, loads, nil)
					got, err := sel.Select(tb, req, loads, nil)
					if err != nil || wantErr != nil {
						t.Fatalf("Select(%+v) error %v, router %v; want none", req, err, wantErr)
					}
					if !reflect.DeepEqual(got, want) {
						t.Fatalf("Select(%+v) = %v, want %v (TwoChoices)", req, ids(got), ids(want))
					}
				}
			}
		})
	}
	t.Run("session ignored", func(t *testing.T) {
		req := &router.Request{Pool: "p", SessionID: "s", Rand: 7}
		want, _ := tb.TwoChoices(req, loadSets["near hot"], nil)
		got, err := sel.Select(tb, req, loadSets["near hot"], nil)
		if err != nil || !reflect.DeepEqual(got, want) {
			t.Errorf("Select(session) = %v, %v; want %v (TwoChoices)", ids(got), err, ids(want))
		}
	})
}

func TestRendezvousAgreesWithRouter(t *testing.T) {
	tb := mustTable(t, zoned(), "n0")
	sel := nodeSelector(t, policy.Rendezvous, nil)
	t.Run("sessions", func(t *testing.T) {
		for _, max := range []int{0, 1, 3, 8} {
			for i := range 200 {
				req := &router.Request{Pool: "p", SessionID: sessionID(i), Max: max, Rand: uint64(i)}
				want, wantErr := tb.Rendezvous(req, nil)
				for name, loads := range loadSets { // loads play no part
					got, err := sel.Select(tb, req, loads, nil)
					if err != nil || wantErr != nil {
						t.Fatalf("Select(%+v) error %v, router %v; want none", req, err, wantErr)
					}
					if !reflect.DeepEqual(got, want) {
						t.Fatalf("Select(%+v, loads %s) = %v, want %v (Rendezvous)", req, name, ids(got), ids(want))
					}
				}
			}
		}
	})
	t.Run("sessionless falls back to two choices", func(t *testing.T) {
		for name, loads := range loadSets {
			for r := range uint64(100) {
				req := &router.Request{Pool: "p", Rand: r * 0x9e3779b97f4a7c15}
				want, _ := tb.TwoChoices(req, loads, nil)
				got, err := sel.Select(tb, req, loads, nil)
				if err != nil || !reflect.DeepEqual(got, want) {
					t.Fatalf("Select(%+v, loads %s) = %v, %v; want %v (TwoChoices)", req, name, ids(got), err, ids(want))
				}
			}
		}
	})
}

func TestNodeSelectorsAppendAndExplain(t *testing.T) {
	tb := mustTable(t, zoned(), "n0")
	sels := map[string]policy.NodeSelector{
		policy.TwoChoices: nodeSelector(t, policy.TwoChoices, nil),
		policy.Rendezvous: nodeSelector(t, policy.Rendezvous, nil),
		policy.Locality:   nodeSelector(t, policy.Locality, policy.Options{"label": "zone"}),
	}
	all := []router.NodeID{"n0", "n1", "n2", "n3", "n4", "n5", "n6", "n7"}
	for name, sel := range sels {
		t.Run(name, func(t *testing.T) {
			for _, sid := range []string{"", "s"} {
				dst := []router.Candidate{{ID: "keep", Index: 3}}
				got, err := sel.Select(tb, &router.Request{Pool: "p", SessionID: sid, Rand: 1}, loadSets["spread"], dst)
				if err != nil || len(got) != 1+router.DefaultMax || got[0].ID != "keep" {
					t.Errorf("Select(session %q, dst of len 1) = %v, %v; want the first kept and %d appended", sid, ids(got), err, router.DefaultMax)
				}
				checkNoDup(t, "Select", got[1:])

				got, err = sel.Select(tb, &router.Request{Pool: "nope", SessionID: sid}, nil, dst)
				if !errors.Is(err, router.ErrUnknownPool) || len(got) != 1 {
					t.Errorf("Select(session %q, unknown pool) = %v, %v; want dst unchanged and ErrUnknownPool", sid, ids(got), err)
				}
				got, err = sel.Select(tb, &router.Request{Pool: "p", SessionID: sid, Exclude: all}, nil, dst)
				if !errors.Is(err, router.ErrNoPeers) || len(got) != 1 {
					t.Errorf("Select(session %q, every peer excluded) = %v, %v; want dst unchanged and ErrNoPeers", sid, ids(got), err)
				}
				var unsat *router.UnsatisfiableError
				got, err = sel.Select(tb, &router.Request{Pool: "p", SessionID: sid, Need: router.Constraints{GPU: true}}, nil, dst)
				if !errors.As(err, &unsat) || len(got) != 1 {
					t.Errorf("Select(session %q, gpu) = %v, %v; want dst unchanged and an UnsatisfiableError", sid, ids(got), err)
				}
			}
		})
	}
}

func TestLocality(t *testing.T) {
	tb := mustTable(t, zoned(), "n0")
	loc := nodeSelector(t, policy.Locality, policy.Options{"label": "zone"})

	for name, loads := range loadSets {
		t.Run("near first/loads="+name, func(t *testing.T) {
			for _, tc := range []struct {
				max, near, n int // n candidates, the first near of zone a
				exclude      []router.NodeID
			}{
				{max: 0, near: 2, n: 3},
				{max: 1, near: 1, n: 1},
				{max: 2, near: 2, n: 2},
				{max: 3, near: 2, n: 3},
				{max: 4, near: 2, n: 4},
				{max: 8, near: 2, n: 8},
				{max: 16, near: 2, n: 8},
				{max: 3, near: 1, n: 3, exclude: []router.NodeID{"n0"}},
				{max: 3, near: 1, n: 3, exclude: []router.NodeID{"n1", "n5"}},
				{max: 1, near: 1, n: 1, exclude: []router.NodeID{"n0"}},
			} {
				for r := range uint64(200) {
					req := &router.Request{Pool: "p", Max: tc.max, Rand: r * 0x9e3779b97f4a7c15, Exclude: tc.exclude}
					got, err := loc.Select(tb, req, loads, nil)
					if err != nil {
						t.Fatalf("Select(%+v): %v", req, err)
					}
					if len(got) != tc.n {
						t.Fatalf("Select(%+v) = %v, want %d candidates", req, ids(got), tc.n)
					}
					for i, c := range got {
						if want := map[bool]string{true: "a", false: "b"}[i < tc.near]; zoneOf(tb, c) != want {
							t.Fatalf("Select(%+v) = %v: candidate %d (%s) is in zone %s, want %s", req, ids(got), i, c.ID, zoneOf(tb, c), want)
						}
						for _, x := range tc.exclude {
							if c.ID == x {
								t.Fatalf("Select(%+v) = %v: %s is excluded", req, ids(got), x)
							}
						}
					}
					checkNoDup(t, fmt.Sprintf("Select(%+v)", req), got)
				}
			}
		})
	}

	t.Run("near part is two choices among the near peers", func(t *testing.T) {
		for name, loads := range loadSets {
			for r := range uint64(100) {
				req := &router.Request{Pool: "p", Max: 3, Rand: r}
				got, _ := loc.Select(tb, req, loads, nil)
				near := &router.Request{Pool: "p", Max: 3, Rand: r, Need: router.Constraints{Labels: map[string]string{"zone": "a"}}}
				want, _ := tb.TwoChoices(near, loads, nil)
				if !reflect.DeepEqual(got[:len(want)], want) {
					t.Fatalf("Select(%+v, loads %s) = %v, want it to start with %v", req, name, ids(got), ids(want))
				}
			}
		}
	})

	t.Run("local node preferred when idle", func(t *testing.T) {
		for r := range uint64(100) {
			req := &router.Request{Pool: "p", Rand: r}
			if got, _ := loc.Select(tb, req, loadSets["zero"], nil); got[0].ID != "n0" || !got[0].Local {
				t.Fatalf("Select(%+v, idle) = %v, want the local n0 first", req, ids(got))
			}
		}
	})

	t.Run("no near peer eligible", func(t *testing.T) {
		for name, loads := range loadSets {
			for r := range uint64(100) {
				req := &router.Request{Pool: "p", Max: 3, Rand: r, Exclude: []router.NodeID{"n0", "n1"}}
				want, _ := tb.TwoChoices(req, loads, nil)
				got, err := loc.Select(tb, req, loads, nil)
				if err != nil || !reflect.DeepEqual(got, want) || len(got) != 3 {
					t.Fatalf("Select(%+v, loads %s) = %v, %v; want %v (TwoChoices)", req, name, ids(got), err, ids(want))
				}
			}
		}
	})

	t.Run("no peer shares the zone", func(t *testing.T) {
		peers := zoned()
		for i := range peers {
			peers[i].Labels["zone"] = "c"
		}
		far := mustTable(t, peers, "") // a router that is not a node of zone a
		for name, loads := range loadSets {
			for r := range uint64(100) {
				req := &router.Request{Pool: "p", Max: 4, Rand: r}
				want, _ := far.TwoChoices(req, loads, nil)
				got, err := loc.Select(far, req, loads, nil)
				if err != nil || len(got) != 4 || !reflect.DeepEqual(got, want) {
					t.Fatalf("Select(%+v, loads %s) = %v, %v; want %v (TwoChoices)", req, name, ids(got), err, ids(want))
				}
			}
		}
	})

	t.Run("session placed by rendezvous", func(t *testing.T) {
		for i := range 200 {
			for _, need := range []router.Constraints{{}, {Labels: map[string]string{"tier": "x"}}, {Labels: map[string]string{"zone": "b"}}} {
				req := &router.Request{Pool: "p", SessionID: sessionID(i), Need: need, Rand: uint64(i)}
				want, _ := tb.Rendezvous(req, nil)
				got, err := loc.Select(tb, req, loadSets["near hot"], nil)
				if err != nil || !reflect.DeepEqual(got, want) {
					t.Fatalf("Select(%+v) = %v, %v; want %v (Rendezvous)", req, ids(got), err, ids(want))
				}
			}
		}
	})

	t.Run("call asks for another zone", func(t *testing.T) {
		for r := range uint64(100) {
			req := &router.Request{Pool: "p", Rand: r, Need: router.Constraints{Labels: map[string]string{"zone": "b"}}}
			want, _ := tb.TwoChoices(req, loadSets["spread"], nil)
			got, err := loc.Select(tb, req, loadSets["spread"], nil)
			if err != nil || !reflect.DeepEqual(got, want) {
				t.Fatalf("Select(%+v) = %v, %v; want %v (TwoChoices)", req, ids(got), err, ids(want))
			}
			for _, c := range got {
				if zoneOf(tb, c) != "b" {
					t.Fatalf("Select(%+v) = %v: %s is not in zone b", req, ids(got), c.ID)
				}
			}
		}
	})

	t.Run("call asks for this zone", func(t *testing.T) {
		for r := range uint64(100) {
			req := &router.Request{Pool: "p", Rand: r, Max: 4, Need: router.Constraints{Labels: map[string]string{"zone": "a"}}}
			got, err := loc.Select(tb, req, loadSets["near hot"], nil)
			if err != nil || len(got) != 2 || zoneOf(tb, got[0]) != "a" || zoneOf(tb, got[1]) != "a" {
				t.Fatalf("Select(%+v) = %v, %v; want the two zone-a peers only", req, ids(got), err)
			}
		}
	})

	t.Run("call labels kept", func(t *testing.T) {
		need := map[string]string{"tier": "x"}
		for name, loads := range loadSets {
			for r := range uint64(100) {
				req := &router.Request{Pool: "p", Rand: r, Max: 4, Need: router.Constraints{Labels: need}}
				got, err := loc.Select(tb, req, loads, nil)
				if err != nil || len(got) != 4 {
					t.Fatalf("Select(%+v, loads %s) = %v, %v; want 4 candidates", req, name, ids(got), err)
				}
				// n1 is the only tier-x peer of zone a.
				if got[0].ID != "n1" {
					t.Fatalf("Select(%+v, loads %s) = %v, want n1 first", req, name, ids(got))
				}
				for _, c := range got {
					if tb.Peer(c.Index).Labels["tier"] != "x" {
						t.Fatalf("Select(%+v, loads %s) = %v: %s is not tier x", req, name, ids(got), c.ID)
					}
				}
				checkNoDup(t, "Select", got)
			}
		}
		if len(need) != 1 {
			t.Errorf("Select modified the call's labels: %v", need)
		}
	})

	t.Run("many peers", func(t *testing.T) {
		peers := make([]router.Peer, 30)
		for i := range peers {
			zone := "b"
			if i < 4 {
				zone = "a"
			}
			peers[i] = router.Peer{ID: router.NodeID(fmt.Sprintf("m%02d", i)), Healthy: true,
				Pools: map[string]int{"p": 1 + i%4}, Labels: map[string]string{"zone": zone}}
		}
		big := mustTable(t, peers, "m00")
		loads := make(router.LoadSlice, len(peers))
		for i := range loads {
			loads[i] = float64((i * 7) % 5)
		}
		for _, max := range []int{1, 3, 4, 5, 8, 16} { // router.max_candidates is at most 16
			for r := range uint64(50) {
				req := &router.Request{Pool: "p", Max: max, Rand: r}
				got, err := loc.Select(big, req, loads, nil)
				if err != nil || len(got) != max {
					t.Fatalf("Select(%+v) = %v, %v; want %d candidates", req, ids(got), err, max)
				}
				for i, c := range got {
					if want := map[bool]string{true: "a", false: "b"}[i < 4]; zoneOf(big, c) != want {
						t.Fatalf("Select(%+v) = %v: candidate %d in zone %s, want %s", req, ids(got), i, zoneOf(big, c), want)
					}
				}
				checkNoDup(t, fmt.Sprintf("Select(%+v)", req), got)
			}
		}
	})

	t.Run("dst prefix ignored by the dedup", func(t *testing.T) {
		// The caller's own entries are not candidates of this call.
		dst := []router.Candidate{{ID: "n2", Index: 2}, {ID: "n3", Index: 3}}
		req := &router.Request{Pool: "p", Max: 8, Rand: 3}
		got, err := loc.Select(tb, req, nil, dst)
		if err != nil || len(got) != 2+8 {
			t.Fatalf("Select(%+v, dst of len 2) = %v, %v; want 8 appended", req, ids(got), err)
		}
		checkNoDup(t, "Select", got[2:])
	})
}

func TestLocalityConcurrent(t *testing.T) {
	tb := mustTable(t, zoned(), "n0")
	loc := nodeSelector(t, policy.Locality, policy.Options{"label": "zone"})
	loads := loadSets["near hot"]
	want := make([][]router.Candidate, 100)
	for i := range want {
		want[i], _ = loc.Select(tb, &router.Request{Pool: "p", Max: 4, Rand: uint64(i)}, loads, nil)
	}
	var wg sync.WaitGroup
	for range 4 {
		wg.Go(func() {
			var buf [8]router.Candidate
			for i := range want {
				got, _ := loc.Select(tb, &router.Request{Pool: "p", Max: 4, Rand: uint64(i)}, loads, buf[:0])
				if !reflect.DeepEqual(got, want[i]) {
					t.Errorf("concurrent Select(Rand %d) = %v, want %v", i, ids(got), ids(want[i]))
					return
				}
			}
		})
	}
	wg.Wait()
}

// TestSelectDoesNotAllocate: Select runs on every call of the cluster.
func TestSelectDoesNotAllocate(t *testing.T) {
	tb := mustTable(t, zoned(), "n0")
	var loads router.Loads = router.LoadSlice{9, 8, 1, 2, 0.5, 3, 0, 1} // converted once
	sels := map[string]policy.NodeSelector{
		policy.TwoChoices: nodeSelector(t, policy.TwoChoices, nil),
		policy.Rendezvous: nodeSelector(t, policy.Rendezvous, nil),
		policy.Locality:   nodeSelector(t, policy.Locality, policy.Options{"label": "zone"}),
	}
	reqs := map[string]*router.Request{
		"sessionless":          {Pool: "p", Rand: 42},
		"sessionless max 2":    {Pool: "p", Rand: 42, Max: 2},
		"sessionless max 8":    {Pool: "p", Rand: 42, Max: 8},
		"sessionless excluded": {Pool: "p", Rand: 42, Exclude: []router.NodeID{"n0", "n1"}},
		"session":              {Pool: "p", SessionID: "3f2c1a9e-7d4b-4c1e-9a8b-2b6d5e4f3a21"},
		"session max 8":        {Pool: "p", SessionID: "s", Max: 8},
	}
	buf := make([]router.Candidate, 0, 16)
	for sname, sel := range sels {
		for rname, req := range reqs {
			if sname == policy.Locality && rname == "sessionless excluded" {
				// No near peer: the router builds the error that explains
				// why, and locality discards it; that allocates.
				continue
			}
			var err error
			if n := testing.AllocsPerRun(100, func() { buf, err = sel.Select(tb, req, loads, buf[:0]) }); n != 0 {
				t.Errorf("%s: Select(%s) allocates %v times per call, want 0", sname, rname, n)
			}
			if err != nil || len(buf) == 0 {
				t.Errorf("%s: Select(%s) = %v, %v; want candidates", sname, rname, ids(buf), err)
			}
		}
	}
}
