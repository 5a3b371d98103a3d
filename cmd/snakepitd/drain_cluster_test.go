package main

import (
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/snakepit/snakepit/pkg/client"
	snakepitv1 "github.com/snakepit/snakepit/proto/snakepit/v1"
)

// drainNode is a cluster node whose state directory the test knows (for
// its admin socket and for a restart with the same state).
type drainNode struct {
	*clusterNode
	dir, cfgPath string
}

func startDrainNode(t *testing.T, bin, id, cfg, dir string) *drainNode {
	t.Helper()
	d, path := launchNode(t, bin, id, cfg, dir)
	return &drainNode{clusterNode: &clusterNode{daemonProc: d, id: id, conn: dialServing(t, d.addr)}, dir: dir, cfgPath: path}
}

func (n *drainNode) admin(t *testing.T) snakepitv1.AdminClient {
	t.Helper()
	c, err := client.Dial("unix://" + filepath.Join(n.dir, "state", "admin.sock"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c.Admin
}

// TestClusterDrainUnderLoad drains one of three nodes while 32 clients
// call through all three, half of them in sessions, none idempotent: no
// call fails, "drained" comes only once nothing runs there, the drained
// node's sessions continue on their next owners, the node restarts still
// cordoned until uncordoned, and the cluster status of any node shows all
// three.
func TestClusterDrainUnderLoad(t *testing.T) {
	bin, _, agent := skipUnlessCluster(t)
	pool := "  - name: default\n    adapter: snakepit_examples.example\n    size: 2\n"
	var nodes []*drainNode
	for _, id := range []string{"node-a", "node-b", "node-c"} {
		nodes = append(nodes, startDrainNode(t, bin, id, clusterConfig(id, agent.Addr, time.Second, pool), t.TempDir()))
	}
	for _, n := range nodes {
		waitView(t, n.clusterNode, 20*time.Second, "node-a", "node-b", "node-c")
	}
	victim := nodes[1]
	ctx := context.Background()

	var (
		calls, failed atomic.Int64
		mu            sync.Mutex
		ranOn         = map[string]string{} // session -> node of its last call
		stop          = make(chan struct{})
		wg            sync.WaitGroup
	)
	for g := 0; g < 32; g++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			session := ""
			if g%2 == 0 {
				session = fmt.Sprintf("s-%d", g)
			}
			for {
				select {
				case <-stop:
					return
				default:
				}
				entry := nodes[rand.IntN(len(nodes))]
				cctx, cancel := context.WithTimeout(ctx, 20*time.Second)
				req := &snakepitv1.ExecuteRequest{Tool: "sleep", Args: []byte(`{"seconds": 0.01}`)}
				if session != "" {
					req = &snakepitv1.ExecuteRequest{Tool: "note", Args: []byte(`{"text": "x"}`), SessionId: session}
				}
				resp, err := entry.conn.Snakepit.Execute(cctx, req)
				cancel()
				calls.Add(1)
				if err != nil {
					failed.Add(1)
					t.Errorf("call through %s during the drain: %v", entry.id, err)
					continue
				}
				if session != "" {
					mu.Lock()
					ranOn[session] = resp.GetRanOn().GetNodeId()
					mu.Unlock()
				}
			}
		}()
	}
	// Let the load reach every node, then drain node-b.
	deadline := time.Now().Add(30 * time.Second)
	for calls.Load() < 300 && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	st, err := victim.admin(t).Drain(ctx, &snakepitv1.DrainRequest{Deadline: durationpb.New(time.Minute)})
	if err != nil {
		t.Fatal(err)
	}
	var last *snakepitv1.DrainProgress
	for {
		p, err := st.Recv()
		if err != nil {
			break
		}
		if last != nil && last.GetDrained() {
			t.Fatalf("progress after drained: %v", p)
		}
		last = p
	}
	if last == nil || !last.GetDrained() || last.GetInFlight() != 0 || last.GetQueued() != 0 || last.GetCancelled() != 0 {
		t.Fatalf("last drain progress = %v, want drained with nothing running and nothing cancelled", last)
	}
	// The cluster sees it cordoned; more load, then stop.
	before := calls.Load()
	for calls.Load() < before+300 && time.Now().Before(deadline.Add(30*time.Second)) {
		time.Sleep(10 * time.Millisecond)
	}
	close(stop)
	wg.Wait()
	if failed.Load() != 0 {
		t.Fatalf("%d of %d calls failed during the drain", failed.Load(), calls.Load())
	}
	mu.Lock()
	for s, node := range ranOn {
		if node == victim.id {
			t.Errorf("session %s still ran on the drained node after the drain", s)
		}
	}
	mu.Unlock()

	// Status from any node shows all three.
	cs, err := nodes[0].admin(t).ClusterStatus(ctx, &snakepitv1.ClusterStatusRequest{})
	if err != nil || cs.GetTotals().GetNodes() != 3 || cs.GetTotals().GetReachable() != 3 {
		t.Fatalf("cluster status from node-a = %v, %v; want 3 nodes, all reachable", cs.GetTotals(), err)
	}

	// The drained node restarts cordoned and stays out of routing until
	// uncordoned.
	sendSignal(t, victim.clusterNode, syscall.SIGTERM)
	exitErr := <-victim.exited
	victim.exited <- exitErr // for the cleanup, which waits for it too
	restarted := startDrainNode(t, bin, victim.id, mustRead(t, victim.cfgPath), victim.dir)
	in, err := restarted.admin(t).Intent(ctx, &snakepitv1.IntentRequest{})
	if err != nil || !in.GetCordoned() || !in.GetDraining() {
		t.Fatalf("intent after restart = %v, %v; want still drained", in, err)
	}
	waitView(t, nodes[0].clusterNode, 20*time.Second, "node-a", "node-b", "node-c")
	for i := 0; i < 30; i++ {
		resp, err := nodes[0].conn.Snakepit.Execute(ctx, &snakepitv1.ExecuteRequest{Tool: "noop", SessionId: fmt.Sprintf("after-%d", i)})
		if err != nil {
			t.Fatal(err)
		}
		if resp.GetRanOn().GetNodeId() == victim.id {
			t.Fatalf("a new session went to the cordoned node")
		}
	}
	if _, err := restarted.admin(t).Uncordon(ctx, &snakepitv1.UncordonRequest{}); err != nil {
		t.Fatal(err)
	}
	// Back in routing: some new session lands there again.
	back := time.Now().Add(20 * time.Second)
	for i := 0; ; i++ {
		resp, err := nodes[0].conn.Snakepit.Execute(ctx, &snakepitv1.ExecuteRequest{Tool: "noop", SessionId: fmt.Sprintf("back-%d", i)})
		if err == nil && resp.GetRanOn().GetNodeId() == victim.id {
			break
		}
		if time.Now().After(back) {
			t.Fatalf("no session routed to the uncordoned node within 20s (last: %v, %v)", resp.GetRanOn(), err)
		}
	}
}

func mustRead(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}
