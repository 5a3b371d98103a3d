package policy

import (
	"errors"
	"fmt"
	"maps"
	"slices"
	"strings"
	"sync"
)

// Constructors of each kind: they check opts (with env.Options) and build
// the policy; no I/O.
type (
	NodeFactory       func(env Env, opts Options) (NodeSelector, error)
	NodeFilterFactory func(env Env, opts Options) (NodeFilter, error)
	WorkerFactory     func(env Env, opts Options) (WorkerSelector, error)
	QueueFactory      func(env Env, opts Options) (QueuePolicy, error)
	AffinityFactory   func(env Env, opts Options) (AffinityPolicy, error)
)

// Registry maps (kind, name) to the constructor of a policy. Builtin
// returns one holding the shipped policies; register more before the node
// starts. Safe for concurrent use.
type Registry struct {
	mu       sync.RWMutex
	node     map[string]NodeFactory
	filter   map[string]NodeFilterFactory
	worker   map[string]WorkerFactory
	queue    map[string]QueueFactory
	affinity map[string]AffinityFactory
}

// NewRegistry returns an empty registry.
func NewRegistry() *Registry {
	return &Registry{
		node: map[string]NodeFactory{}, filter: map[string]NodeFilterFactory{},
		worker: map[string]WorkerFactory{}, queue: map[string]QueueFactory{},
		affinity: map[string]AffinityFactory{},
	}
}

// Builtin returns a new registry holding the shipped policies.
func Builtin() *Registry {
	r := NewRegistry()
	must := func(err error) {
		if err != nil {
			panic(err) // the shipped names are distinct
		}
	}
	must(r.RegisterNode(TwoChoices, newTwoChoices))
	must(r.RegisterNode(Rendezvous, newRendezvous))
	must(r.RegisterNode(Locality, newLocality))
	must(r.RegisterNodeFilter(FilterLabels, newLabelsFilter))
	must(r.RegisterNodeFilter(FilterGPU, newGPUFilter))
	must(r.RegisterWorker(SessionSticky, newSessionSticky))
	must(r.RegisterWorker(LeastLoaded, newLeastLoaded))
	must(r.RegisterWorker(MostRecentlyUsed, newMostRecentlyUsed))
	must(r.RegisterQueue(Queue, newBoundedQueue))
	must(r.RegisterQueue(Reject, newReject))
	must(r.RegisterQueue(Spillover, newSpillover))
	must(r.RegisterAffinity(Hint, fixedAffinity(HintPolicy)))
	must(r.RegisterAffinity(StrictQueue, fixedAffinity(StrictQueuePolicy)))
	must(r.RegisterAffinity(StrictFailFast, fixedAffinity(StrictFailFastPolicy)))
	return r
}

// ErrRegistered is returned when a (kind, name) is registered twice.
var ErrRegistered = errors.New("policy already registered")

func register[F any](r *Registry, m map[string]F, kind Kind, name string, f F) error {
	if name == "" || strings.ContainsAny(name, " \t\n") {
		return fmt.Errorf("%s policy name %q: must be a non-empty word", kind, name)
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if _, ok := m[name]; ok {
		return fmt.Errorf("%w: %s policy %q", ErrRegistered, kind, name)
	}
	m[name] = f
	return nil
}

// RegisterNode adds a node selector.
func (r *Registry) RegisterNode(name string, f NodeFactory) error {
	return register(r, r.node, KindNode, name, f)
}

// RegisterNodeFilter adds a node filter.
func (r *Registry) RegisterNodeFilter(name string, f NodeFilterFactory) error {
	return register(r, r.filter, KindNodeFilter, name, f)
}

// RegisterWorker adds a worker selector.
func (r *Registry) RegisterWorker(name string, f WorkerFactory) error {
	return register(r, r.worker, KindWorker, name, f)
}

// RegisterQueue adds a queue policy.
func (r *Registry) RegisterQueue(name string, f QueueFactory) error {
	return register(r, r.queue, KindQueue, name, f)
}

// RegisterAffinity adds an affinity policy.
func (r *Registry) RegisterAffinity(name string, f AffinityFactory) error {
	return register(r, r.affinity, KindAffinity, name, f)
}

// Names lists the registered names of a kind, sorted.
func (r *Registry) Names(k Kind) []string {
	r.mu.RLock()
	defer r.mu.RUnlock()
	switch k {
	case KindNode:
		return slices.Sorted(maps.Keys(r.node))
	case KindNodeFilter:
		return slices.Sorted(maps.Keys(r.filter))
	case KindWorker:
		return slices.Sorted(maps.Keys(r.worker))
	case KindQueue:
		return slices.Sorted(maps.Keys(r.queue))
	case KindAffinity:
		return slices.Sorted(maps.Keys(r.affinity))
	}
	return nil
}

func lookup[F any](r *Registry, m map[string]F, kind Kind, key, name string) (F, error) {
	r.mu.RLock()
	f, ok := m[name]
	r.mu.RUnlock()
	if !ok {
		var zero F
		return zero, fmt.Errorf("%s.name: unknown %s policy %q (known: %s)", key, kind, name, strings.Join(r.Names(kind), ", "))
	}
	return f, nil
}

func build[T any, F ~func(Env, Options) (T, error)](r *Registry, m map[string]F, kind Kind, env Env, key string, ref Ref, errs *[]error) T {
	var zero T
	f, err := lookup(r, m, kind, key, ref.Name)
	if err != nil {
		*errs = append(*errs, err)
		return zero
	}
	env.Key = key
	p, err := f(env, ref.Options)
	if err != nil {
		*errs = append(*errs, err)
		return zero
	}
	return p
}

// Build constructs a pool's policies from its config; env.Key is the
// config key of the pool's policies block ("pools[gpu].policies"). Every
// Ref must name a policy (defaults are the caller's to fill). The error
// lists every problem, each naming its key.
func (r *Registry) Build(env Env, c Config) (*Set, error) {
	var errs []error
	base := env.Key
	s := &Set{
		Node:        build(r, r.node, KindNode, env, base+".node", c.Node, &errs),
		SessionNode: build(r, r.node, KindNode, env, base+".session_node", c.SessionNode, &errs),
		Worker:      build(r, r.worker, KindWorker, env, base+".worker", c.Worker, &errs),
		Queue:       build(r, r.queue, KindQueue, env, base+".queue", c.Queue, &errs),
		Affinity:    build(r, r.affinity, KindAffinity, env, base+".affinity", c.Affinity, &errs),
	}
	if len(c.NodeFilters) > 0 {
		s.FilterKey = base + ".node_filters"
	}
	for i, ref := range c.NodeFilters {
		key := fmt.Sprintf("%s.node_filters[%d]", base, i)
		f := build(r, r.filter, KindNodeFilter, env, key, ref, &errs)
		if f == nil {
			continue
		}
		if err := f.Constrain(&s.Need); err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", key, err))
		}
	}
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	return s, nil
}
