package bench

import (
	"context"
	"fmt"
	"time"

	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	"github.com/snakepit/snakepit/pkg/pyruntime"
	snakepitv1 "github.com/snakepit/snakepit/proto/snakepit/v1"
)

// benchRouter: what forwarding costs. A session call whose owner is the
// other node against one whose owner is the entry node, measured in the
// same run on the same two daemons (the floor: the local call, and a bare
// gRPC hop); then a three-node cluster's throughput against one node's.
func benchRouter(ctx context.Context, o options, r *report) error {
	agent, err := startConsul(ctx)
	if err != nil {
		return err
	}
	defer agent.stop()
	cfg := func(id string) string {
		return fmt.Sprintf(`node_id: %s
metrics_listen: "off"
new_sessions_per_second: 100000
new_sessions_burst: 100000
discovery:
  kind: consul
  consul:
    address: %s
    ttl: 5s
pools:
  - name: default
    adapter: %s
    size: 2
`, id, agent.addr, pyruntime.ExampleAdapter)
	}
	var ds []*daemon
	ids := []string{"rt-a", "rt-b", "rt-c"}
	for _, id := range ids[:2] {
		d, err := startDaemon(ctx, o, cfg(id))
		if err != nil {
			return err
		}
		defer d.stop()
		ds = append(ds, d)
	}
	if err := waitPeers(ctx, ds, ids[:2], 30*time.Second); err != nil {
		return err
	}
	a := ds[0]
	// Sessions owned by rt-a (local) and by rt-b (forwarded), found by
	// asking: ran_on names the executing node.
	var local, remote string
	for i := 0; (local == "" || remote == "") && i < 1000; i++ {
		s := fmt.Sprintf("bench-%d", i)
		resp, err := a.conn.Snakepit.Execute(ctx, &snakepitv1.ExecuteRequest{Tool: "noop", SessionId: s})
		if err != nil {
			return err
		}
		switch resp.GetRanOn().GetNodeId() {
		case "rt-a":
			local = s
		case "rt-b":
			remote = s
		}
	}
	if local == "" || remote == "" {
		return fmt.Errorf("no session owned by each node among 1000 (local %q, remote %q)", local, remote)
	}
	call := func(s string) func() error {
		req := &snakepitv1.ExecuteRequest{Tool: "noop", SessionId: s}
		return func() error { _, err := a.conn.Snakepit.Execute(ctx, req); return err }
	}
	const n = 3000
	var localLat, remoteLat []time.Duration
	for _, x := range []struct {
		s   string
		out *[]time.Duration
	}{{local, &localLat}, {remote, &remoteLat}} {
		if _, err := latencies(300, call(x.s)); err != nil {
			return err
		}
		if *x.out, err = latencies(n, call(x.s)); err != nil {
			return err
		}
	}
	hc := healthpb.NewHealthClient(a.conn)
	hop, err := latencies(n, func() error { _, err := hc.Check(ctx, &healthpb.HealthCheckRequest{}); return err })
	if err != nil {
		return err
	}
	leaf, relayed, err := relayFloor(ctx, n)
	if err != nil {
		return err
	}

	// Throughput at concurrency 64, sessionless no-ops: one node alone
	// (its own cluster of one: rt-b stopped), then three nodes with the
	// callers spread over them.
	sessionless := &snakepitv1.ExecuteRequest{Tool: "noop"}
	ds[1].stop()
	ds = ds[:1]
	if err := waitAlone(ctx, a, 30*time.Second); err != nil {
		return err
	}
	one, err := throughput(64, o.duration, func(int) error { _, err := a.conn.Snakepit.Execute(ctx, sessionless); return err })
	if err != nil {
		return err
	}
	for _, id := range []string{"rt-b2", "rt-c"} {
		d, err := startDaemon(ctx, o, cfg(id))
		if err != nil {
			return err
		}
		defer d.stop()
		ds = append(ds, d)
	}
	if err := waitPeers(ctx, ds, []string{"rt-a", "rt-b2", "rt-c"}, 30*time.Second); err != nil {
		return err
	}
	three, err := throughput(64, o.duration, func(i int) error {
		_, err := ds[i%3].conn.Snakepit.Execute(ctx, sessionless)
		return err
	})
	if err != nil {
		return err
	}
	r.table("router: forwarding (2 and 3 daemons, Consul dev agent, loopback; floors: the local call, a bare gRPC hop and a bare gRPC relay process, same run)", []row{
		{"session call p50, owner the other node (forwarded)", us(pct(remoteLat, 0.5)), us(pct(localLat, 0.5)) + " owner local, " + us(pct(hop, 0.5)) + " bare gRPC", fmt.Sprintf("added by the hop: %s", us(pct(remoteLat, 0.5)-pct(localLat, 0.5)))},
		{"session call p99, owner the other node", us(pct(remoteLat, 0.99)), us(pct(localLat, 0.99)) + " owner local, " + us(pct(hop, 0.99)) + " bare gRPC", ""},
		{"added by the hop, p50", us(pct(remoteLat, 0.5) - pct(localLat, 0.5)), us(pct(relayed, 0.5)-pct(leaf, 0.5)) + " bare relay (" + us(pct(relayed, 0.5)) + " through a bare gRPC relay process, " + us(pct(leaf, 0.5)) + " direct)", "floor: the same call through one more bare gRPC process"},
		{"throughput, concurrency 64, 3 nodes (2 workers each)", fmt.Sprintf("%.0f calls/s", three), fmt.Sprintf("%.0f calls/s one node", one), fmt.Sprintf("ratio %.2f; the three daemons and their workers share the same cores", three/one)},
	})
	return nil
}

// waitAlone waits until d sees only itself.
func waitAlone(ctx context.Context, d *daemon, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for {
		ids, err := healthyNodes(ctx, d)
		if err != nil {
			return err
		}
		if len(ids) == 1 {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("still sees %v after %s", ids, timeout)
		}
		time.Sleep(10 * time.Millisecond)
	}
}
