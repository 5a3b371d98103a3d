package router

import (
	"fmt"
	"sort"
	"testing"
)

// Benchmarks print each figure beside its floor measured in the same run:
//
//	go test -run '^$' -bench . -benchmem ./pkg/router/
//
// BenchmarkRank/peers=N is the router's choice for a session call (owner
// plus two fallbacks). BenchmarkRankFloorFullSort/peers=N is the reference
// it replaces: plain rendezvous as github.com/nspcc-dev/hrw/v2 does it, a
// 64-bit distance per precomputed node hash, then a full sort of all nodes
// (two allocations). It is unweighted, which flatters the floor.

var benchPeers = []int{10, 100, 1000}

// benchKeys are UUID-sized session ids; calls cycle through them so the
// result is not one lucky key.
var benchKeys = func() []string {
	keys := make([]string, 1024)
	for i := range keys {
		keys[i] = fmt.Sprintf("%08x-7d4b-4c1e-9a8b-%012x", i*2654435761, i)
	}
	return keys
}()

func benchTable(b *testing.B, n int) *Table {
	peers := uniform(n, 1)
	for i := range peers {
		peers[i].Pools["p"] = 1 + i%8
	}
	return mustTable(b, peers, peers[0].ID)
}

func BenchmarkRank(b *testing.B) {
	for _, n := range benchPeers {
		b.Run(fmt.Sprintf("peers=%d", n), func(b *testing.B) {
			tb := benchTable(b, n)
			buf := make([]Candidate, 0, DefaultMax)
			b.ReportAllocs()
			i := 0
			for b.Loop() {
				buf, _ = tb.Rank(Request{SessionID: benchKeys[i&1023], Pool: "p"}, nil, buf[:0])
				i++
			}
		})
	}
}

// hrwSort is the reference full-sort rendezvous, as hrw's Sort does it:
// a murmur3-finalised distance from the key hash to each precomputed node
// hash, then sort.Sort of node indexes by distance (two allocations).
func hrwSort(nodes []uint64, key uint64) []uint64 {
	h := hrwHashed{sorted: make([]uint64, 0, len(nodes)), weight: make([]uint64, 0, len(nodes))}
	for i, n := range nodes {
		h.sorted = append(h.sorted, uint64(i))
		h.weight = append(h.weight, hrwDistance(n, key))
	}
	sort.Sort(h)
	return h.sorted
}

type hrwHashed struct{ sorted, weight []uint64 }

func (h hrwHashed) Len() int           { return len(h.sorted) }
func (h hrwHashed) Less(i, j int) bool { return h.weight[i] < h.weight[j] }
func (h hrwHashed) Swap(i, j int) {
	h.sorted[i], h.sorted[j] = h.sorted[j], h.sorted[i]
	h.weight[i], h.weight[j] = h.weight[j], h.weight[i]
}

func hrwDistance(x, y uint64) uint64 {
	a := x ^ y
	a ^= a >> 33
	a *= 0xff51afd7ed558ccd
	a ^= a >> 33
	a *= 0xc4ceb9fe1a85ec53
	a ^= a >> 33
	return a
}

func BenchmarkRankFloorFullSort(b *testing.B) {
	for _, n := range benchPeers {
		b.Run(fmt.Sprintf("peers=%d", n), func(b *testing.B) {
			var nodes []uint64
			for _, p := range uniform(n, 1) {
				nodes = append(nodes, hashString(string(p.ID)))
			}
			b.ReportAllocs()
			i := 0
			var sink uint64
			for b.Loop() {
				sink += hrwSort(nodes, hashString(benchKeys[i&1023]))[0]
				i++
			}
			_ = sink
		})
	}
}

// BenchmarkRankSessionless is a sessionless call: power of two choices
// plus two fallbacks by load (a scan of every eligible peer).
func BenchmarkRankSessionless(b *testing.B) {
	for _, n := range benchPeers {
		b.Run(fmt.Sprintf("peers=%d", n), func(b *testing.B) {
			tb := benchTable(b, n)
			ls := make(LoadSlice, n)
			for i := range ls {
				ls[i] = float64(i%7) / 4
			}
			var loads Loads = ls
			buf := make([]Candidate, 0, DefaultMax)
			b.ReportAllocs()
			var r uint64
			for b.Loop() {
				r += 0x9e3779b97f4a7c15
				buf, _ = tb.Rank(Request{Pool: "p", Rand: r}, loads, buf[:0])
			}
		})
	}
}

// BenchmarkRankConstrained is a session call with a label constraint half
// the peers meet and one excluded peer.
func BenchmarkRankConstrained(b *testing.B) {
	for _, n := range benchPeers {
		b.Run(fmt.Sprintf("peers=%d", n), func(b *testing.B) {
			peers := uniform(n, 4)
			for i := range peers {
				peers[i].Labels = map[string]string{"zone": fmt.Sprint("z", i%2)}
			}
			tb := mustTable(b, peers, "")
			need := Constraints{Labels: map[string]string{"zone": "z1"}}
			excl := []NodeID{peers[1].ID}
			buf := make([]Candidate, 0, DefaultMax)
			b.ReportAllocs()
			i := 0
			for b.Loop() {
				buf, _ = tb.Rank(Request{SessionID: benchKeys[i&1023], Pool: "p", Need: need, Exclude: excl}, nil, buf[:0])
				i++
			}
		})
	}
}
