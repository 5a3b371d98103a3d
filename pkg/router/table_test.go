package router

import (
	"errors"
	"slices"
	"testing"
)

func TestNewTableRejects(t *testing.T) {
	tests := []struct {
		name  string
		peers []Peer
		local NodeID
		want  string
	}{
		{"empty id", []Peer{{}}, "", "invalid peer: peer 0 has an empty id"},
		{"duplicate", []Peer{{ID: "a"}, {ID: "b"}, {ID: "a"}}, "", `invalid peer: duplicate id "a"`},
		{"negative slots", []Peer{{ID: "a", Pools: map[string]int{"p": -1}}}, "", `invalid peer: peer "a": pool "p" slots must be >= 0 (got -1)`},
		{"protocol range", []Peer{{ID: "a", ProtoMin: 3, ProtoMax: 2}}, "", `invalid peer: peer "a": protocol range 3-2, want 0 <= min <= max`},
		{"unknown local", []Peer{{ID: "a"}}, "b", `invalid peer: local node "b" is not among the peers`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := NewTable(tt.peers, tt.local)
			if err == nil || err.Error() != tt.want || !errors.Is(err, ErrInvalidPeer) {
				t.Fatalf("NewTable = %v, want %s (wrapping ErrInvalidPeer)", err, tt.want)
			}
		})
	}
}

func TestTableAccessors(t *testing.T) {
	peers := []Peer{
		{ID: "c", Pools: map[string]int{"x": 1}},
		{ID: "a", Pools: map[string]int{"y": 1, "x": 2}, Labels: map[string]string{"k": "v"}},
		{ID: "b"},
	}
	tb := mustTable(t, peers, "b")
	peers[1].Labels["k"] = "changed" // the Table keeps its own copy
	if got := tb.Len(); got != 3 {
		t.Errorf("Len() = %d, want 3", got)
	}
	for i, id := range []NodeID{"a", "b", "c"} {
		if got, ok := tb.Index(id); !ok || got != i || tb.Peer(i).ID != id {
			t.Errorf("Index(%q) = %d, %v; Peer = %q; want %d", id, got, ok, tb.Peer(got).ID, i)
		}
	}
	if _, ok := tb.Index("zz"); ok {
		t.Errorf("Index(%q) found a peer", "zz")
	}
	if got := tb.Local(); got != 1 {
		t.Errorf("Local() = %d, want 1", got)
	}
	if got := tb.Peer(0).Labels["k"]; got != "v" {
		t.Errorf("Peer(0).Labels[k] = %q after the caller changed its map, want %q", got, "v")
	}
	if got := tb.Pools(); !slices.Equal(got, []string{"x", "y"}) {
		t.Errorf("Pools() = %v, want [x y]", got)
	}
}

func TestTableManyPools(t *testing.T) {
	// More pools than the linear search handles: the map is used.
	p := Peer{ID: "a", Healthy: true, Pools: map[string]int{}}
	names := []string{"p0", "p1", "p2", "p3", "p4", "p5", "p6", "p7", "p8", "p9"}
	for _, n := range names {
		p.Pools[n] = 1
	}
	tb := mustTable(t, []Peer{p}, "a")
	for _, n := range names {
		if c, err := tb.Owner(Request{SessionID: "s", Pool: n}); err != nil || c.ID != "a" {
			t.Errorf("Owner(pool %q) = %v, %v; want a", n, c.ID, err)
		}
	}
	if _, err := tb.Owner(Request{SessionID: "s", Pool: "zz"}); !errors.Is(err, ErrUnknownPool) {
		t.Errorf("Owner(pool zz) error = %v, want ErrUnknownPool", err)
	}
}
