package router

import (
	"errors"
	"fmt"
	"maps"
	"slices"
	"strings"
)

// Errors returned (wrapped) by Rank. The gRPC edge maps ErrUnknownPool to
// NOT_FOUND, *UnsatisfiableError to FAILED_PRECONDITION and ErrNoPeers to
// UNAVAILABLE (the peers exist but are down, cordoned, draining, excluded or
// incompatible: a later try may succeed).
var (
	ErrNoPeers     = errors.New("no available peer")
	ErrUnknownPool = errors.New("unknown pool")
)

// UnsatisfiableError says that no peer serving Pool meets one of the
// request's placement constraints, whatever their state.
type UnsatisfiableError struct {
	// Pool is the requested pool.
	Pool string
	// Constraint names the first unmet constraint as the user wrote it,
	// e.g. `gpu_memory_min=80GiB`. Constraints are checked in the order gpu,
	// gpu_memory_min, gpu_model, labels (by key), each among the peers that
	// met the previous ones.
	Constraint string
	// Detail says what the peers have, e.g. "best: node-b has 40GiB".
	Detail string
}

func (e *UnsatisfiableError) Error() string {
	return fmt.Sprintf("no peer satisfies %s for pool %q (%s)", e.Constraint, e.Pool, e.Detail)
}

// explain finds why no peer was eligible for req; it runs only on failure
// and may allocate. pl is nil when no peer lists the pool.
func (t *Table) explain(req *Request, pl *pool) error {
	if len(t.peers) == 0 {
		return fmt.Errorf("%w for pool %q: the peer list is empty", ErrNoPeers, req.Pool)
	}
	if pl == nil {
		return fmt.Errorf("%w %q (known: %s)", ErrUnknownPool, req.Pool, strings.Join(t.poolNames, ", "))
	}
	set := make([]*Peer, 0, len(pl.members))
	for _, i := range pl.members {
		set = append(set, &t.peers[i].Peer)
	}
	c := &req.Need
	fail := func(constraint, detail string) error {
		return &UnsatisfiableError{Pool: req.Pool, Constraint: constraint, Detail: detail}
	}
	if c.GPU || c.MinGPUMemoryMiB > 0 || c.GPUModel != "" {
		if set = keep(set, func(p *Peer) bool { return p.GPUCount > 0 }); len(set) == 0 {
			return fail("gpu", fmt.Sprintf("none of the %d peers serving it has a GPU", len(pl.members)))
		}
	}
	if c.MinGPUMemoryMiB > 0 {
		best := slices.MaxFunc(set, func(a, b *Peer) int { return a.GPUMemoryMiB - b.GPUMemoryMiB })
		if set = keep(set, func(p *Peer) bool { return p.GPUMemoryMiB >= c.MinGPUMemoryMiB }); len(set) == 0 {
			return fail("gpu_memory_min="+mib(c.MinGPUMemoryMiB),
				fmt.Sprintf("best: %s has %s", best.ID, mib(best.GPUMemoryMiB)))
		}
	}
	if c.GPUModel != "" {
		before := set
		if set = keep(set, func(p *Peer) bool { return hasModel(p, c.GPUModel) }); len(set) == 0 {
			return fail(fmt.Sprintf("gpu_model=%q", c.GPUModel), "have: "+list(before, func(p *Peer) string {
				return fmt.Sprintf("%s on %s", strings.Join(p.GPUModels, ", "), p.ID)
			}))
		}
	}
	for _, k := range slices.Sorted(maps.Keys(c.Labels)) {
		v := c.Labels[k]
		before := set
		if set = keep(set, func(p *Peer) bool { got, ok := p.Labels[k]; return ok && got == v }); len(set) == 0 {
			return fail(fmt.Sprintf("labels[%s]=%q", k, v), "have: "+list(before, func(p *Peer) string {
				if got, ok := p.Labels[k]; ok {
					return fmt.Sprintf("%s=%q on %s", k, got, p.ID)
				}
				return fmt.Sprintf("no %s on %s", k, p.ID)
			}))
		}
	}
	// Some peers meet the constraints: say why each cannot take the call.
	reasons := make([]string, 0, len(set))
	for _, p := range set {
		i, _ := t.Index(p.ID)
		var why string
		switch {
		case p.Pools[req.Pool] == 0:
			why = "no slots"
		case p.Draining:
			why = "draining"
		case p.Cordoned:
			why = "cordoned"
		case !t.peers[i].compatible:
			l := t.peers[t.local].Peer
			why = fmt.Sprintf("protocol %d-%d, local %d-%d", p.ProtoMin, p.ProtoMax, l.ProtoMin, l.ProtoMax)
		case !p.Healthy && !req.IncludeUnhealthy:
			why = "unhealthy"
		case slices.Contains(req.Exclude, p.ID):
			why = "excluded"
		default:
			why = "eligible" // unreachable unless Rank and explain disagree
		}
		reasons = append(reasons, fmt.Sprintf("%s %s", p.ID, why))
		if len(reasons) == maxListed && len(set) > maxListed {
			reasons = append(reasons, fmt.Sprintf("%d more", len(set)-maxListed))
			break
		}
	}
	return fmt.Errorf("%w for pool %q: %s", ErrNoPeers, req.Pool, strings.Join(reasons, ", "))
}

// maxListed bounds the peers an error lists.
const maxListed = 5

func keep(set []*Peer, ok func(*Peer) bool) []*Peer {
	var out []*Peer
	for _, p := range set {
		if ok(p) {
			out = append(out, p)
		}
	}
	return out
}

func list(set []*Peer, f func(*Peer) string) string {
	var parts []string
	for i, p := range set {
		if i == maxListed {
			parts = append(parts, fmt.Sprintf("%d more", len(set)-maxListed))
			break
		}
		parts = append(parts, f(p))
	}
	return strings.Join(parts, "; ")
}

// mib formats a memory size in MiB the way users write it: 80GiB, 1536MiB.
func mib(n int) string {
	if n >= 1024 && n%1024 == 0 {
		return fmt.Sprintf("%dGiB", n/1024)
	}
	return fmt.Sprintf("%dMiB", n)
}
