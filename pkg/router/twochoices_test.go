package router

import (
	"fmt"
	"math"
	"slices"
	"testing"
)

func TestTwoChoices(t *testing.T) {
	tests := []struct {
		name  string
		n     int
		local NodeID
		loads LoadSlice
		max   int
		// check is called for each of many Rand values.
		check func(t *testing.T, got []Candidate)
	}{
		{
			name: "lower load wins", n: 2, loads: LoadSlice{0.5, 0.25},
			check: func(t *testing.T, got []Candidate) {
				if got[0].ID != "node-001" || got[1].ID != "node-000" {
					t.Errorf("Rank = %v, want [node-001 node-000]", ids(got))
				}
			},
		},
		{
			name: "tie goes to local", n: 2, local: "node-000", loads: LoadSlice{1, 1},
			check: func(t *testing.T, got []Candidate) {
				if !got[0].Local || got[0].ID != "node-000" {
					t.Errorf("Rank = %v, want node-000 (local) first", ids(got))
				}
			},
		},
		{
			name: "local competes when not drawn", n: 10, local: "node-009",
			loads: LoadSlice{1, 1, 1, 1, 1, 1, 1, 1, 1, 1},
			check: func(t *testing.T, got []Candidate) {
				if got[0].ID != "node-009" {
					t.Errorf("Rank = %v, want the idle-tied local node-009 first", ids(got))
				}
			},
		},
		{
			name: "busier local loses", n: 3, local: "node-000", loads: LoadSlice{2, 1, 1},
			check: func(t *testing.T, got []Candidate) {
				if got[0].ID == "node-000" {
					t.Errorf("Rank = %v, want a less loaded peer than the local node first", ids(got))
				}
			},
		},
		{
			name: "never the busiest of the two drawn", n: 4, loads: LoadSlice{0, 1, 2, 3}, max: 4,
			check: func(t *testing.T, got []Candidate) {
				if got[0].ID == "node-003" {
					t.Errorf("Rank = %v: the most loaded peer cannot win two choices", ids(got))
				}
				if !slices.IsSortedFunc(got[1:], func(a, b Candidate) int { return int(a.Score - b.Score) }) {
					t.Errorf("Rank = %v: fallbacks not ordered by load", got)
				}
				if len(got) != 4 {
					t.Errorf("Rank returned %d candidates, want 4", len(got))
				}
			},
		},
		{
			name: "fallbacks by load", n: 6, loads: LoadSlice{5, 4, 3, 2, 1, 0}, max: 3,
			check: func(t *testing.T, got []Candidate) {
				// The choice is one of the peers; the others follow by load.
				var want []NodeID
				for _, id := range []NodeID{"node-005", "node-004", "node-003", "node-002"} {
					if id != got[0].ID {
						want = append(want, id)
					}
				}
				if !slices.Equal(ids(got[1:]), want[:2]) {
					t.Errorf("Rank = %v, want fallbacks %v", ids(got), want[:2])
				}
			},
		},
		{
			name: "NaN and negative loads count as idle", n: 2, loads: LoadSlice{math.NaN(), 0.5},
			check: func(t *testing.T, got []Candidate) {
				if got[0].ID != "node-000" || got[0].Score != 0 {
					t.Errorf("Rank = %v, want node-000 with load 0 first", got)
				}
			},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			tb := mustTable(t, uniform(tt.n, 2), tt.local)
			var loads Loads = tt.loads
			for r := range uint64(200) {
				got, err := tb.Rank(Request{Pool: "p", Rand: r * 0x9e3779b97f4a7c15, Max: tt.max}, loads, nil)
				if err != nil {
					t.Fatalf("Rank: %v", err)
				}
				seen := map[NodeID]bool{}
				for _, c := range got {
					if seen[c.ID] {
						t.Fatalf("Rank = %v, %s twice", ids(got), c.ID)
					}
					seen[c.ID] = true
				}
				tt.check(t, got)
			}
		})
	}
}

// TestTwoChoicesSpread: with equal loads and no local node, the first
// candidate is spread evenly (5σ, as in TestRankSpread), and the choice
// never leaves the eligible peers.
func TestTwoChoicesSpread(t *testing.T) {
	for _, constrained := range []bool{false, true} {
		t.Run(fmt.Sprintf("constrained=%v", constrained), func(t *testing.T) {
			peers := uniform(10, 2)
			for i := range peers {
				peers[i].Labels = map[string]string{"rack": fmt.Sprint(i % 2)}
			}
			tb := mustTable(t, peers, "")
			req := Request{Pool: "p"}
			want := 10
			if constrained {
				req.Need.Labels = map[string]string{"rack": "1"}
				req.Exclude = []NodeID{"node-009"}
				want = 4
			}
			const n = 40000
			counts := map[NodeID]int{}
			for r := range uint64(n) {
				req.Rand = r
				got, err := tb.Rank(req, nil, nil)
				if err != nil {
					t.Fatal(err)
				}
				counts[got[0].ID]++
			}
			if len(counts) != want {
				t.Fatalf("first candidates %v, want %d distinct peers", counts, want)
			}
			p := 1 / float64(want)
			mean, sd := n*p, math.Sqrt(n*p*(1-p))
			for id, c := range counts {
				if i, _ := tb.Index(id); constrained && (id == "node-009" || peers[i].Labels["rack"] != "1") {
					t.Errorf("%s chosen, but it is excluded or lacks the label", id)
				}
				if math.Abs(float64(c)-mean) > 5*sd {
					t.Errorf("%s first %d times of %d, want %.0f ± %.0f", id, c, n, mean, 5*sd)
				}
			}
		})
	}
}
