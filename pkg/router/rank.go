package router

import (
	"math"
	"math/bits"
	"slices"
	"strings"
)

// DefaultMax is the number of candidates Rank returns when Request.Max is 0:
// the choice and two fallbacks.
const DefaultMax = 3

// Constraints are a call's placement requirements. The zero value accepts
// every peer.
type Constraints struct {
	// GPU: the peer has at least one GPU.
	GPU bool
	// MinGPUMemoryMiB: the peer's largest GPU has at least this much memory
	// (implies GPU).
	MinGPUMemoryMiB int
	// GPUModel: one of the peer's GPU models equals this, ignoring case
	// (implies GPU).
	GPUModel string
	// Labels: the peer has every one of these labels with the same value.
	Labels map[string]string
}

func (c *Constraints) isZero() bool {
	return !c.GPU && c.MinGPUMemoryMiB <= 0 && c.GPUModel == "" && len(c.Labels) == 0
}

// Request is what Rank needs to know about one call.
type Request struct {
	// SessionID selects rendezvous placement; empty means sessionless.
	SessionID string
	// Pool is the pool that serves the call (the agent resolves tools to
	// pools before routing).
	Pool string
	// Need filters peers by hardware and labels.
	Need Constraints
	// Exclude lists peers not to return: peers ejected after failed calls,
	// or, for drain, the node handing its sessions over ("who owns session
	// S if node X is gone" is Rank with Exclude: X, Max: 1).
	Exclude []NodeID
	// IncludeUnhealthy also ranks unhealthy peers (never cordoned, draining
	// or incompatible ones). Strict affinity uses it to find the owner of a
	// session while the owner is down, to wait for it until a break-glass
	// lease runs out. Candidate.Healthy tells which is which.
	IncludeUnhealthy bool
	// Max is how many candidates to return; 0 means DefaultMax. Rank's cost
	// grows with Max; it is meant to be small.
	Max int
	// Rand is a random value from the caller, used only for sessionless
	// calls; the same Rand over the same Table and loads gives the same
	// answer.
	Rand uint64
}

// Candidate is one peer in Rank's answer.
type Candidate struct {
	// ID and Index identify the peer (Index as in Table.Peer).
	ID    NodeID
	Index int
	// Score is what the peer was ranked by, lower first: for sessions the
	// rendezvous score -ln(u)/slots, for sessionless calls its load.
	Score float64
	// Local: the peer is the local node. Healthy: as in Peer.
	Local   bool
	Healthy bool
}

// Loads gives the latest load signal of each peer, by Table index: calls in
// flight plus queued, per worker slot. NaN and negative values count as 0
// (no signal yet: the peer is worth trying). Implementations must be safe
// for concurrent use if Rank is called concurrently.
type Loads interface {
	Load(peer int) float64
}

// LoadSlice is a Loads backed by a slice indexed like the Table; peers past
// its end have load 0. Converting a slice to an interface allocates, so
// convert it to Loads once, not per call.
type LoadSlice []float64

// Load implements Loads.
func (l LoadSlice) Load(peer int) float64 {
	if peer < len(l) {
		return l[peer]
	}
	return 0
}

// Rank appends to dst the candidates for req, best first, at most req.Max,
// and returns the extended slice: Rendezvous for a call with a session id,
// TwoChoices for one without. It does not allocate when dst has room for
// the candidates. loads is used for sessionless calls only and may be nil
// (all peers idle).
func (t *Table) Rank(req Request, loads Loads, dst []Candidate) ([]Candidate, error) {
	if req.SessionID != "" {
		return t.Rendezvous(&req, dst)
	}
	return t.TwoChoices(&req, loads, dst)
}

// Rendezvous appends to dst the eligible peers for req in rendezvous order
// of req.SessionID, at most req.Max, and returns the extended slice. The
// first is the session's owner, the second its next owner, and so on; the
// order depends only on the session id and the set of eligible peers with
// their slots, never on loads or on the order of the peers. It does not
// allocate when dst has room for the candidates.
//
// When no peer is eligible, it returns dst unchanged and an error:
// ErrUnknownPool when no peer lists the pool, *UnsatisfiableError when no
// peer serving the pool meets a constraint, ErrNoPeers (wrapped, with each
// peer's reason) when peers meet the constraints but none can take the call.
func (t *Table) Rendezvous(req *Request, dst []Candidate) ([]Candidate, error) {
	s, pl, k, err := t.span(req)
	if err != nil {
		return dst, err
	}
	base := len(dst)
	dst = slices.Grow(dst, k)
	out := dst[base : base+k]
	var n int
	if k <= 3 && len(req.Exclude) == 0 && req.Need.isZero() {
		t.rendezvous3(s, hashString(req.SessionID), out)
		n = k
	} else {
		n = t.rendezvous(s, req, out)
	}
	return t.finish(req, pl, dst, base, n)
}

// TwoChoices appends to dst the candidates for a call placed by load, at
// most req.Max, and returns the extended slice. The first is the
// power-of-two choice (the lower load of two peers drawn from req.Rand; the
// local node on a tie, and whenever its load is not above the choice's),
// the rest the other eligible peers by load. It does not allocate when dst
// has room for the candidates; loads may be nil (all peers idle). Errors
// are Rendezvous's.
func (t *Table) TwoChoices(req *Request, loads Loads, dst []Candidate) ([]Candidate, error) {
	s, pl, k, err := t.span(req)
	if err != nil {
		return dst, err
	}
	base := len(dst)
	dst = slices.Grow(dst, k)
	n := t.twoChoices(s, req, loads, dst[base:base+k])
	return t.finish(req, pl, dst, base, n)
}

// span returns the peers req may go to and how many candidates to find.
func (t *Table) span(req *Request) (*span, *pool, int, error) {
	pl := t.pool(req.Pool)
	if pl == nil {
		return nil, nil, 0, t.explain(req, nil)
	}
	s := &pl.ready
	if req.IncludeUnhealthy {
		s = &pl.any
	}
	k := req.Max
	if k <= 0 {
		k = DefaultMax
	}
	k = min(k, len(s.slots))
	if k == 0 {
		return nil, nil, 0, t.explain(req, pl)
	}
	return s, pl, k, nil
}

// finish fills in the n candidates found at dst[base:].
func (t *Table) finish(req *Request, pl *pool, dst []Candidate, base, n int) ([]Candidate, error) {
	if n == 0 {
		return dst[:base], t.explain(req, pl)
	}
	dst = dst[:base+n]
	for i := base; i < len(dst); i++ {
		c := &dst[i]
		p := &t.peers[c.Index]
		c.ID, c.Local, c.Healthy = p.ID, c.Index == t.local, p.Healthy
	}
	return dst, nil
}

// Owner returns the first candidate for req (its Max is ignored): for a
// session, its owner among the eligible peers not in req.Exclude.
func (t *Table) Owner(req Request) (Candidate, error) {
	var buf [1]Candidate
	req.Max = 1
	c, err := t.Rank(req, nil, buf[:0])
	if err != nil {
		return Candidate{}, err
	}
	return c[0], nil
}

// filter is a request's per-call conditions (constraints and exclusions),
// flattened once per call so that checking a peer costs no map iteration.
// The table-level conditions are already applied to the span.
type filter struct {
	on      bool // false: every peer of the span passes
	gpu     bool
	minMem  int
	model   string
	nlabels int
	labels  [8][2]string      // the first nlabels are used
	more    map[string]string // labels when there are more than 8
	exclude []NodeID
}

func newFilter(req *Request) filter {
	c := &req.Need
	f := filter{
		on:      len(req.Exclude) > 0 || !c.isZero(),
		gpu:     c.GPU || c.MinGPUMemoryMiB > 0 || c.GPUModel != "",
		minMem:  c.MinGPUMemoryMiB,
		model:   c.GPUModel,
		exclude: req.Exclude,
	}
	if len(c.Labels) > len(f.labels) {
		f.more = c.Labels
		return f
	}
	for k, v := range c.Labels {
		f.labels[f.nlabels] = [2]string{k, v}
		f.nlabels++
	}
	return f
}

// usable reports whether peer i passes f.
func (t *Table) usable(i int32, f *filter) bool {
	if !f.on {
		return true
	}
	p := &t.peers[i]
	for _, id := range f.exclude {
		if p.ID == id {
			return false
		}
	}
	if f.gpu && p.GPUCount < 1 || p.GPUMemoryMiB < f.minMem {
		return false
	}
	if f.model != "" && !hasModel(&p.Peer, f.model) {
		return false
	}
	for _, kv := range f.labels[:f.nlabels] {
		if got, ok := p.Labels[kv[0]]; !ok || got != kv[1] {
			return false
		}
	}
	for k, v := range f.more {
		if got, ok := p.Labels[k]; !ok || got != v {
			return false
		}
	}
	return true
}

func hasModel(p *Peer, model string) bool {
	for _, m := range p.GPUModels {
		if strings.EqualFold(m, model) {
			return true
		}
	}
	return false
}

// Session ranking. Each peer's score is E/w where E = -ln(u) is an Exp(1)
// draw from the hash of (session, peer) (negLog of draw) and w the peer's
// slots: the minimum of such independent exponentials falls on peer i with
// probability w_i/Σw, which is weighted rendezvous hashing. Peers are
// compared by key (scoreKey: the score's bits with the peer's position in
// its span, which is in ID order, in the low bits), so ties go to the
// lower ID and the order is total.
//
// Only the best k are kept. The first peers are all scored, without a
// branch: the score is branch-free and the top-k insertion uses integer
// min/max (conditional moves), so nothing is mispredicted while the best
// keys are still changing often. After them, as -ln(u) >= 1-u, the cheap
// bound (1-u)/w, one multiply, rejects nearly every peer whose key cannot
// beat the k-th best (pruneBound); only the rare survivors are scored.

// fullScan is how many peers are scored before pruning starts: pruning
// the first few rejects too few peers to pay for its mispredicted branch.
const fullScan = 16

// rendezvous3 ranks, for k = len(out) <= 3 and no per-call filter, every
// peer of s (at least k) for the session whose hash is h.
func (t *Table) rendezvous3(s *span, h uint64, out []Candidate) {
	hk := h ^ k1
	hot := s.hot
	n := min(len(hot), fullScan)
	t0, t1, t2 := scan3(hot[:n], hk)
	if n < len(hot) {
		t0, t1, t2 = prune3(hot, n, hk, len(out), t0, t1, t2)
	}
	top := [3]uint64{t0, t1, t2}
	for i := range out {
		out[i] = Candidate{Index: int(s.slots[top[i]&idxMask].idx), Score: keyScore(top[i])}
	}
}

// scan3 returns the three lowest keys of hot (MaxUint64 for missing ones)
// for the session hash hk (xored with k1), scoring every peer.
func scan3(hot []hotSlot, hk uint64) (t0, t1, t2 uint64) {
	t0, t1, t2 = math.MaxUint64, math.MaxUint64, math.MaxUint64
	for i := range hot {
		h := &hot[i]
		x := math.Float64bits(negLog(mum(hk, h.hash)>>11|1)*h.w)&^idxMask | uint64(i)
		t2 = max(t1, min(x, t2))
		t1 = max(t0, min(x, t1))
		t0 = min(x, t0)
	}
	return t0, t1, t2
}

// prune3 goes on from scan3 over hot[from:], keeping the k <= 3 lowest
// keys; peers whose bound shows that they cannot make the cut are skipped
// without being scored.
func prune3(hot []hotSlot, from int, hk uint64, k int, t0, t1, t2 uint64) (uint64, uint64, uint64) {
	worst := t2
	if k == 1 {
		worst = t0
	} else if k == 2 {
		worst = t1
	}
	cut := pruneBound(worst)
	rest := hot[from:]
	for i := range rest {
		h := &rest[i]
		d := mum(hk, h.hash)>>11 | 1
		if float64(float64(int64(1<<53-d))*h.w) <= cut {
			x := math.Float64bits(negLog(d)*h.w)&^idxMask | uint64(from+i)
			t2 = max(t1, min(x, t2))
			t1 = max(t0, min(x, t1))
			t0 = min(x, t0)
			worst = t2
			if k == 1 {
				worst = t0
			} else if k == 2 {
				worst = t1
			}
			cut = pruneBound(worst)
		}
	}
	return t0, t1, t2
}

// rendezvous fills out (len k) with the k best eligible peers of s for the
// session and returns how many it found: the general case of rendezvous3,
// with per-call filters and any k. Filters are checked only for the peers
// that would make the cut.
func (t *Table) rendezvous(s *span, req *Request, out []Candidate) int {
	hk := hashString(req.SessionID) ^ k1
	k := len(out)
	var stack [16]uint64
	top := stack[:0]
	if k > len(stack) {
		top = make([]uint64, 0, k)
	}
	cut := math.Inf(1)
	f := newFilter(req)
	for i := range s.hot {
		h := &s.hot[i]
		d := mum(hk, h.hash)>>11 | 1
		if float64(float64(int64(1<<53-d))*h.w) > cut {
			continue
		}
		x := math.Float64bits(negLog(d)*h.w)&^idxMask | uint64(i)
		if len(top) == k && x > top[k-1] || f.on && !t.usable(s.slots[i].idx, &f) {
			continue
		}
		j := len(top)
		if j < k {
			top = top[:j+1]
		} else {
			j--
		}
		for j > 0 && x < top[j-1] {
			top[j] = top[j-1]
			j--
		}
		top[j] = x
		if len(top) == k {
			cut = pruneBound(top[k-1])
		}
	}
	for i, x := range top {
		out[i] = Candidate{Index: int(s.slots[x&idxMask].idx), Score: keyScore(x)}
	}
	return len(top)
}

// pick maps r uniformly onto [0, n).
func pick(r uint64, n int) int {
	hi, _ := bits.Mul64(r, uint64(n))
	return int(hi)
}

func loadOf(loads Loads, i int32) float64 {
	if loads == nil {
		return 0
	}
	l := loads.Load(int(i))
	if !(l > 0) { // NaN, negative, zero
		return 0
	}
	return l
}

// twoChoices fills out with the power-of-two choice followed by the other
// eligible peers by load, and returns how many it found.
func (t *Table) twoChoices(s *span, req *Request, loads Loads, out []Candidate) int {
	f := newFilter(req)
	r1, r2 := mix(req.Rand^k0), mix(req.Rand^k1)

	// Draw two distinct eligible positions a, b of s.slots.
	a, b := -1, -1
	if !f.on {
		m := len(s.slots)
		a = pick(r1, m)
		if m > 1 {
			b = pick(r2, m-1)
			if b >= a {
				b++
			}
		}
	} else {
		m := 0
		for i := range s.slots {
			if t.usable(s.slots[i].idx, &f) {
				m++
			}
		}
		if m == 0 {
			return 0
		}
		ra, rb := pick(r1, m), -1
		if m > 1 {
			rb = pick(r2, m-1)
			if rb >= ra {
				rb++
			}
		}
		j := 0
		for i := range s.slots {
			if !t.usable(s.slots[i].idx, &f) {
				continue
			}
			switch j {
			case ra:
				a = i
			case rb:
				b = i
			}
			j++
		}
	}

	win := a
	wl := loadOf(loads, s.slots[a].idx)
	if b >= 0 {
		if bl := loadOf(loads, s.slots[b].idx); bl < wl || bl == wl && b == s.local {
			win, wl = b, bl
		}
	}
	if l := s.local; l >= 0 && l != win && t.usable(s.slots[l].idx, &f) {
		if ll := loadOf(loads, s.slots[l].idx); ll <= wl {
			win, wl = l, ll
		}
	}
	out[0] = Candidate{Index: int(s.slots[win].idx), Score: wl}
	if len(out) == 1 {
		return 1
	}

	// Fallbacks: the k-1 least loaded of the others. Equal loads are
	// ordered by a hash of (Rand, peer), so they spread across calls.
	k := len(out) - 1
	var stack [8]loadEntry
	top := stack[:0]
	if k > len(stack) {
		top = make([]loadEntry, 0, k)
	}
	for i := range s.slots {
		sl := &s.slots[i]
		if i == win || f.on && !t.usable(sl.idx, &f) {
			continue
		}
		e := loadEntry{load: loadOf(loads, sl.idx), tie: mix(r1 ^ sl.hash), idx: sl.idx}
		j := len(top)
		if j == k {
			if !e.before(top[k-1]) {
				continue
			}
			j--
		} else {
			top = top[:j+1]
		}
		for j > 0 && e.before(top[j-1]) {
			top[j] = top[j-1]
			j--
		}
		top[j] = e
	}
	for i, e := range top {
		out[1+i] = Candidate{Index: int(e.idx), Score: e.load}
	}
	return 1 + len(top)
}

type loadEntry struct {
	load float64
	tie  uint64
	idx  int32
}

func (e loadEntry) before(o loadEntry) bool {
	return e.load < o.load || e.load == o.load && e.tie < o.tie
}
