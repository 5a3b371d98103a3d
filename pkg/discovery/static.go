package discovery

import (
	"context"
	"fmt"
	"maps"
	"sync"
	"time"

	"github.com/rs/zerolog"
)

// staticCluster is the state a StaticRegistrar and its StaticDirectory share:
// the configured peers plus the local node.
type staticCluster struct {
	pub *publisher

	mu      sync.Mutex
	peers   map[NodeID]Peer // from config
	self    *Node
	healthy bool
	active  bool // registered and not deregistered
}

func (c *staticCluster) republish() {
	c.mu.Lock()
	defer c.mu.Unlock()
	peers := make(map[NodeID]Peer, len(c.peers)+1)
	maps.Copy(peers, c.peers)
	if c.self != nil {
		delete(peers, c.self.ID)
		if c.active && c.healthy {
			peers[c.self.ID] = Peer{Node: *c.self, Healthy: true, Source: SourceStatic}
		}
	}
	list := make([]Peer, 0, len(peers))
	for _, p := range peers {
		list = append(list, p)
	}
	c.pub.publish(list, false, nil, time.Now())
}

// StaticRegistrar publishes the local node into its StaticDirectory only;
// nothing leaves the process. Safe for concurrent use.
type StaticRegistrar struct {
	c      *staticCluster
	labels map[string]string
}

// StaticDirectory serves the peers from configuration plus the local node
// (while registered and healthy). Safe for concurrent use.
type StaticDirectory struct {
	c *staticCluster
}

// NewStatic returns a registrar and directory pair for cfg.Static. The
// directory's first snapshot (Seq 1) holds the configured peers; the local
// node joins it when registered and healthy. No I/O.
func NewStatic(cfg Config) (*StaticRegistrar, *StaticDirectory, error) {
	cfg.Kind = KindStatic
	if err := cfg.Validate(); err != nil {
		return nil, nil, err
	}
	c := &staticCluster{pub: newPublisher(), peers: make(map[NodeID]Peer)}
	for _, sp := range cfg.Static.Peers {
		n := Node{ID: sp.ID, Addr: sp.Addr, Labels: maps.Clone(sp.Labels)}
		if len(sp.Pools) > 0 {
			n.Pools = make(map[string]PoolOffer, len(sp.Pools))
			for name, slots := range sp.Pools {
				n.Pools[name] = PoolOffer{Slots: slots}
			}
		}
		if len(n.Labels) == 0 {
			n.Labels = nil
		}
		c.peers[sp.ID] = Peer{Node: n, Healthy: true, Source: SourceStatic}
	}
	c.republish()
	return &StaticRegistrar{c: c, labels: maps.Clone(cfg.Labels)}, &StaticDirectory{c: c}, nil
}

// Register publishes n into the directory (see Registrar). It fails only for
// an invalid Node.
func (r *StaticRegistrar) Register(_ context.Context, n Node) error {
	n, err := prepareNode(n, r.labels)
	if err != nil {
		return err
	}
	r.c.mu.Lock()
	if r.c.self != nil && r.c.active && r.c.self.ID != n.ID {
		r.c.mu.Unlock()
		return fmt.Errorf("%w: node id cannot change from %q to %q; Deregister first", ErrInvalidNode, r.c.self.ID, n.ID)
	}
	r.c.self, r.c.active = &n, true
	r.c.mu.Unlock()
	r.c.republish()
	return nil
}

// Update replaces the published node at once (there is nothing to
// rate-limit).
func (r *StaticRegistrar) Update(n Node) error {
	n, err := prepareNode(n, r.labels)
	if err != nil {
		return err
	}
	r.c.mu.Lock()
	switch {
	case r.c.self == nil || !r.c.active:
		r.c.mu.Unlock()
		return ErrNotRegistered
	case r.c.self.ID != n.ID:
		r.c.mu.Unlock()
		return fmt.Errorf("%w: node id cannot change from %q to %q", ErrInvalidNode, r.c.self.ID, n.ID)
	}
	r.c.self = &n
	r.c.mu.Unlock()
	r.c.republish()
	return nil
}

// SetHealthy adds the local node to the directory (true) or removes it.
func (r *StaticRegistrar) SetHealthy(healthy bool) {
	r.c.mu.Lock()
	r.c.healthy = healthy
	r.c.mu.Unlock()
	r.c.republish()
}

// Run blocks until ctx is done and returns nil: static registration needs no
// upkeep.
func (r *StaticRegistrar) Run(ctx context.Context) error {
	<-ctx.Done()
	return nil
}

// Deregister removes the local node from the directory.
func (r *StaticRegistrar) Deregister(context.Context) error {
	r.c.mu.Lock()
	r.c.active = false
	r.c.mu.Unlock()
	r.c.republish()
	return nil
}

// Current returns the latest snapshot (see Directory).
func (d *StaticDirectory) Current() *Snapshot { return d.c.pub.current() }

// Run blocks until ctx is done and returns nil: snapshots change only through
// the registrar.
func (d *StaticDirectory) Run(ctx context.Context) error {
	<-ctx.Done()
	return nil
}

// New returns the Registrar and Directory of the backend cfg.Kind selects,
// after validating cfg. No I/O. Use the concrete constructors for access to
// backend-specific methods (Requests on the consul types, through
// RequestCounter).
func New(cfg Config, log zerolog.Logger) (Registrar, Directory, error) {
	if err := cfg.Validate(); err != nil {
		return nil, nil, err
	}
	switch cfg.Kind {
	case KindConsul:
		r, err := NewConsulRegistrar(cfg, log)
		if err != nil {
			return nil, nil, err
		}
		d, err := NewConsulDirectory(cfg, log)
		if err != nil {
			return nil, nil, err
		}
		return r, d, nil
	default:
		r, d, err := NewStatic(cfg)
		if err != nil {
			return nil, nil, err
		}
		return r, d, nil
	}
}
