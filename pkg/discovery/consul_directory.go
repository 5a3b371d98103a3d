package discovery

import (
	"context"
	"fmt"
	"sort"
	"time"

	"github.com/hashicorp/consul/api"
	"github.com/rs/zerolog"
)

// ConsulDirectory follows the passing instances of the Consul service
// ConsulConfig.Service with blocking queries and pushes a Snapshot for each
// change. Instances whose Meta does not parse are left out, with one log line
// per instance and reason. Safe for concurrent use.
type ConsulDirectory struct {
	cc  *consulClient
	log zerolog.Logger
	pub *publisher

	// left maps instances left out of the last snapshot to the reason; used
	// only by Run, to log each reason once.
	left map[NodeID]string
}

// NewConsulDirectory returns a directory for cfg.Consul. It validates cfg but
// does no I/O.
func NewConsulDirectory(cfg Config, log zerolog.Logger) (*ConsulDirectory, error) {
	cfg.Kind = KindConsul
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	return &ConsulDirectory{
		cc:   &consulClient{cfg: cfg.Consul},
		log:  log.With().Str("component", "discovery").Str("backend", KindConsul).Logger(),
		pub:  newPublisher(),
		left: make(map[NodeID]string),
	}, nil
}

// Current returns the latest snapshot (see Directory).
func (d *ConsulDirectory) Current() *Snapshot { return d.pub.current() }

// Requests returns the number of HTTP requests sent to Consul so far.
func (d *ConsulDirectory) Requests() uint64 { return d.cc.requests.Load() }

// Run watches Consul until ctx is done (see Directory). It returns nil on
// cancellation and an error only for configuration that cannot work
// (unreadable token or TLS files). While Consul is unreachable or refuses
// the query, the last peers stay in a snapshot marked Stale and the query is
// retried with backoff.
func (d *ConsulDirectory) Run(ctx context.Context) error {
	defer d.cc.closeIdle()
	client, err := d.cc.client()
	if err != nil {
		return err
	}
	var (
		index    uint64
		failures int
	)
	for {
		start := time.Now()
		q := &api.QueryOptions{
			WaitIndex:  index,
			WaitTime:   d.cc.cfg.WatchWait,
			AllowStale: true,
		}
		entries, meta, err := client.Health().Service(d.cc.cfg.Service, "", true, q.WithContext(ctx))
		if ctx.Err() != nil {
			return nil
		}
		if err != nil {
			failures++
			err = d.cc.wrapErr("watch service "+d.cc.cfg.Service, err)
			wait := backoff(failures, DefaultRetryMin, DefaultRetryMax, jitter)
			ev := d.log.Debug()
			if failures == 1 {
				ev = d.log.Warn()
			}
			ev.Err(err).Int("failures", failures).Dur("retry_in", wait).Msg("consul watch failed; keeping last peers")
			d.pub.markStale(err, time.Now())
			// A restarted agent starts its indexes again from 1; waiting on
			// an old index could hide changes for a whole WatchWait.
			index = 0
			if !sleepCtx(ctx, wait) {
				return nil
			}
			continue
		}
		if failures > 0 {
			d.log.Info().Int("failures", failures).Msg("consul watch recovered")
			failures = 0
		}
		switch {
		case meta.LastIndex < index:
			index = 0 // the index went backwards: the agent's state was reset
		default:
			index = meta.LastIndex
		}
		d.pub.publish(d.peers(entries), false, nil, time.Now())
		if !sleepCtx(ctx, DefaultWatchMinInterval-time.Since(start)) {
			return nil
		}
	}
}

// peers turns service entries into peers, leaving out (and logging once)
// instances that cannot be used.
func (d *ConsulDirectory) peers(entries []*api.ServiceEntry) []Peer {
	sort.Slice(entries, func(i, j int) bool {
		return entryKey(entries[i]) < entryKey(entries[j])
	})
	left := make(map[NodeID]string)
	byID := make(map[NodeID]string) // id -> consul node it was taken from
	peers := make([]Peer, 0, len(entries))
	for _, e := range entries {
		if e.Service == nil {
			continue
		}
		id := NodeID(e.Service.ID)
		host := e.Service.Address
		if host == "" && e.Node != nil {
			host = e.Node.Address
		}
		n, err := decodeNode(e.Service.ID, host, e.Service.Port, e.Service.Meta)
		if err != nil {
			left[id] = err.Error()
			continue
		}
		if e.Checks.AggregatedStatus() != api.HealthPassing {
			continue
		}
		consulNode := ""
		if e.Node != nil {
			consulNode = e.Node.Node
		}
		if first, dup := byID[id]; dup {
			left[id] = fmt.Sprintf("node id registered on consul nodes %q and %q; using %q", first, consulNode, first)
			continue
		}
		byID[id] = consulNode
		peers = append(peers, Peer{Node: n, Healthy: true, Source: SourceConsul})
	}
	for id, why := range left {
		if d.left[id] != why {
			d.log.Warn().Str("node_id", string(id)).Str("reason", why).Msg("peer left out of snapshot")
		}
	}
	d.left = left
	return peers
}

func entryKey(e *api.ServiceEntry) string {
	var svc, node string
	if e.Service != nil {
		svc = e.Service.ID
	}
	if e.Node != nil {
		node = e.Node.Node
	}
	return svc + "\x00" + node
}
