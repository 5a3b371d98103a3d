package engine

import (
	"github.com/snakepit/snakepit/pkg/agent/call"

	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"time"

	"github.com/snakepit/snakepit/pkg/worker"
)

// Intent is what the operator wants of the node (DESIGN.md decision 8):
// desired state, persisted atomically in the state directory, restored on
// restart, and applied by the node (pool sizes) and its router (cordon).
type Intent struct {
	// Cordoned: route no new sessions or sessionless calls here.
	Cordoned bool `json:"cordoned"`
	// Draining: cordoned, and handing its sessions to their next owners.
	Draining bool `json:"draining"`
	// PoolSizes overrides the configured size of pools resized at runtime.
	PoolSizes map[string]int `json:"pool_sizes,omitempty"`
	Updated   time.Time      `json:"updated"`
}

// intentStore holds the node's intent and its file. It is created empty by
// New and loaded by Run; readers and writers wait for the load.
type intentStore struct {
	path    string
	loaded  chan struct{}
	mu      sync.Mutex
	cur     Intent
	changed chan struct{} // closed and replaced on every change
}

func newIntentStore(dir string) *intentStore {
	return &intentStore{path: filepath.Join(dir, "intent.json"), loaded: make(chan struct{}), changed: make(chan struct{})}
}

// load reads the file; a missing file is an empty intent.
func (s *intentStore) load() error {
	b, err := os.ReadFile(s.path)
	switch {
	case errors.Is(err, os.ErrNotExist):
	case err != nil:
		return fmt.Errorf("read %s: %w", s.path, err)
	default:
		if err := json.Unmarshal(b, &s.cur); err != nil {
			return fmt.Errorf("state file %s is corrupt (%v): fix or remove it (it holds cordon and pool sizes set at runtime)", s.path, err)
		}
	}
	close(s.loaded)
	return nil
}

// get returns a copy of the intent.
func (s *intentStore) get() Intent {
	<-s.loaded
	s.mu.Lock()
	defer s.mu.Unlock()
	c := s.cur
	c.PoolSizes = maps.Clone(s.cur.PoolSizes)
	return c
}

// update changes the intent with fn and persists it before it takes
// effect; on a write error nothing changes.
func (s *intentStore) update(fn func(*Intent)) (Intent, error) {
	<-s.loaded
	s.mu.Lock()
	defer s.mu.Unlock()
	next := s.cur
	next.PoolSizes = maps.Clone(s.cur.PoolSizes)
	fn(&next)
	next.Updated = time.Now().UTC()
	b, err := json.MarshalIndent(next, "", "  ")
	if err != nil {
		return s.cur, err
	}
	if err := writeFile(s.path, b, true); err != nil {
		return s.cur, fmt.Errorf("persist operator intent: %w", err)
	}
	s.cur = next
	close(s.changed)
	s.changed = make(chan struct{})
	c := next
	c.PoolSizes = maps.Clone(next.PoolSizes)
	return c, nil
}

// changes returns a channel closed at the next change.
func (s *intentStore) changes() <-chan struct{} {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.changed
}

// Intent returns the operator intent the node holds.
func (e *Engine) Intent() Intent { return e.intent.get() }

// IntentChanges returns a channel closed when the intent next changes.
func (e *Engine) IntentChanges() <-chan struct{} { return e.intent.changes() }

// Cordoned reports whether the node takes no new routed work.
func (e *Engine) Cordoned() bool {
	in := e.intent.get()
	return in.Cordoned || in.Draining
}

// Cordon marks the node cordoned, persistently.
func (e *Engine) Cordon() (Intent, error) {
	in, err := e.intent.update(func(i *Intent) { i.Cordoned = true })
	if err == nil {
		e.log.Info().Msg("cordoned")
	}
	return in, err
}

// Uncordon clears cordon and drain, persistently.
func (e *Engine) Uncordon() (Intent, error) {
	in, err := e.intent.update(func(i *Intent) { i.Cordoned, i.Draining = false, false })
	if err == nil {
		e.log.Info().Msg("uncordoned")
	}
	return in, err
}

// Resize sets a pool's worker count at runtime, persistently; see
// Pool.resize for how workers are added and retired.
func (e *Engine) Resize(pool string, size int, deadline time.Duration) (prev int, err error) {
	p, err := e.pool(pool)
	if err != nil {
		return 0, err
	}
	if size < 1 || size > maxPoolSize {
		return 0, &call.InvalidArgumentError{Field: "size", Reason: fmt.Sprintf("must be between 1 and %d (got %d)", maxPoolSize, size)}
	}
	if _, err := e.intent.update(func(i *Intent) {
		if i.PoolSizes == nil {
			i.PoolSizes = map[string]int{}
		}
		i.PoolSizes[p.cfg.Name] = size
	}); err != nil {
		return 0, err
	}
	return p.resize(size, deadline)
}

// maxPoolSize bounds a pool's size.
const maxPoolSize = 4096

// applyIntentSizes sets the slots of pools resized in an earlier run, before
// the pools start.
func (e *Engine) applyIntentSizes() {
	for name, size := range e.intent.get().PoolSizes {
		p, ok := e.pools[name]
		if !ok || size < 1 {
			e.log.Warn().Str("pool", name).Msg("ignoring a runtime size for a pool that is no longer configured")
			continue
		}
		p.mu.Lock()
		var dropped []*slot
		if size < len(p.slots) {
			dropped = slices.Clone(p.slots[size:])
			p.slots = p.slots[:size]
		}
		for i := len(p.slots); i < size; i++ {
			p.slots = append(p.slots, newSlot(worker.ID(i)))
		}
		p.nextSlot = worker.ID(size)
		p.mu.Unlock()
		for _, s := range dropped {
			p.releaseGPUs(s)
		}
		e.log.Info().Str("pool", name).Int("size", size).Msg("pool size restored from operator intent")
	}
}
