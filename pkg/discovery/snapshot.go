package discovery

import (
	"reflect"
	"slices"
	"sort"
	"sync"
	"time"
)

// Snapshot is the set of healthy peers a Directory knew at one moment. It is
// immutable and safe to share; the Peer values it returns share their maps
// with it and must not be modified.
type Snapshot struct {
	seq     uint64
	taken   time.Time
	peers   []Peer // sorted by ID, unique IDs
	stale   bool
	err     error
	changed chan struct{}
}

// Seq numbers the snapshots of one Directory: 1 for the first answer from
// the backend, +1 for each change. 0 means nothing is known yet.
func (s *Snapshot) Seq() uint64 { return s.seq }

// Taken is when the Directory built this snapshot.
func (s *Snapshot) Taken() time.Time { return s.taken }

// Len returns the number of peers.
func (s *Snapshot) Len() int { return len(s.peers) }

// Peers returns the peers sorted by ID, in a new slice the caller owns.
func (s *Snapshot) Peers() []Peer { return slices.Clone(s.peers) }

// Lookup returns the peer with the given ID.
func (s *Snapshot) Lookup(id NodeID) (Peer, bool) {
	i, ok := slices.BinarySearchFunc(s.peers, id, func(p Peer, id NodeID) int {
		switch {
		case p.ID < id:
			return -1
		case p.ID > id:
			return 1
		}
		return 0
	})
	if !ok {
		return Peer{}, false
	}
	return s.peers[i], true
}

// Stale reports that the backend could not be reached when this snapshot was
// taken: the peers are the last known ones. Err says why.
func (s *Snapshot) Stale() bool { return s.stale }

// Err is the last error from the backend while Stale, else nil.
func (s *Snapshot) Err() error { return s.err }

// Changed returns a channel that is closed once the Directory holds a newer
// snapshot than s. Waiting on it never misses a change.
func (s *Snapshot) Changed() <-chan struct{} { return s.changed }

// publisher holds the current snapshot of a Directory and replaces it.
type publisher struct {
	mu  sync.Mutex
	cur *Snapshot
}

func newPublisher() *publisher {
	return &publisher{cur: &Snapshot{changed: make(chan struct{})}}
}

func (p *publisher) current() *Snapshot {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.cur
}

// publish installs a snapshot of peers (which it takes ownership of) unless it
// equals the current one; it reports whether it did.
func (p *publisher) publish(peers []Peer, stale bool, err error, now time.Time) bool {
	sort.Slice(peers, func(i, j int) bool { return peers[i].ID < peers[j].ID })
	p.mu.Lock()
	defer p.mu.Unlock()
	old := p.cur
	if old.seq > 0 && old.stale == stale && errText(old.err) == errText(err) && samePeers(old.peers, peers) {
		return false
	}
	p.cur = &Snapshot{
		seq:     old.seq + 1,
		taken:   now,
		peers:   peers,
		stale:   stale,
		err:     err,
		changed: make(chan struct{}),
	}
	close(old.changed)
	return true
}

// markStale republishes the current peers as stale with err.
func (p *publisher) markStale(err error, now time.Time) bool {
	return p.publish(p.current().Peers(), true, err, now)
}

func samePeers(a, b []Peer) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if !reflect.DeepEqual(a[i], b[i]) {
			return false
		}
	}
	return true
}

func errText(err error) string {
	if err == nil {
		return ""
	}
	return err.Error()
}
