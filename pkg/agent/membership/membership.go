// Package membership is the node's registration of itself in discovery:
// it publishes the node once it is ready, keeps the published data current
// as operator intent changes (cordon, drain, pool sizes), follows the
// node's health, deregisters first when the node stops, and runs the
// discovery directory the cluster layer routes on. Nothing here runs per
// request: ListNodes and routers read the directory's pushed snapshots.
package membership

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/rs/zerolog"

	"github.com/snakepit/snakepit/pkg/discovery"
	"github.com/snakepit/snakepit/pkg/hw"
	"github.com/snakepit/snakepit/pkg/worker"
)

// The peer protocol range this node publishes (DESIGN.md decision 11): a
// router forwards only to peers whose range overlaps its own.
const (
	ProtoMin = 1
	ProtoMax = 1
)

// Config configures the membership of a node.
type Config struct {
	// NodeID and Version are published as they are.
	NodeID  string
	Version string
	// Addr is the address peers dial (see PublishAddr).
	Addr string
	// Discovery selects and configures the backend.
	Discovery discovery.Config
	// DeregisterTimeout bounds the deregistration a stopping node does
	// first.
	DeregisterTimeout time.Duration
}

// Local is the node's pool engine, as membership reads it.
type Local interface {
	Ready() <-chan struct{}
	IntentChanges() <-chan struct{}
	Admission() (cordoned, draining bool)
	Pools() []string
	Slots(pool string) int
	Tools(pool string) (map[string][]worker.Tool, error)
}

// Deps are what membership is given.
type Deps struct {
	Log   zerolog.Logger
	Local Local
	// GPUs is the host's inventory, published as a summary.
	GPUs hw.Inventory
}

// Membership publishes the node to discovery and follows its peers. It owns
// a discovery.Registrar and a discovery.Directory.
type Membership struct {
	cfg   Config
	local Local
	log   zerolog.Logger
	reg   discovery.Registrar
	dir   discovery.Directory
	gpus  discovery.GPUSummary

	self atomic.Pointer[discovery.Node] // last published, nil before Register

	deregMu      sync.Mutex
	deregistered bool // guarded by deregMu; no Register or Update after it
}

// New builds the registrar and directory that cfg.Discovery selects (it
// must be valid). No I/O.
func New(cfg Config, deps Deps) (*Membership, error) {
	reg, dir, err := discovery.New(cfg.Discovery, deps.Log)
	if err != nil {
		return nil, fmt.Errorf("discovery: %w", err)
	}
	return &Membership{
		cfg:   cfg,
		local: deps.Local,
		log:   deps.Log.With().Str("component", "cluster").Logger(),
		reg:   reg,
		dir:   dir,
		gpus:  GPUSummary(deps.GPUs),
	}, nil
}

// GPUSummary is what a node publishes about its GPUs.
func GPUSummary(inv hw.Inventory) discovery.GPUSummary {
	models := inv.GPUModels()
	slices.Sort(models)
	return discovery.GPUSummary{Count: len(inv.GPUs), Models: models, MemoryBytes: inv.GPUMemoryTotal()}
}

// Requests is how many requests the registrar and the directory have sent
// their backend (0 for static discovery).
func (m *Membership) Requests() uint64 {
	var n uint64
	for _, x := range []any{m.reg, m.dir} {
		if rc, ok := x.(discovery.RequestCounter); ok {
			n += rc.Requests()
		}
	}
	return n
}

// SetAddr sets the address to publish (Config.Addr), once the node's
// listener is bound; call it before Run.
func (m *Membership) SetAddr(addr string) { m.cfg.Addr = addr }

// Directory returns the node's view of its cluster, for routing.
func (m *Membership) Directory() discovery.Directory { return m.dir }

// Kind names the discovery backend.
func (m *Membership) Kind() string { return m.cfg.Discovery.Kind }

// PublishAddr is the address published for a node whose gRPC listener is
// bound to bound: advertise when set, else the bound address. A wildcard
// host (0.0.0.0, ::) cannot be dialled by peers; the node's config
// requires advertise then for consul, and the static backend (whose self
// entry only this node reads) gets the loopback address of the same
// family.
func PublishAddr(advertise string, bound net.Addr) string {
	if advertise != "" {
		return advertise
	}
	ap, err := netip.ParseAddrPort(bound.String())
	if err != nil {
		return bound.String()
	}
	if ip := ap.Addr(); ip.IsUnspecified() {
		lo := netip.IPv6Loopback()
		if ip.Unmap().Is4() {
			lo = netip.AddrFrom4([4]byte{127, 0, 0, 1})
		}
		return netip.AddrPortFrom(lo, ap.Port()).String()
	}
	return ap.String()
}

// Run runs the directory and the registrar until ctx is done, registering
// the node once it is ready and publishing changes of operator intent. An
// unreachable backend is a warning: the node serves locally and joins when
// the backend comes up. Run returns nil on cancellation, and an error only
// for configuration that cannot work (an unreadable token or TLS file,
// which name their key).
func (m *Membership) Run(ctx context.Context) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	errc := make(chan error, 2)
	var wg sync.WaitGroup
	for _, fn := range []func(context.Context) error{m.dir.Run, m.reg.Run} {
		wg.Go(func() {
			if err := fn(ctx); err != nil {
				errc <- err
				cancel()
			}
		})
	}
	err := m.publish(ctx)
	cancel()
	wg.Wait()
	select {
	case rerr := <-errc:
		return rerr
	default:
	}
	return err
}

// publish registers the node once it is ready, then follows operator
// intent until ctx is done.
func (m *Membership) publish(ctx context.Context) error {
	select {
	case <-m.local.Ready():
	case <-ctx.Done():
		return nil
	}
	for {
		changed := m.local.IntentChanges()
		if err := m.update(ctx); err != nil {
			return err
		}
		select {
		case <-changed:
		case <-ctx.Done():
			return nil
		}
	}
}

// update registers the node (first call) or publishes its current data.
func (m *Membership) update(ctx context.Context) error {
	m.deregMu.Lock()
	defer m.deregMu.Unlock()
	if m.deregistered {
		return nil
	}
	n := m.Describe()
	first := m.self.Load() == nil
	m.self.Store(&n)
	if !first {
		if err := m.reg.Update(n); err != nil && !errors.Is(err, discovery.ErrNotRegistered) {
			return fmt.Errorf("publish node: %w", err)
		}
		return nil
	}
	err := m.reg.Register(ctx, n)
	ev, msg := m.log.Info(), "registered"
	switch {
	case err == nil:
	case ctx.Err() != nil:
		return nil
	case errors.Is(err, discovery.ErrUnavailable):
		// Consul down or not there yet: serve locally, join later.
		ev, msg = m.log.Warn().Err(err), "discovery unreachable; serving locally, registering when it is up"
	case errors.Is(err, discovery.ErrPermission):
		// Retried: ACL policies can be fixed on the Consul side.
		ev, msg = m.log.Error().Err(err), "discovery refused the registration; serving locally, retrying"
	default:
		return fmt.Errorf("register node: %w", err)
	}
	ev.Str("node_id", string(n.ID)).Str("addr", n.Addr).Str("discovery", m.cfg.Discovery.Kind).Msg(msg)
	return nil
}

// Describe returns what the node publishes now. Call it only once the
// node is ready (operator intent is loaded then).
func (m *Membership) Describe() discovery.Node {
	cordoned, draining := m.local.Admission()
	names := m.local.Pools()
	pools := make(map[string]discovery.PoolOffer, len(names))
	h := sha256.New()
	for _, name := range names {
		pools[name] = discovery.PoolOffer{Slots: m.local.Slots(name)}
		byPool, _ := m.local.Tools(name)
		tools := make([]string, 0, len(byPool[name]))
		for _, t := range byPool[name] {
			tools = append(tools, t.Name)
		}
		slices.Sort(tools)
		for _, t := range tools {
			fmt.Fprintf(h, "%s\x00%s\n", name, t)
		}
	}
	return discovery.Node{
		ID:          discovery.NodeID(m.cfg.NodeID),
		Addr:        m.cfg.Addr,
		Version:     m.cfg.Version,
		ProtoMin:    ProtoMin,
		ProtoMax:    ProtoMax,
		Pools:       pools,
		GPUs:        m.gpus,
		ToolsDigest: "sha256:" + hex.EncodeToString(h.Sum(nil)),
		Cordoned:    cordoned,
		Draining:    draining,
	}
}

// SetHealthy passes the node's health to the registrar: while false the
// registration is critical and not refreshed, so peers drop the node. It
// does not block.
func (m *Membership) SetHealthy(healthy bool) { m.reg.SetHealthy(healthy) }

// Deregister removes the registration (bounded by DeregisterTimeout) so
// that peers stop routing here at once, and keeps Run from registering
// again. A backend that cannot be reached is logged: the TTL check then
// lapses and the instance goes critical. Safe to call more than once.
func (m *Membership) Deregister(ctx context.Context) {
	m.deregMu.Lock()
	defer m.deregMu.Unlock()
	if m.deregistered {
		return
	}
	m.deregistered = true
	if m.self.Load() == nil {
		return // never registered
	}
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), m.cfg.DeregisterTimeout)
	defer cancel()
	t0 := time.Now()
	if err := m.reg.Deregister(ctx); err != nil {
		m.log.Warn().Err(err).Msg("deregister failed; peers drop this node when its TTL lapses")
		return
	}
	m.log.Info().Dur("took", time.Since(t0)).Msg("deregistered")
}

// Listed is one node of a Listing.
type Listed struct {
	discovery.Node
	Healthy bool
	Self    bool
}

// Listing is the cluster as this node sees it.
type Listing struct {
	Stale       bool
	Discovery   string
	SnapshotAge time.Duration // 0 before the first snapshot
	Nodes       []Listed      // by node id
}

// List reports the directory's current snapshot. The node itself is
// always listed (Self): when the snapshot lacks it (not yet registered,
// unhealthy, backend unreachable) it is listed as not healthy, with what
// it would publish.
func (m *Membership) List(now time.Time) Listing {
	snap := m.dir.Current()
	out := Listing{Stale: snap.Stale(), Discovery: m.cfg.Discovery.Kind}
	if snap.Seq() > 0 {
		out.SnapshotAge = now.Sub(snap.Taken())
	}
	selfID := discovery.NodeID(m.cfg.NodeID)
	found := false
	for _, p := range snap.Peers() {
		self := p.ID == selfID
		found = found || self
		out.Nodes = append(out.Nodes, Listed{Node: p.Node, Healthy: p.Healthy, Self: self})
	}
	if !found {
		self := discovery.Node{ID: selfID, Version: m.cfg.Version, GPUs: m.gpus, Addr: m.cfg.Addr}
		if n := m.self.Load(); n != nil {
			self = *n
		}
		out.Nodes = append(out.Nodes, Listed{Node: self, Self: true})
		slices.SortFunc(out.Nodes, func(a, b Listed) int {
			switch {
			case a.ID < b.ID:
				return -1
			case a.ID > b.ID:
				return 1
			}
			return 0
		})
	}
	return out
}
