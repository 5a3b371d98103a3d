// Package discovery publishes this node to the cluster and watches its peers.
//
// Two small interfaces carry it. A Registrar publishes the local node (its
// address, version, capacity, GPUs, labels, cordon state) and keeps its health
// current; a Directory watches the cluster and pushes immutable Snapshots of
// the healthy peers. Two backends implement both:
//
//   - static (the embedded default): the peers come from configuration and no
//     external service is involved; a standalone node is a static cluster of
//     one, itself.
//   - consul: the node is a service instance in Consul with a TTL check that
//     the Registrar refreshes at TTL/3 while the node is healthy; the
//     Directory follows the healthy instances with blocking queries.
//
// Only slow-changing data is published (see Node); load travels on responses.
// docs/discovery.md describes the Consul layout and the failure behaviour.
package discovery

import (
	"context"
	"errors"
	"maps"
	"slices"
)

// NodeID names a snakepitd node. It is unique in its cluster, chosen by the
// operator (or derived from the host name) and stable across daemon
// restarts: a restarted daemon is the same node and takes over its
// registration. It names a host's daemon, not one process lifetime, so it is
// reused by design when that daemon comes back. In Consul it is the service
// instance ID. Allowed: 1-128 of [A-Za-z0-9._-], starting with a letter or
// digit.
type NodeID string

// Source says which backend a Peer came from.
type Source string

// Sources of peers.
const (
	SourceStatic Source = "static"
	SourceConsul Source = "consul"
)

// Node is what a node publishes about itself. All of it changes slowly;
// publishing is rate-limited (see ConsulConfig.UpdateInterval).
type Node struct {
	// ID is the node's identity; it cannot change once registered.
	ID NodeID
	// Addr is the host:port of the node's gRPC endpoint as peers dial it
	// (not a wildcard address).
	Addr string
	// Version is the daemon's version string.
	Version string
	// ProtoMin and ProtoMax bound the peer protocol versions this node
	// speaks (inclusive). 0, 0 means unknown (static peers from config).
	ProtoMin, ProtoMax int
	// Pools maps pool names to what each pool offers.
	Pools map[string]PoolOffer
	// GPUs summarises the node's GPUs.
	GPUs GPUSummary
	// Labels are operator-chosen key/value pairs for placement filters.
	Labels map[string]string
	// ToolsDigest identifies the set of tools the node's pools serve, so
	// routers can tell whether two nodes serve the same tools.
	ToolsDigest string
	// Cordoned: the node takes no new sessions. Draining: the node is
	// finishing its work before it stops. Changes to either are published
	// without waiting for the update interval.
	Cordoned bool
	Draining bool
}

// PoolOffer is what one pool of a node offers to routers.
type PoolOffer struct {
	// Slots is the pool's worker capacity: workers × concurrency per worker.
	Slots int
}

// GPUSummary is the published digest of a node's GPUs.
type GPUSummary struct {
	// Count is the number of GPUs.
	Count int
	// Models are the distinct product names, sorted.
	Models []string
	// MemoryBytes is the total memory of all GPUs.
	MemoryBytes uint64
}

// Clone returns a deep copy of n (maps and slices are not shared).
func (n Node) Clone() Node {
	n.Pools = maps.Clone(n.Pools)
	n.Labels = maps.Clone(n.Labels)
	n.GPUs.Models = slices.Clone(n.GPUs.Models)
	return n
}

// Peer is a Node as a Directory sees it.
type Peer struct {
	Node
	// Healthy reports the backend's view: for consul, every check of the
	// instance passes (snapshots hold only such peers); static peers are
	// always healthy, as static discovery has no health source and routers
	// learn about dead peers from failed calls.
	Healthy bool
	// Source is the backend that reported the peer.
	Source Source
}

// Registrar publishes the local node. Implementations: *ConsulRegistrar,
// *StaticRegistrar. Methods are safe for concurrent use.
//
// Order of use: Register once, start Run, call SetHealthy(true) once the
// pools can serve (a node starts unhealthy, so it takes no traffic before),
// Update whenever published data changes, and on graceful stop Deregister
// before cancelling Run's context.
type Registrar interface {
	// Register publishes n. It returns an error for an invalid Node and for a
	// backend that refuses it; when the backend is unreachable the error
	// wraps ErrUnavailable, the registration is kept, and Run completes it
	// when the backend comes back. Calling Register again replaces the Node.
	Register(ctx context.Context, n Node) error
	// Update replaces the published Node without waiting for the backend:
	// Run publishes it, at most once per update interval, latest wins
	// (cordon and drain changes go out at once). It fails only for an
	// invalid Node or a changed ID, and when called before Register.
	Update(n Node) error
	// SetHealthy sets whether the node can serve. While it is false the
	// registration is not refreshed and is marked critical, so watchers
	// drop the node; true makes it passing again. It does not block.
	SetHealthy(healthy bool)
	// Run keeps the registration alive (refresh, re-register after the
	// backend forgot it, publish updates, retry with backoff) until ctx is
	// done, then returns nil. It does not deregister.
	Run(ctx context.Context) error
	// Deregister removes the registration now and stops Run from
	// publishing it again (until the next Register).
	Deregister(ctx context.Context) error
}

// Directory watches the cluster's healthy nodes. Implementations:
// *ConsulDirectory, *StaticDirectory. Methods are safe for concurrent use.
//
// To follow changes, take a snapshot and wait on its Changed channel:
//
//	for s := dir.Current(); ; s = dir.Current() {
//		use(s)
//		select {
//		case <-s.Changed():
//		case <-ctx.Done():
//			return
//		}
//	}
type Directory interface {
	// Run watches the backend and pushes snapshots until ctx is done, then
	// returns nil. While the backend is unreachable the last peers are kept
	// in a snapshot marked Stale, and Run retries with backoff.
	Run(ctx context.Context) error
	// Current returns the latest snapshot; never nil. Before the first
	// answer from the backend it has Seq 0 and no peers.
	Current() *Snapshot
}

// RequestCounter is implemented by backends that talk to an external service
// (the consul types): Requests returns how many requests they have sent.
type RequestCounter interface {
	Requests() uint64
}

// Errors returned (wrapped) by this package.
var (
	// ErrUnavailable: the discovery backend could not be reached.
	ErrUnavailable = errors.New("discovery backend unavailable")
	// ErrPermission: the backend refused the request (Consul ACL).
	ErrPermission = errors.New("discovery backend refused access")
	// ErrInvalidNode: a Node failed validation.
	ErrInvalidNode = errors.New("invalid node")
	// ErrNotRegistered: Update or SetHealthy-dependent work before Register.
	ErrNotRegistered = errors.New("node not registered")
	// ErrBadConfig: a Config failed validation.
	ErrBadConfig = errors.New("invalid discovery config")
)
