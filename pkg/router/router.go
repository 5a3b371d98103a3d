// Package router decides which nodes should run a call: given a request and
// a snapshot of the peers, it returns the candidates in the order to try.
//
// It is pure: no I/O, no clock, no globals, no randomness of its own. The
// agent converts each discovery snapshot into a Table once (NewTable
// precomputes hashes and per-pool peer lists) and ranks every call against
// it with Table.Rank, passing the fast-changing load signals separately.
//
//   - A call with a session id is placed by weighted rendezvous hashing of
//     the id over the eligible peers, weight = the peer's worker slots for
//     the pool. Rank 0 is the owner; rank 1 is the node that owns the
//     session if the owner goes away (the "next owner"), and so on. Removing
//     a peer moves only the sessions it owned; adding it back returns them.
//   - A call without a session id goes to the less loaded of two peers drawn
//     from the caller's random value (power of two choices); the local node
//     wins ties, and competes whenever it is eligible, so an idle cluster
//     does not forward.
//
// A peer is eligible when it is healthy, not cordoned or draining, speaks a
// peer protocol the local node speaks, has slots in the pool, satisfies the
// request's placement constraints and is not excluded by the request. When
// no peer is eligible Rank explains why: ErrUnknownPool,
// *UnsatisfiableError naming the unmet constraint, or ErrNoPeers.
//
// docs/routing.md describes the choices and their guarantees.
package router

import (
	"cmp"
	"errors"
	"fmt"
	"maps"
	"slices"
)

// NodeID names a snakepitd node: unique in its cluster, chosen by the
// operator, stable across daemon restarts and reused by design when a node
// comes back (it is the same node). Sessions are placed by hashing against
// it, so a node that keeps its NodeID keeps its sessions.
type NodeID string

// Peer is what the router knows about one node. The agent builds it from
// the discovery snapshot (slow-changing data only; load is passed to Rank).
type Peer struct {
	// ID identifies the node. Required and unique within a Table.
	ID NodeID
	// Healthy: the node's pools can serve. Unhealthy peers are used only by
	// requests with IncludeUnhealthy.
	Healthy bool
	// Cordoned and Draining peers take no new calls and own no sessions.
	Cordoned bool
	Draining bool
	// Pools maps each pool the node serves to its worker slots (workers ×
	// concurrency per worker); the slots are the node's rendezvous weight
	// for the pool. A pool with 0 slots is known but cannot take calls.
	Pools map[string]int
	// GPUCount is the number of GPUs; GPUMemoryMiB the memory of the
	// largest one; GPUModels the distinct product names (as NVML reports
	// them).
	GPUCount     int
	GPUMemoryMiB int
	GPUModels    []string
	// Labels are the operator's key/value pairs for placement.
	Labels map[string]string
	// ProtoMin and ProtoMax bound the peer protocol versions the node
	// speaks (inclusive); 0, 0 means unknown and is assumed compatible.
	ProtoMin, ProtoMax int
}

// ErrInvalidPeer is wrapped by NewTable's errors.
var ErrInvalidPeer = errors.New("invalid peer")

// Table is an immutable, indexed snapshot of the peers, built once per
// discovery change. Its methods are safe for concurrent use.
//
// Peers are indexed 0..Len()-1 in order of ID; Candidate.Index and Loads use
// these indexes.
type Table struct {
	peers     []peer // sorted by ID
	local     int    // index of the local node, -1 if none
	pools     map[string]*pool
	poolList  []*pool  // the same, by name; searched linearly when short
	poolNames []string // sorted
}

type peer struct {
	Peer
	hash       uint64 // peerKey(ID)
	compatible bool   // speaks a protocol version the local node speaks
}

// pool is the precomputed routing data for one pool name.
type pool struct {
	name    string
	members []int32 // every peer listing the pool, any state (diagnostics)
	// ready: the peers that can take calls (slots > 0, healthy, not
	// cordoned or draining, compatible). any: the same without the health
	// condition. Both in index order.
	ready, any span
}

type span struct {
	slots []slot
	hot   []hotSlot // the same peers, what session ranking reads
	local int       // position of the local node in slots, -1 if absent
}

// slot is one eligible peer.
type slot struct {
	hash uint64 // peerKey(ID)
	idx  int32  // peer index
}

// hotSlot is one eligible peer as session ranking reads it: 16 bytes, so
// that a cache line holds four.
type hotSlot struct {
	hash uint64  // peerKey(ID)
	w    float64 // 2^-53 / slots: scales 1-u = v·2^-53 and the score
}

// NewTable builds a Table from peers (in any order) for a router running on
// the node local. local may be empty (a router that is not a node, as in
// tests); otherwise it must be one of the peers, and peers whose protocol
// range does not overlap the local node's are not eligible. The agent
// includes its own node even when discovery dropped it as unhealthy.
//
// The Table keeps its own copy of peers' maps and slices.
func NewTable(peers []Peer, local NodeID) (*Table, error) {
	if len(peers) > maxPeers {
		return nil, fmt.Errorf("%w: %d peers, at most %d", ErrInvalidPeer, len(peers), maxPeers)
	}
	t := &Table{local: -1, pools: make(map[string]*pool)}
	t.peers = make([]peer, len(peers))
	for i, p := range peers {
		if p.ID == "" {
			return nil, fmt.Errorf("%w: peer %d has an empty id", ErrInvalidPeer, i)
		}
		if p.ProtoMin < 0 || p.ProtoMax < p.ProtoMin {
			return nil, fmt.Errorf("%w: peer %q: protocol range %d-%d, want 0 <= min <= max", ErrInvalidPeer, p.ID, p.ProtoMin, p.ProtoMax)
		}
		for name, n := range p.Pools {
			if n < 0 {
				return nil, fmt.Errorf("%w: peer %q: pool %q slots must be >= 0 (got %d)", ErrInvalidPeer, p.ID, name, n)
			}
		}
		p.Pools = maps.Clone(p.Pools)
		p.Labels = maps.Clone(p.Labels)
		p.GPUModels = slices.Clone(p.GPUModels)
		t.peers[i] = peer{Peer: p, hash: peerKey(p.ID)}
	}
	slices.SortFunc(t.peers, func(a, b peer) int { return cmp.Compare(a.ID, b.ID) })
	for i := 1; i < len(t.peers); i++ {
		if t.peers[i].ID == t.peers[i-1].ID {
			return nil, fmt.Errorf("%w: duplicate id %q", ErrInvalidPeer, t.peers[i].ID)
		}
	}
	if local != "" {
		i, ok := t.Index(local)
		if !ok {
			return nil, fmt.Errorf("%w: local node %q is not among the peers", ErrInvalidPeer, local)
		}
		t.local = i
	}
	for i := range t.peers {
		p := &t.peers[i]
		p.compatible = t.local < 0 || i == t.local || protoOverlap(p.Peer, t.peers[t.local].Peer)
		for _, name := range slices.Sorted(maps.Keys(p.Pools)) {
			pl := t.pools[name]
			if pl == nil {
				pl = &pool{name: name, ready: span{local: -1}, any: span{local: -1}}
				t.pools[name] = pl
				t.poolNames = append(t.poolNames, name)
			}
			pl.members = append(pl.members, int32(i))
			n := p.Pools[name]
			if n == 0 || p.Cordoned || p.Draining || !p.compatible {
				continue
			}
			s, h := slot{hash: p.hash, idx: int32(i)}, hotSlot{hash: p.hash, w: 0x1p-53 / float64(n)}
			pl.any.add(s, h, i == t.local)
			if p.Healthy {
				pl.ready.add(s, h, i == t.local)
			}
		}
	}
	slices.Sort(t.poolNames)
	for _, name := range t.poolNames {
		t.poolList = append(t.poolList, t.pools[name])
	}
	return t, nil
}

// pool returns the routing data of a pool, nil if no peer lists it. A few
// string comparisons beat a map lookup for the usual handful of pools.
func (t *Table) pool(name string) *pool {
	if len(t.poolList) <= 8 {
		for _, p := range t.poolList {
			if p.name == name {
				return p
			}
		}
		return nil
	}
	return t.pools[name]
}

func (s *span) add(sl slot, h hotSlot, local bool) {
	if local {
		s.local = len(s.slots)
	}
	s.slots = append(s.slots, sl)
	s.hot = append(s.hot, h)
}

func protoOverlap(a, b Peer) bool {
	if a.ProtoMax == 0 || b.ProtoMax == 0 {
		return true // unknown
	}
	return a.ProtoMin <= b.ProtoMax && b.ProtoMin <= a.ProtoMax
}

// Len returns the number of peers.
func (t *Table) Len() int { return len(t.peers) }

// Peer returns the peer at index i (0 <= i < Len()). Its maps and slices are
// shared with the Table and must not be modified.
func (t *Table) Peer(i int) Peer { return t.peers[i].Peer }

// Index returns the index of the peer with the given id.
func (t *Table) Index(id NodeID) (int, bool) {
	return slices.BinarySearchFunc(t.peers, id, func(p peer, id NodeID) int { return cmp.Compare(p.ID, id) })
}

// Local returns the index of the local node, or -1 when the Table has none.
func (t *Table) Local() int { return t.local }

// Pools returns the sorted names of the pools any peer lists, in a new
// slice.
func (t *Table) Pools() []string { return slices.Clone(t.poolNames) }
