package agent

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"maps"
	"net"
	"net/netip"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/rs/zerolog"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/snakepit/snakepit/pkg/discovery"
	"github.com/snakepit/snakepit/pkg/hw"
	snakepitv1 "github.com/snakepit/snakepit/proto/snakepit/v1"
)

// The peer protocol range this node publishes (DESIGN.md decision 11): a
// router forwards only to peers whose range overlaps its own.
const (
	clusterProtoMin = 1
	clusterProtoMax = 1
)

// DeregisterTimeout bounds the deregistration a stopping node does first.
const DeregisterTimeout = 5 * time.Second

// membership publishes the node to discovery and follows its peers. It owns a
// discovery.Registrar and a discovery.Directory: the registration is made
// once the node is ready (a node starts unhealthy and takes no routed work
// before), kept current as operator intent changes (cordon, drain, pool
// sizes), follows the node's health (setHealthy) and is removed first when
// the node stops (deregister). Nothing here runs per request: ListNodes
// and routers read the directory's pushed snapshots.
type membership struct {
	node *Node
	log  zerolog.Logger
	kind string
	reg  discovery.Registrar
	dir  discovery.Directory
	gpus discovery.GPUSummary

	addr atomic.Pointer[string]         // published address, set by run
	self atomic.Pointer[discovery.Node] // last published, nil before Register

	deregMu      sync.Mutex
	deregistered bool // guarded by deregMu; no Register or Update after it
}

// newMembership builds the registrar and directory that cfg.Discovery selects
// for n (already validated by New). No I/O.
func newMembership(n *Node, inv hw.Inventory, log zerolog.Logger) (*membership, error) {
	cfg := n.Config().Discovery
	reg, dir, err := discovery.New(cfg, log)
	if err != nil {
		return nil, fmt.Errorf("discovery: %w", err)
	}
	m := &membership{
		node: n,
		log:  log.With().Str("component", "cluster").Logger(),
		kind: cfg.Kind,
		reg:  reg,
		dir:  dir,
		gpus: gpuSummary(inv),
	}
	if n.metrics != nil {
		n.metrics.reg.MustRegister(prometheus.NewCounterFunc(prometheus.CounterOpts{
			Namespace: "snakepit", Name: "discovery_requests_total",
			Help: "Requests this node sent its discovery backend (Consul): registration, check refreshes, blocking queries. Flat under load: nothing is sent per call.",
		}, func() float64 { return float64(m.requests()) }))
	}
	return m, nil
}

// requests is how many requests the registrar and the directory have sent
// their backend (0 for static discovery).
func (c *membership) requests() uint64 {
	var n uint64
	for _, x := range []any{c.reg, c.dir} {
		if rc, ok := x.(discovery.RequestCounter); ok {
			n += rc.Requests()
		}
	}
	return n
}

// Directory returns the node's view of its cluster, for routing.
func (c *membership) Directory() discovery.Directory { return c.dir }

// publishAddr is the address published for a node whose gRPC listener is
// bound to bound: advertise when set, else the bound address. A wildcard
// host (0.0.0.0, ::) cannot be dialled by peers; Validate requires
// advertise then for consul, and the static backend (whose self entry only
// this node reads) gets the loopback address of the same family.
func publishAddr(cfg Config, bound net.Addr) string {
	if cfg.Advertise != "" {
		return cfg.Advertise
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

// run runs the directory and the registrar until ctx is done, registering
// the node at addr once it is ready and publishing changes of operator
// intent. An unreachable backend is a warning: the node serves locally and
// joins when the backend comes up. run returns nil on cancellation, and an
// error only for configuration that cannot work (an unreadable token or
// TLS file, which name their key).
func (c *membership) run(ctx context.Context, addr string) error {
	c.addr.Store(&addr)
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	errc := make(chan error, 2)
	var wg sync.WaitGroup
	for _, fn := range []func(context.Context) error{c.dir.Run, c.reg.Run} {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := fn(ctx); err != nil {
				errc <- err
				cancel()
			}
		}()
	}
	err := c.publish(ctx)
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
func (c *membership) publish(ctx context.Context) error {
	select {
	case <-c.node.Ready():
	case <-ctx.Done():
		return nil
	}
	for {
		changed := c.node.IntentChanges()
		if err := c.update(ctx); err != nil {
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
func (c *membership) update(ctx context.Context) error {
	c.deregMu.Lock()
	defer c.deregMu.Unlock()
	if c.deregistered {
		return nil
	}
	n := c.describe()
	first := c.self.Load() == nil
	c.self.Store(&n)
	if !first {
		if err := c.reg.Update(n); err != nil && !errors.Is(err, discovery.ErrNotRegistered) {
			return fmt.Errorf("publish node: %w", err)
		}
		return nil
	}
	err := c.reg.Register(ctx, n)
	ev, msg := c.log.Info(), "registered"
	switch {
	case err == nil:
	case ctx.Err() != nil:
		return nil
	case errors.Is(err, discovery.ErrUnavailable):
		// Consul down or not there yet: serve locally, join later.
		ev, msg = c.log.Warn().Err(err), "discovery unreachable; serving locally, registering when it is up"
	case errors.Is(err, discovery.ErrPermission):
		// Retried: ACL policies can be fixed on the Consul side.
		ev, msg = c.log.Error().Err(err), "discovery refused the registration; serving locally, retrying"
	default:
		return fmt.Errorf("register node: %w", err)
	}
	ev.Str("node_id", string(n.ID)).Str("addr", n.Addr).Str("discovery", c.kind).Msg(msg)
	return nil
}

// describe returns what the node publishes now. Call it only once the
// node is ready (operator intent is loaded then).
func (c *membership) describe() discovery.Node {
	in := c.node.Intent()
	st := c.node.Status()
	pools := make(map[string]discovery.PoolOffer, len(st.Pools))
	h := sha256.New()
	for _, p := range st.Pools {
		pools[p.Name] = discovery.PoolOffer{Slots: p.Size * p.Capacity}
		names := make([]string, 0, len(p.Tools))
		for _, t := range p.Tools {
			names = append(names, t.Name)
		}
		slices.Sort(names)
		for _, name := range names {
			fmt.Fprintf(h, "%s\x00%s\n", p.Name, name)
		}
	}
	return discovery.Node{
		ID:          discovery.NodeID(c.node.ID()),
		Addr:        *c.addr.Load(),
		Version:     Version,
		ProtoMin:    clusterProtoMin,
		ProtoMax:    clusterProtoMax,
		Pools:       pools,
		GPUs:        c.gpus,
		ToolsDigest: "sha256:" + hex.EncodeToString(h.Sum(nil)),
		Cordoned:    in.Cordoned || in.Draining,
		Draining:    in.Draining,
	}
}

// setHealthy passes the node's health to the registrar: while false the
// registration is critical and not refreshed, so peers drop the node.
// It does not block.
func (c *membership) setHealthy(healthy bool) { c.reg.SetHealthy(healthy) }

// deregister removes the registration (bounded by DeregisterTimeout) so
// that peers stop routing here at once, and keeps run from registering
// again. A backend that cannot be reached is logged: the TTL check then
// lapses and the instance goes critical. Safe to call more than once.
func (c *membership) deregister(ctx context.Context) {
	c.deregMu.Lock()
	defer c.deregMu.Unlock()
	if c.deregistered {
		return
	}
	c.deregistered = true
	if c.self.Load() == nil {
		return // never registered
	}
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), DeregisterTimeout)
	defer cancel()
	t0 := time.Now()
	if err := c.reg.Deregister(ctx); err != nil {
		c.log.Warn().Err(err).Msg("deregister failed; peers drop this node when its TTL lapses")
		return
	}
	c.log.Info().Dur("took", time.Since(t0)).Msg("deregistered")
}

// listNodes answers ListNodes from the directory's current snapshot. The
// answering node is always listed (self): when the snapshot lacks it (not
// yet registered, unhealthy, backend unreachable) it is listed as not
// healthy, with what it would publish.
func (c *membership) listNodes(now time.Time) *snakepitv1.ListNodesResponse {
	snap := c.dir.Current()
	resp := &snakepitv1.ListNodesResponse{Stale: snap.Stale(), Discovery: c.kind}
	if snap.Seq() > 0 {
		resp.SnapshotAge = durationpb.New(now.Sub(snap.Taken()))
	}
	selfID := discovery.NodeID(c.node.ID())
	found := false
	for _, p := range snap.Peers() {
		self := p.ID == selfID
		found = found || self
		resp.Nodes = append(resp.Nodes, nodeToProto(p.Node, p.Healthy, self))
	}
	if !found {
		self := discovery.Node{ID: selfID, Version: Version, GPUs: c.gpus}
		if n := c.self.Load(); n != nil {
			self = *n
		} else if a := c.addr.Load(); a != nil {
			self.Addr = *a
		}
		resp.Nodes = append(resp.Nodes, nodeToProto(self, false, true))
		slices.SortFunc(resp.Nodes, func(a, b *snakepitv1.Node) int {
			switch {
			case a.GetNodeId() < b.GetNodeId():
				return -1
			case a.GetNodeId() > b.GetNodeId():
				return 1
			}
			return 0
		})
	}
	return resp
}

func nodeToProto(n discovery.Node, healthy, self bool) *snakepitv1.Node {
	out := &snakepitv1.Node{
		NodeId:         string(n.ID),
		Address:        n.Addr,
		Healthy:        healthy,
		Cordoned:       n.Cordoned,
		Draining:       n.Draining,
		Version:        n.Version,
		GpuCount:       uint32(max(n.GPUs.Count, 0)),
		GpuModels:      slices.Clone(n.GPUs.Models),
		GpuMemoryBytes: n.GPUs.MemoryBytes,
		Labels:         maps.Clone(n.Labels),
		Self:           self,
	}
	if len(n.Pools) > 0 {
		out.Pools = make(map[string]uint32, len(n.Pools))
		for name, p := range n.Pools {
			out.Pools[name] = uint32(max(p.Slots, 0))
		}
	}
	return out
}

// clusterService adds the cluster's RPCs to the Snakepit service.
type clusterService struct {
	*service
	members *membership
}

// ListNodes reports the cluster as this node sees it.
func (s *clusterService) ListNodes(context.Context, *snakepitv1.ListNodesRequest) (*snakepitv1.ListNodesResponse, error) {
	return s.members.listNodes(time.Now()), nil
}

// discoveryWithDefaults fills the zero values of d with the defaults, so a
// Config built in code without Discovery is a standalone static node.
func discoveryWithDefaults(d discovery.Config) discovery.Config {
	def := discovery.DefaultConfig()
	if d.Kind == "" {
		d.Kind = def.Kind
	}
	c, dc := &d.Consul, def.Consul
	if c.Address == "" {
		c.Address = dc.Address
	}
	if c.Service == "" {
		c.Service = dc.Service
	}
	if c.TTL == 0 {
		c.TTL = dc.TTL
	}
	if c.DeregisterCriticalAfter == 0 {
		c.DeregisterCriticalAfter = dc.DeregisterCriticalAfter
	}
	if c.UpdateInterval == 0 {
		c.UpdateInterval = dc.UpdateInterval
	}
	if c.WatchWait == 0 {
		c.WatchWait = dc.WatchWait
	}
	return d
}

// validateCluster checks advertise and the discovery keys (c has its
// defaults applied).
func validateCluster(c Config, bad func(string, ...any)) {
	if err := c.Discovery.Validate(); err != nil {
		// Each line already names its discovery.* key.
		for _, e := range unjoin(err) {
			bad("%s", trimBadConfig(e))
		}
	}
	if c.Advertise != "" {
		host, port, err := net.SplitHostPort(c.Advertise)
		p, perr := strconv.Atoi(port)
		switch {
		case err != nil:
			bad("advertise must be host:port (got %q): %v", c.Advertise, err)
		case host == "":
			bad("advertise must name a host peers can dial (got %q)", c.Advertise)
		case perr != nil || p < 1 || p > 65535:
			bad("advertise port must be 1-65535 (got %q)", c.Advertise)
		}
		if ip, err := netip.ParseAddr(host); err == nil && ip.IsUnspecified() {
			bad("advertise must not be a wildcard address (got %q); publish an address peers can dial", c.Advertise)
		}
		return
	}
	if c.Discovery.Kind != discovery.KindConsul {
		return
	}
	host, _, err := splitHostPort(c.Listen)
	if err != nil {
		return // reported by the listen check
	}
	if host == "" || host == "[::]" {
		bad("advertise must be set when listen has a wildcard host (listen %q): peers need an address they can dial", c.Listen)
	} else if ip, err := netip.ParseAddr(host); err == nil && ip.IsUnspecified() {
		bad("advertise must be set when listen has a wildcard host (listen %q): peers need an address they can dial", c.Listen)
	}
}

// unjoin splits an errors.Join result into its errors.
func unjoin(err error) []error {
	if j, ok := err.(interface{ Unwrap() []error }); ok {
		return j.Unwrap()
	}
	return []error{err}
}

// trimBadConfig drops discovery's "invalid discovery config: " prefix, so
// the message starts with the key like every other config error.
func trimBadConfig(err error) string {
	msg := err.Error()
	prefix := discovery.ErrBadConfig.Error() + ": "
	if len(msg) > len(prefix) && msg[:len(prefix)] == prefix {
		return msg[len(prefix):]
	}
	return msg
}
