package router

import (
	"cmp"
	"fmt"
	"math"
	"slices"
	"testing"
)

// uniform returns n healthy peers node-000.. serving pool "p" with slots
// each.
func uniform(n, slots int) []Peer {
	ps := make([]Peer, n)
	for i := range ps {
		ps[i] = Peer{ID: NodeID(fmt.Sprintf("node-%03d", i)), Healthy: true, Pools: map[string]int{"p": slots}}
	}
	return ps
}

func mustTable(t testing.TB, peers []Peer, local NodeID) *Table {
	t.Helper()
	tb, err := NewTable(peers, local)
	if err != nil {
		t.Fatalf("NewTable: %v", err)
	}
	return tb
}

func ids(cs []Candidate) []NodeID {
	out := make([]NodeID, len(cs))
	for i, c := range cs {
		out[i] = c.ID
	}
	return out
}

func sessionKey(i int) string { return fmt.Sprintf("session-%d", i) }

// referenceRank is the obvious implementation of session ranking: score
// every eligible peer, sort everything, keep the first max. Rank must agree
// with it exactly.
func referenceRank(t *Table, req Request) []NodeID {
	pl := t.pool(req.Pool)
	if pl == nil {
		return nil
	}
	s := pl.ready
	if req.IncludeUnhealthy {
		s = pl.any
	}
	h := hashString(req.SessionID)
	f := newFilter(&req)
	var all []Candidate
	for _, sl := range s.slots {
		if !t.usable(sl.idx, &f) {
			continue
		}
		// -ln(u)·(1/slots), truncated to 32 significant bits.
		sc := negLog(draw(h, sl.hash)) * (1 / float64(t.peers[sl.idx].Pools[req.Pool]))
		sc = math.Float64frombits(math.Float64bits(sc) &^ (1<<20 - 1))
		all = append(all, Candidate{ID: t.peers[sl.idx].ID, Index: int(sl.idx), Score: sc})
	}
	slices.SortFunc(all, func(a, b Candidate) int {
		return cmp.Or(cmp.Compare(a.Score, b.Score), cmp.Compare(a.ID, b.ID))
	})
	max := req.Max
	if max == 0 {
		max = DefaultMax
	}
	return ids(all[:min(max, len(all))])
}
