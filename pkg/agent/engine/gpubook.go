package engine

import (
	"github.com/snakepit/snakepit/pkg/agent/call"

	"fmt"
	"slices"
	"sync"

	"github.com/snakepit/snakepit/pkg/hw"
)

// gpuBook is the node's record of which exclusive pool slot holds which
// GPUs. An exclusive pool's slot takes a group of gpus.per_worker GPUs when
// its first worker starts (or when a resize adds it) and gives it back when
// the slot is gone (its worker stopped), so slots added by a resize get
// GPUs too and never one that another slot holds. A group comes from the
// pool's own start-time assignment first, then from the host's spare GPUs:
// those no pool was assigned (with pools[].gpus.pinned, only the pinned
// ones).
type gpuBook struct {
	mu      sync.Mutex
	inv     []hw.GPU
	own     map[string][][]string     // exclusive pool -> its start-time groups not held now, in plan order
	planned map[string]map[string]int // exclusive pool -> first GPU of each start-time group -> its position
	spare   []hw.GPU                  // host GPUs no pool uses, index order
}

// newGPUBook builds the book from the start-time plan (planGPUs).
func newGPUBook(pools []PoolConfig, plan map[string][][]string, inv hw.Inventory) *gpuBook {
	b := &gpuBook{inv: inv.GPUs, own: map[string][][]string{}, planned: map[string]map[string]int{}}
	var used [][]string
	for _, p := range pools {
		groups := plan[p.Name]
		used = append(used, groups...)
		if !p.GPUs.Exclusive || p.GPUs.PerWorker == 0 {
			continue
		}
		b.own[p.Name] = slices.Clone(groups)
		b.planned[p.Name] = map[string]int{}
		for i, g := range groups {
			b.planned[p.Name][g[0]] = i
		}
	}
	b.spare = hw.Without(inv.GPUs, used...)
	return b
}

// take gives an exclusive pool's new slot its GPUs: the pool's first free
// start-time group, else gpus.per_worker spare GPUs (pinned ones only, if
// the pool pins).
func (b *gpuBook) take(cfg PoolConfig) ([]string, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if own := b.own[cfg.Name]; len(own) > 0 {
		g := own[0]
		b.own[cfg.Name] = own[1:]
		return g, nil
	}
	var pick []string
	for _, g := range b.spare {
		if len(cfg.GPUs.Pinned) > 0 && !slices.Contains(cfg.GPUs.Pinned, g.UUID) {
			continue
		}
		if pick = append(pick, g.UUID); len(pick) == cfg.GPUs.PerWorker {
			break
		}
	}
	if len(pick) < cfg.GPUs.PerWorker {
		return nil, &call.InvalidArgumentError{Field: "size", Reason: fmt.Sprintf(
			"pool %q is exclusive with gpus.per_worker=%d and no free GPU is left for another worker (every GPU of the host is held by a worker of an exclusive pool or used by a shared one; a worker being retired keeps its GPUs until it stops)",
			cfg.Name, cfg.GPUs.PerWorker)}
	}
	b.spare = slices.DeleteFunc(b.spare, func(g hw.GPU) bool { return slices.Contains(pick, g.UUID) })
	return pick, nil
}

// available says how many more slots the pool could take now.
func (b *gpuBook) available(cfg PoolConfig) int {
	b.mu.Lock()
	defer b.mu.Unlock()
	n := 0
	for _, g := range b.spare {
		if len(cfg.GPUs.Pinned) == 0 || slices.Contains(cfg.GPUs.Pinned, g.UUID) {
			n++
		}
	}
	return len(b.own[cfg.Name]) + n/cfg.GPUs.PerWorker
}

// give returns a slot's GPUs: to its pool's start-time groups if they were
// one, else to the spares (index order kept).
func (b *gpuBook) give(pool string, ids []string) {
	if len(ids) == 0 {
		return
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	order := b.planned[pool]
	if _, ok := order[ids[0]]; ok {
		b.own[pool] = append(b.own[pool], ids)
		slices.SortFunc(b.own[pool], func(x, y []string) int { return order[x[0]] - order[y[0]] })
		return
	}
	for _, g := range b.inv {
		if slices.Contains(ids, g.UUID) {
			b.spare = append(b.spare, g)
		}
	}
	slices.SortFunc(b.spare, func(x, y hw.GPU) int { return x.Index - y.Index })
}
