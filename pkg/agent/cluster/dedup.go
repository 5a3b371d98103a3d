package cluster

import (
	"github.com/snakepit/snakepit/pkg/agent/call"

	"context"
	"sync"
	"time"
)

// dedup makes a caller-supplied request id an idempotency key on the node
// that executes the call (DESIGN.md decision 5): within the window, a
// second call with the same id gets the first call's outcome instead of
// running again, and one that arrives while the first still runs waits for
// it. Outcomes that say the call did not run (queue full, draining, ...)
// are forgotten, so a retry of such a call runs. At most max ids are kept;
// past it the oldest are forgotten first. Safe for concurrent use.
type dedup struct {
	window time.Duration
	max    int

	mu    sync.Mutex
	m     map[string]*dedupEntry
	order []*dedupEntry // by creation; a ring would save copies, this is simpler
}

type dedupEntry struct {
	id   string
	at   time.Time
	done chan struct{}
	res  *call.Result
	err  error
}

func newDedup(window time.Duration, max int) *dedup {
	return &dedup{window: window, max: max, m: make(map[string]*dedupEntry)}
}

// do runs fn once per id within the window and returns its outcome to every
// caller with that id. A caller whose ctx ends while it waits for the first
// run gets ctx's error; the first run goes on.
func (d *dedup) do(ctx context.Context, id string, fn func() (*call.Result, error)) (*call.Result, error) {
	now := time.Now()
	d.mu.Lock()
	if e, ok := d.m[id]; ok && now.Sub(e.at) < d.window {
		d.mu.Unlock()
		select {
		case <-e.done:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
		if e.res == nil {
			return nil, e.err
		}
		r := *e.res
		return &r, e.err
	}
	e := &dedupEntry{id: id, at: now, done: make(chan struct{})}
	d.m[id] = e
	d.order = append(d.order, e)
	d.evictLocked(now)
	d.mu.Unlock()

	res, err := fn()
	e.res, e.err = res, err
	if call.NotExecuted(err) {
		d.mu.Lock()
		if d.m[id] == e {
			delete(d.m, id)
		}
		d.mu.Unlock()
	}
	close(e.done)
	if res == nil {
		return nil, err
	}
	r := *res
	return &r, err
}

// evictLocked drops entries past the window, and the oldest while there
// are more than max.
func (d *dedup) evictLocked(now time.Time) {
	i := 0
	for ; i < len(d.order); i++ {
		e := d.order[i]
		if now.Sub(e.at) < d.window && len(d.order)-i <= d.max {
			break
		}
		if d.m[e.id] == e {
			delete(d.m, e.id)
		}
	}
	if i > 0 {
		d.order = append(d.order[:0], d.order[i:]...)
	}
}

// len returns the number of ids remembered.
func (d *dedup) len() int {
	d.mu.Lock()
	defer d.mu.Unlock()
	return len(d.m)
}
