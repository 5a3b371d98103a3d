package router

import (
	"fmt"
	"math"
	"math/rand/v2"
	"slices"
	"sync"
	"testing"
)

func TestRankDeterministic(t *testing.T) {
	peers := uniform(20, 4)
	for i := range peers {
		peers[i].Pools["p"] = 1 + i%5
	}
	a := mustTable(t, peers, "node-003")
	shuffled := slices.Clone(peers)
	rand.New(rand.NewPCG(1, 2)).Shuffle(len(shuffled), func(i, j int) { shuffled[i], shuffled[j] = shuffled[j], shuffled[i] })
	b := mustTable(t, shuffled, "node-003")
	for i := range 2000 {
		req := Request{SessionID: sessionKey(i), Pool: "p", Max: 5}
		got1, err := a.Rank(req, nil, nil)
		if err != nil {
			t.Fatalf("Rank(%q): %v", req.SessionID, err)
		}
		got2, _ := a.Rank(req, nil, nil)
		got3, _ := b.Rank(req, nil, nil)
		if !slices.Equal(got1, got2) || !slices.Equal(got1, got3) {
			t.Fatalf("Rank(%q) = %v, then %v, on a shuffled table %v; want the same", req.SessionID, ids(got1), ids(got2), ids(got3))
		}
	}
}

// TestRankMatchesReference checks the pruned top-k loop against scoring and
// sorting every peer, over weights, constraints, exclusions and Max.
func TestRankMatchesReference(t *testing.T) {
	r := rand.New(rand.NewPCG(3, 4))
	for _, n := range []int{1, 2, 3, 10, 100, 1000} {
		peers := uniform(n, 1)
		for i := range peers {
			peers[i].Pools["p"] = 1 + r.IntN(64)
			peers[i].Healthy = r.IntN(10) > 0
			peers[i].Labels = map[string]string{"zone": fmt.Sprint("z", r.IntN(3))}
		}
		tb := mustTable(t, peers, "")
		for _, max := range []int{0, 1, 2, 5, 8} {
			t.Run(fmt.Sprintf("peers=%d/max=%d", n, max), func(t *testing.T) {
				for i := range 500 {
					req := Request{SessionID: sessionKey(i), Pool: "p", Max: max}
					switch i % 4 {
					case 1:
						req.Need.Labels = map[string]string{"zone": "z1"}
					case 2:
						req.Exclude = []NodeID{peers[r.IntN(n)].ID, peers[r.IntN(n)].ID}
					case 3:
						req.IncludeUnhealthy = true
					}
					got, _ := tb.Rank(req, nil, nil)
					if want := referenceRank(tb, req); !slices.Equal(ids(got), want) {
						t.Fatalf("Rank(%+v) = %v, want %v", req, ids(got), want)
					}
				}
			})
		}
	}
}

// TestRankSpread checks that sessions spread in proportion to the slots.
// With an ideal hash the number of keys a peer with share p owns among N is
// Binomial(N, p); each count must lie within 5 standard deviations
// (sqrt(N·p·(1-p))) of N·p. An ideal hash fails one such check with
// probability 5.7e-7, so the ~200 checks here have a 1e-4 false-alarm
// rate; and the keys are fixed, so a passing hash keeps passing. Sequential
// keys (session-0, session-1, ...) and random UUID-like keys both count, as
// both occur.
func TestRankSpread(t *testing.T) {
	weights := map[string][]int{
		"equal":    {8, 8, 8, 8, 8, 8, 8, 8, 8, 8},
		"weighted": {1, 2, 3, 4, 5, 6, 7, 8, 9, 10},
		"skewed":   {1, 1, 1, 1, 64},
	}
	keyKinds := map[string]func(i int) string{
		"sequential": sessionKey,
		"uuid": func(i int) string {
			r := rand.New(rand.NewPCG(uint64(i), 99))
			return fmt.Sprintf("%08x-%04x-%04x-%04x-%012x", r.Uint32(), r.Uint32()&0xffff, r.Uint32()&0xffff, r.Uint32()&0xffff, r.Uint64()&(1<<48-1))
		},
	}
	for wname, ws := range weights {
		for kname, key := range keyKinds {
			for _, nkeys := range []int{1000, 10000, 100000} {
				t.Run(fmt.Sprintf("%s/%s/keys=%d", wname, kname, nkeys), func(t *testing.T) {
					peers := uniform(len(ws), 1)
					total := 0
					for i, w := range ws {
						peers[i].Pools["p"] = w
						total += w
					}
					tb := mustTable(t, peers, "")
					counts := make([]int, len(ws))
					for i := range nkeys {
						c, err := tb.Owner(Request{SessionID: key(i), Pool: "p"})
						if err != nil {
							t.Fatal(err)
						}
						counts[c.Index]++
					}
					for i, w := range ws {
						p := float64(w) / float64(total)
						mean, sd := float64(nkeys)*p, math.Sqrt(float64(nkeys)*p*(1-p))
						if z := (float64(counts[i]) - mean) / sd; math.Abs(z) > 5 {
							t.Errorf("%s (slots %d) owns %d of %d keys, want %.0f ± %.0f (5σ); z = %.1f", peers[i].ID, w, counts[i], nkeys, mean, 5*sd, z)
						}
					}
				})
			}
		}
	}
}

// TestRankMinimalDisruption removes one of N peers: only its keys move, each
// to its former rank-1 peer, and adding it back restores every owner.
func TestRankMinimalDisruption(t *testing.T) {
	const nkeys = 100000
	tests := []struct {
		name    string
		weights []int
	}{
		{"equal/n=10", []int{4, 4, 4, 4, 4, 4, 4, 4, 4, 4}},
		{"equal/n=5", []int{1, 1, 1, 1, 1}},
		{"weighted/n=6", []int{1, 2, 4, 8, 16, 32}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			peers := uniform(len(tt.weights), 1)
			total := 0
			for i, w := range tt.weights {
				peers[i].Pools["p"] = w
				total += w
			}
			full := mustTable(t, peers, "")
			for gone := range peers {
				without := mustTable(t, slices.Delete(slices.Clone(peers), gone, gone+1), "")
				moved := 0
				for i := range nkeys {
					req := Request{SessionID: sessionKey(i), Pool: "p", Max: 2}
					before, _ := full.Rank(req, nil, nil)
					after, _ := without.Rank(req, nil, nil)
					if before[0].ID != peers[gone].ID {
						if after[0].ID != before[0].ID {
							t.Fatalf("removing %s moved %q from %s to %s", peers[gone].ID, req.SessionID, before[0].ID, after[0].ID)
						}
						continue
					}
					moved++
					if after[0].ID != before[1].ID {
						t.Fatalf("removing %s moved %q to %s, want its next owner %s", peers[gone].ID, req.SessionID, after[0].ID, before[1].ID)
					}
					// The drain question, asked of the full table.
					next, err := full.Owner(Request{SessionID: req.SessionID, Pool: "p", Exclude: []NodeID{peers[gone].ID}})
					if err != nil || next.ID != after[0].ID {
						t.Fatalf("Owner(%q excluding %s) = %v, %v; want %s", req.SessionID, peers[gone].ID, next.ID, err, after[0].ID)
					}
				}
				got := float64(moved) / nkeys
				want := float64(tt.weights[gone]) / float64(total)
				if math.Abs(got-want) > 0.01 {
					t.Errorf("removing %s moved %.2f%% of keys, want %.2f%% ± 1 point", peers[gone].ID, 100*got, 100*want)
				}
			}
			// Adding the peer back (same table contents) restores every owner.
			back := mustTable(t, slices.Clone(peers), "")
			for i := range nkeys {
				a, _ := full.Owner(Request{SessionID: sessionKey(i), Pool: "p"})
				b, _ := back.Owner(Request{SessionID: sessionKey(i), Pool: "p"})
				if a.ID != b.ID {
					t.Fatalf("after adding back, Owner(%q) = %s, want %s", sessionKey(i), b.ID, a.ID)
				}
			}
		})
	}
}

// TestRankStableUnderUnrelatedChanges: adding a peer (which shifts the
// positions of the peers after it), removing one, changing one's slots or
// health never reorders the other peers. Max covers both the unfiltered
// top-3 loop and the general one, which must agree.
func TestRankStableUnderUnrelatedChanges(t *testing.T) {
	r := rand.New(rand.NewPCG(9, 10))
	peers := uniform(40, 1)
	for i := range peers {
		peers[i].Pools["p"] = 1 + r.IntN(8)
	}
	base := mustTable(t, peers, "")
	changed := map[string][]Peer{
		"added":   append(slices.Clone(peers), Peer{ID: "node-0005a", Healthy: true, Pools: map[string]int{"p": 3}}),
		"removed": slices.Delete(slices.Clone(peers), 7, 8),
		"resized": func() []Peer {
			ps := slices.Clone(peers)
			ps[12].Pools = map[string]int{"p": 50}
			return ps
		}(),
		"unhealthy": func() []Peer {
			ps := slices.Clone(peers)
			ps[20].Healthy = false
			return ps
		}(),
	}
	// restrict keeps the ids of a ranking that are eligible in both tables.
	restrict := func(ids []NodeID, keep map[NodeID]bool) []NodeID {
		var out []NodeID
		for _, id := range ids {
			if keep[id] {
				out = append(out, id)
			}
		}
		return out
	}
	for name, ps := range changed {
		t.Run(name, func(t *testing.T) {
			other := mustTable(t, ps, "")
			common := map[NodeID]bool{}
			for _, p := range ps {
				if j, ok := base.Index(p.ID); ok && p.Healthy && base.Peer(j).Healthy && p.Pools["p"] == base.Peer(j).Pools["p"] {
					common[p.ID] = true
				}
			}
			for i := range 1000 {
				id := sessionKey(i)
				a, _ := base.Rank(Request{SessionID: id, Pool: "p", Max: 64}, nil, nil)
				b, _ := other.Rank(Request{SessionID: id, Pool: "p", Max: 64}, nil, nil)
				if x, y := restrict(ids(a), common), restrict(ids(b), common); !slices.Equal(x, y) {
					t.Fatalf("%q: common peers ordered %v, then %v", id, x, y)
				}
				for _, max := range []int{1, 2, 3} {
					c, _ := other.Rank(Request{SessionID: id, Pool: "p", Max: max}, nil, nil)
					if !slices.Equal(ids(c), ids(b)[:max]) {
						t.Fatalf("%q Max %d: %v, want the prefix of %v", id, max, ids(c), ids(b))
					}
				}
			}
		})
	}
}

func TestRankStateFilters(t *testing.T) {
	peers := uniform(12, 2)
	peers[1].Healthy = false
	peers[2].Cordoned = true
	peers[3].Draining = true
	peers[4].Pools["p"] = 0
	peers[5].ProtoMin, peers[5].ProtoMax = 3, 4 // local speaks 1-2
	peers[0].ProtoMin, peers[0].ProtoMax = 1, 2
	peers[6].ProtoMin, peers[6].ProtoMax = 2, 3 // overlaps
	tb := mustTable(t, peers, "node-000")
	never := map[NodeID]bool{"node-002": true, "node-003": true, "node-004": true, "node-005": true}
	seenUnhealthy := false
	for i := range 20000 {
		for _, inc := range []bool{false, true} {
			req := Request{SessionID: sessionKey(i), Pool: "p", Max: 8, IncludeUnhealthy: inc}
			if i%2 == 1 {
				req.SessionID, req.Rand = "", uint64(i)*0x9e3779b97f4a7c15
			}
			got, err := tb.Rank(req, nil, nil)
			if err != nil {
				t.Fatal(err)
			}
			for _, c := range got {
				if never[c.ID] || (!inc && c.ID == "node-001") {
					t.Fatalf("Rank(%+v) = %v, includes %s", req, ids(got), c.ID)
				}
				if c.ID == "node-001" {
					seenUnhealthy = true
					if c.Healthy {
						t.Fatalf("node-001 candidate has Healthy = true")
					}
				}
			}
		}
	}
	if !seenUnhealthy {
		t.Errorf("IncludeUnhealthy never returned the unhealthy peer")
	}
}

func TestRankExclude(t *testing.T) {
	tb := mustTable(t, uniform(5, 1), "")
	for i := range 1000 {
		req := Request{SessionID: sessionKey(i), Pool: "p", Max: 5}
		all, _ := tb.Rank(req, nil, nil)
		req.Exclude = []NodeID{all[0].ID, all[2].ID}
		got, _ := tb.Rank(req, nil, nil)
		want := []NodeID{all[1].ID, all[3].ID, all[4].ID}
		if !slices.Equal(ids(got), want) {
			t.Fatalf("Rank(%q, exclude %v) = %v, want %v", req.SessionID, req.Exclude, ids(got), want)
		}
	}
}

func TestRankAppendsAndDoesNotAllocate(t *testing.T) {
	tb := mustTable(t, uniform(100, 4), "node-007")
	buf := make([]Candidate, 1, 8)
	buf[0].ID = "keep"
	got, err := tb.Rank(Request{SessionID: "s", Pool: "p"}, nil, buf)
	if err != nil || len(got) != 1+DefaultMax || got[0].ID != "keep" {
		t.Fatalf("Rank(dst of len 1) = %v, %v; want the first element kept and %d appended", ids(got), err, DefaultMax)
	}
	var loads Loads = make(LoadSlice, tb.Len()) // converted once: boxing a slice allocates
	for name, req := range map[string]Request{
		"session":     {SessionID: "3f2c1a9e-7d4b-4c1e-9a8b-2b6d5e4f3a21", Pool: "p"},
		"sessionless": {Pool: "p", Rand: 12345},
		"labels":      {SessionID: "s", Pool: "p", Need: Constraints{Labels: map[string]string{}}, Exclude: []NodeID{"node-001"}},
	} {
		if n := testing.AllocsPerRun(100, func() { buf, _ = tb.Rank(req, loads, buf[:0]) }); n != 0 {
			t.Errorf("Rank(%s) allocates %v times per call, want 0", name, n)
		}
	}
}

func TestRankConcurrent(t *testing.T) {
	tb := mustTable(t, uniform(50, 2), "node-001")
	want := make([][]NodeID, 200)
	for i := range want {
		got, _ := tb.Rank(Request{SessionID: sessionKey(i), Pool: "p"}, nil, nil)
		want[i] = ids(got)
	}
	var wg sync.WaitGroup
	for range 4 {
		wg.Go(func() {
			var buf [DefaultMax]Candidate
			for i := range want {
				got, _ := tb.Rank(Request{SessionID: sessionKey(i), Pool: "p"}, nil, buf[:0])
				if !slices.Equal(ids(got), want[i]) {
					t.Errorf("concurrent Rank(%q) = %v, want %v", sessionKey(i), ids(got), want[i])
					return
				}
			}
		})
	}
	wg.Wait()
}
