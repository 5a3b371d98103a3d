package agent

import (
	"context"
	"fmt"
	"github.com/snakepit/snakepit/pkg/agent/call"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/snakepit/snakepit/internal/freeport"
	"github.com/snakepit/snakepit/pkg/discovery"
	"github.com/snakepit/snakepit/pkg/router"
	snakepitv1 "github.com/snakepit/snakepit/proto/snakepit/v1"
)

// clusterNode is one node of an in-process cluster.
type clusterNode struct {
	*testNode
	id    string
	proxy *cutProxy // what peers dial; cut to drop their connections
}

// startCluster starts one node per entry of sizes (workers of pool
// "test"), node-0, node-1, ..., each knowing the others through static
// discovery. Peers dial each node through a cutProxy.
func startCluster(t *testing.T, sizes []int, mod func(i int, cfg *Config)) []*clusterNode {
	t.Helper()
	nodes := make([]*clusterNode, len(sizes))
	addrs := make([]string, len(sizes))
	for i := range sizes {
		// The static peer lists need every address first.
		addrs[i] = freeport.MustAddr(t)
		nodes[i] = &clusterNode{id: fmt.Sprintf("node-%d", i), proxy: startCutProxy(t, addrs[i])}
	}
	var wg sync.WaitGroup
	for i := range sizes {
		cfg := testConfig(t, PoolConfig{Name: "test", Adapter: testAdapter(t, "tools.py"), Size: sizes[i]})
		cfg.NodeID = nodes[i].id
		cfg.Listen = addrs[i]
		cfg.MetricsListen = "off"
		cfg.AdminSocket = "off"
		cfg.NewSessionsPerSecond = -1
		cfg.Router.BreakerBackoff = 500 * time.Millisecond
		cfg.Router.LoadRefreshInterval = 200 * time.Millisecond
		cfg.Discovery = discovery.DefaultConfig()
		for j := range sizes {
			if j != i {
				cfg.Discovery.Static.Peers = append(cfg.Discovery.Static.Peers, discovery.StaticPeer{
					ID: discovery.NodeID(nodes[j].id), Addr: nodes[j].proxy.addr(), Pools: map[string]int{"test": sizes[j]}})
			}
		}
		if mod != nil {
			mod(i, &cfg)
		}
		wg.Go(func() { nodes[i].testNode = startNode(t, cfg) })
	}
	wg.Wait()
	if t.Failed() {
		t.FailNow()
	}
	waitConnected(t, nodes, sizes)
	return nodes
}

// waitConnected waits until every node forwards to every other: a session
// each node owns, entered through each node, runs on its owner.
func waitConnected(t *testing.T, nodes []*clusterNode, sizes []int) {
	t.Helper()
	ids := make([]string, len(nodes))
	for i, n := range nodes {
		ids[i] = n.id
	}
	owner := owners(t, ids, sizes)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	for _, to := range nodes {
		var sid string
		for k := 0; sid == ""; k++ {
			if s := fmt.Sprintf("probe-%d", k); owner(s) == to.id {
				sid = s
			}
		}
		for _, from := range nodes {
			waitCond(t, 30*time.Second, from.id+" forwarding to "+to.id, func() bool {
				r, err := execOn(ctx, from, &snakepitv1.ExecuteRequest{Tool: "noop", SessionId: sid})
				return err == nil && r.GetRanOn().GetNodeId() == to.id
			})
		}
	}
}

// owners returns the router's answer for a session over the given nodes
// and slots, computed independently of any node.
func owners(t *testing.T, ids []string, slots []int) func(session string) string {
	t.Helper()
	var peers []router.Peer
	for i, id := range ids {
		peers = append(peers, router.Peer{ID: router.NodeID(id), Healthy: true, Pools: map[string]int{"test": slots[i]}})
	}
	tab, err := router.NewTable(peers, "")
	if err != nil {
		t.Fatal(err)
	}
	return func(s string) string {
		c, err := tab.Rank(router.Request{SessionID: s, Pool: "test", Max: 1}, nil, nil)
		if err != nil {
			t.Fatal(err)
		}
		return string(c[0].ID)
	}
}

func execOn(ctx context.Context, n *clusterNode, req *snakepitv1.ExecuteRequest) (*snakepitv1.ExecuteResponse, error) {
	if req.Pool == "" {
		req.Pool = "test"
	}
	return n.sp.Execute(ctx, req)
}

// Every session's calls, through any entry node, run on the session's
// owner, and the owners spread in proportion to the nodes' slots.
func TestClusterSessionsRunOnTheirOwner(t *testing.T) {
	if testing.Short() {
		t.Skip("three nodes with workers")
	}
	sizes := []int{1, 1, 2}
	nodes := startCluster(t, sizes, nil)
	owner := owners(t, []string{"node-0", "node-1", "node-2"}, sizes)
	const sessions = 300
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	var mu sync.Mutex
	count := map[string]int{}
	var wg sync.WaitGroup
	sem := make(chan struct{}, 8)
	for s := range sessions {
		wg.Go(func() {
			sem <- struct{}{}
			defer func() { <-sem }()
			id := fmt.Sprintf("sess-%d", s)
			for call := range 2 {
				entry := nodes[(s+call)%len(nodes)]
				r, err := execOn(ctx, entry, &snakepitv1.ExecuteRequest{Tool: "tally", SessionId: id})
				if err != nil {
					t.Errorf("session %s call %d via %s: %v", id, call, entry.id, err)
					return
				}
				if got, want := r.GetRanOn().GetNodeId(), owner(id); got != want {
					t.Errorf("session %s call %d via %s ran on %s, want its owner %s", id, call, entry.id, got, want)
				}
				if call == 0 {
					mu.Lock()
					count[r.GetRanOn().GetNodeId()]++
					mu.Unlock()
				}
			}
		})
	}
	wg.Wait()
	for i, n := range nodes {
		want := float64(sessions) * float64(sizes[i]) / 4
		if got := float64(count[n.id]); got < want*0.75 || got > want*1.25 {
			t.Errorf("%s owns %v sessions, want about %v (slots %d of 4)", n.id, got, want, sizes[i])
		}
	}
}

// A caller-supplied request id runs once, whichever node the retry enters.
func TestClusterDuplicateRequestRunsOnce(t *testing.T) {
	if testing.Short() {
		t.Skip("three nodes with workers")
	}
	nodes := startCluster(t, []int{1, 1, 1}, nil)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	for k := range 5 {
		id := fmt.Sprintf("req-%d", k)
		var first *snakepitv1.ExecuteResponse
		for _, n := range nodes {
			r, err := execOn(ctx, n, &snakepitv1.ExecuteRequest{Tool: "count", RequestId: id})
			if err != nil {
				t.Fatalf("request %s via %s: %v", id, n.id, err)
			}
			if first == nil {
				first = r
				continue
			}
			if string(r.GetResult()) != string(first.GetResult()) || r.GetRanOn().GetNodeId() != first.GetRanOn().GetNodeId() {
				t.Errorf("request %s via %s = %s on %s; want the first outcome %s on %s (executed twice)",
					id, n.id, r.GetResult(), r.GetRanOn().GetNodeId(), first.GetResult(), first.GetRanOn().GetNodeId())
			}
		}
	}
	// And a fresh id runs again.
	a, err := execOn(ctx, nodes[0], &snakepitv1.ExecuteRequest{Tool: "count"})
	if err != nil {
		t.Fatal(err)
	}
	b, err := execOn(ctx, nodes[0], &snakepitv1.ExecuteRequest{Tool: "count"})
	if err != nil {
		t.Fatal(err)
	}
	if a.GetRanOn().GetNodeId() == b.GetRanOn().GetNodeId() && string(a.GetResult()) == string(b.GetResult()) {
		t.Errorf("two calls without a request id gave the same count %s on %s: deduplicated", a.GetResult(), a.GetRanOn().GetNodeId())
	}
}

// A pool only one node serves is reachable through every node; a
// constraint no node meets fails with FAILED_PRECONDITION naming it.
func TestClusterForwardsToThePoolsNode(t *testing.T) {
	if testing.Short() {
		t.Skip("two nodes with workers")
	}
	nodes := startCluster(t, []int{1, 1}, func(i int, cfg *Config) {
		if i == 1 {
			cfg.Pools = append(cfg.Pools, PoolConfig{Name: "only1", Adapter: testAdapter(t, "tools.py"), Size: 1})
			return
		}
		cfg.Discovery.Static.Peers[0].Pools["only1"] = 1
	})
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	for range 5 {
		r, err := execOn(ctx, nodes[0], &snakepitv1.ExecuteRequest{Tool: "add", Pool: "only1", Args: []byte(`{"a":1,"b":2}`)})
		if err != nil {
			t.Fatal(err)
		}
		if r.GetRanOn().GetNodeId() != "node-1" || string(r.GetResult()) != "3" {
			t.Fatalf("pool only1 via node-0 = %s on %s, want 3 on node-1", r.GetResult(), r.GetRanOn().GetNodeId())
		}
	}
	_, err := execOn(ctx, nodes[0], &snakepitv1.ExecuteRequest{Tool: "add", Args: []byte(`{"a":1,"b":2}`),
		Constraints: &snakepitv1.Constraints{Gpu: true}})
	if status.Code(err) != codes.FailedPrecondition || errorInfo(err).GetReason() != call.ReasonUnsatisfiable || errorInfo(err).GetMetadata()["constraint"] != "gpu" {
		t.Fatalf("a GPU call in a cluster without GPUs: %v (%v), want FAILED_PRECONDITION UNSATISFIABLE naming gpu", err, errorInfo(err))
	}
	_, err = execOn(ctx, nodes[0], &snakepitv1.ExecuteRequest{Tool: "add", Pool: "nope"})
	if status.Code(err) != codes.NotFound {
		t.Fatalf("unknown pool: %v, want NOT_FOUND", err)
	}
}

// A call in flight on a node whose connection breaks: idempotent calls are
// retried on another node; others fail with MAY_HAVE_EXECUTED naming the
// node. Calls sent after the break never fail: they did not start.
func TestClusterConnectionLossMidCall(t *testing.T) {
	if testing.Short() {
		t.Skip("three nodes with workers")
	}
	nodes := startCluster(t, []int{1, 1, 1}, nil)
	owner := owners(t, []string{"node-0", "node-1", "node-2"}, []int{1, 1, 1})
	// A session owned by node-2, entered through node-0.
	var sid string
	for i := 0; sid == ""; i++ {
		if s := fmt.Sprintf("s%d", i); owner(s) == "node-2" {
			sid = s
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	for _, idempotent := range []bool{false, true} {
		t.Run(fmt.Sprintf("idempotent=%v", idempotent), func(t *testing.T) {
			waitCond(t, 20*time.Second, "node-2 idle", func() bool {
				st, err := nodes[2].sp.Status(ctx, &snakepitv1.StatusRequest{})
				return err == nil && st.GetPools()[0].GetBusy() == 0
			})
			errc := make(chan error, 1)
			var res atomic.Pointer[snakepitv1.ExecuteResponse]
			go func() {
				r, err := execOn(ctx, nodes[0], &snakepitv1.ExecuteRequest{Tool: "nap", Args: []byte(`{"seconds": 1.5}`), SessionId: sid, Idempotent: idempotent})
				res.Store(r)
				errc <- err
			}()
			waitCond(t, 20*time.Second, "the call running on node-2", func() bool {
				st, err := nodes[2].sp.Status(ctx, &snakepitv1.StatusRequest{})
				return err == nil && st.GetPools()[0].GetBusy() > 0
			})
			nodes[2].proxy.cut()
			err := <-errc
			if idempotent {
				if err != nil || res.Load().GetRanOn().GetNodeId() == "node-2" {
					t.Fatalf("idempotent call whose node was cut: %v on %s, want success elsewhere", err, res.Load().GetRanOn().GetNodeId())
				}
				return
			}
			if status.Code(err) != codes.Aborted || errorInfo(err).GetReason() != call.ReasonMayHaveExecuted || errorInfo(err).GetMetadata()["node"] != "node-2" {
				t.Fatalf("non-idempotent call whose node was cut: %v (%v), want ABORTED MAY_HAVE_EXECUTED naming node-2", err, errorInfo(err))
			}
		})
	}
}

// A dead node (its port refuses connections) costs no call, with or
// without idempotency, and a strict session whose owner is dead fails fast
// or, in strict_queue, moves to the next owner after the break-glass lease.
func TestClusterDeadNode(t *testing.T) {
	if testing.Short() {
		t.Skip("three nodes with workers")
	}
	nodes := startCluster(t, []int{1, 1, 1}, func(_ int, cfg *Config) { cfg.Router.BreakGlassLease = time.Second })
	owner := owners(t, []string{"node-0", "node-1", "node-2"}, []int{1, 1, 1})
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	if err := nodes[2].stop(); err != nil {
		t.Fatal(err)
	}
	nodes[2].proxy.close()
	for i := range 60 {
		entry := nodes[i%2]
		sid := fmt.Sprintf("d%d", i)
		r, err := execOn(ctx, entry, &snakepitv1.ExecuteRequest{Tool: "add", Args: []byte(`{"a":1,"b":1}`), SessionId: sid})
		if err != nil {
			t.Fatalf("call %d (session %s, owner %s) via %s with node-2 dead: %v", i, sid, owner(sid), entry.id, err)
		}
		if r.GetRanOn().GetNodeId() == "node-2" {
			t.Fatalf("ran on the dead node")
		}
	}
	var sid string
	for i := 0; sid == ""; i++ {
		if s := fmt.Sprintf("strict%d", i); owner(s) == "node-2" {
			sid = s
		}
	}
	_, err := execOn(ctx, nodes[0], &snakepitv1.ExecuteRequest{Tool: "tally", SessionId: sid, Affinity: snakepitv1.Affinity_AFFINITY_STRICT_FAIL_FAST})
	if status.Code(err) != codes.Unavailable || errorInfo(err).GetReason() != call.ReasonOwnerUnavailable || errorInfo(err).GetMetadata()["owner"] != "node-2" {
		t.Fatalf("strict_fail_fast with the owner dead: %v (%v), want UNAVAILABLE OWNER_UNAVAILABLE naming node-2", err, errorInfo(err))
	}
	r, err := execOn(ctx, nodes[0], &snakepitv1.ExecuteRequest{Tool: "tally", SessionId: sid, Affinity: snakepitv1.Affinity_AFFINITY_STRICT_QUEUE})
	if err != nil || r.GetRanOn().GetNodeId() == "node-2" {
		t.Fatalf("strict_queue with the owner dead past the lease: %v on %s, want the next owner", err, r.GetRanOn().GetNodeId())
	}
}

func waitCond(t *testing.T, d time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for %s", d, what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// cutProxy forwards TCP connections to a target; cut drops the open ones
// (as a dying host would), close also stops listening.
type cutProxy struct {
	l      net.Listener
	target string
	mu     sync.Mutex
	conns  []net.Conn
	wg     sync.WaitGroup
}

func startCutProxy(t *testing.T, target string) *cutProxy {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &cutProxy{l: l, target: target}
	p.wg.Go(func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			u, err := net.Dial("tcp", target)
			if err != nil {
				c.Close()
				continue
			}
			p.mu.Lock()
			p.conns = append(p.conns, c, u)
			p.mu.Unlock()
			p.wg.Go(func() { _, _ = io.Copy(u, c); u.Close() })
			p.wg.Go(func() { _, _ = io.Copy(c, u); c.Close() })
		}
	})
	t.Cleanup(p.close)
	return p
}

func (p *cutProxy) addr() string { return p.l.Addr().String() }

func (p *cutProxy) cut() {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, c := range p.conns {
		c.Close()
	}
	p.conns = nil
}

func (p *cutProxy) close() {
	p.l.Close()
	p.cut()
	p.wg.Wait()
}
