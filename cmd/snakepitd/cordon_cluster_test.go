package main

import (
	"context"
	"encoding/json"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	snakepitv1 "github.com/snakepit/snakepit/proto/snakepit/v1"
)

// TestClusterCordonUnderLoad cordons one of three nodes (real Consul,
// separate processes) while 16 clients call through all three: the
// sessions it holds keep running there (strict_queue ones with all their
// state; hint ones may change worker on a busy node, by design); no new
// session and no sessionless call runs there; no call fails. A held
// strict_fail_fast session runs there too once the load is over. After
// uncordon new sessions reach it again.
func TestClusterCordonUnderLoad(t *testing.T) {
	bin, _, agent := skipUnlessCluster(t)
	pool := "  - name: default\n    adapter: snakepit_examples.example\n    size: 2\n"
	var nodes []*drainNode
	for _, id := range []string{"node-a", "node-b", "node-c"} {
		nodes = append(nodes, startDrainNode(t, bin, id, clusterConfig(id, agent.Addr, 5*time.Second, pool), t.TempDir()))
	}
	for _, n := range nodes {
		waitView(t, n.clusterNode, 20*time.Second, "node-a", "node-b", "node-c")
	}
	victim := nodes[1]
	ctx := context.Background()
	// Under load only modes that wait for a busy session worker: a
	// strict_fail_fast call fails SESSION_WORKER_BUSY then, cordon or not.
	modes := []snakepitv1.Affinity{snakepitv1.Affinity_AFFINITY_HINT, snakepitv1.Affinity_AFFINITY_STRICT_QUEUE}
	note := func(entry *drainNode, session string, mode snakepitv1.Affinity) (string, int, error) {
		cctx, cancel := context.WithTimeout(ctx, 20*time.Second)
		defer cancel()
		r, err := entry.conn.Snakepit.Execute(cctx, &snakepitv1.ExecuteRequest{Tool: "note", Args: []byte(`{"text": "x"}`), SessionId: session, Affinity: mode})
		if err != nil {
			return "", 0, err
		}
		var notes []string
		if err := json.Unmarshal(r.GetResult(), &notes); err != nil {
			return "", 0, fmt.Errorf("note result %q: %v", r.GetResult(), err)
		}
		return r.GetRanOn().GetNodeId(), len(notes), nil
	}

	// 90 sessions, one call each: about a third land on node-b.
	type sess struct {
		id    string
		mode  snakepitv1.Affinity
		owner string
		notes atomic.Int64
	}
	var all []*sess
	for i := range 90 {
		s := &sess{id: fmt.Sprintf("held-%d", i), mode: modes[i%len(modes)]}
		node, k, err := note(nodes[i%3], s.id, s.mode)
		if err != nil || k != 1 {
			t.Fatalf("session %s first call: %v (%d notes)", s.id, err, k)
		}
		s.owner = node
		s.notes.Store(1)
		all = append(all, s)
	}
	var held []*sess
	for _, s := range all {
		if s.owner == victim.id {
			held = append(held, s)
		}
	}
	if len(held) < 5 {
		t.Fatalf("only %d of 90 sessions on %s; the test needs some", len(held), victim.id)
	}

	if _, err := victim.admin(t).Cordon(ctx, &snakepitv1.CordonRequest{}); err != nil {
		t.Fatal(err)
	}
	// Every node's view shows the cordon (then sessionless routing skips
	// node-b without asking it).
	for _, n := range nodes {
		deadline := time.Now().Add(20 * time.Second)
		for {
			r, err := n.conn.Snakepit.ListNodes(ctx, &snakepitv1.ListNodesRequest{})
			cordoned := false
			for _, p := range r.GetNodes() {
				cordoned = cordoned || (p.GetNodeId() == victim.id && p.GetCordoned())
			}
			if err == nil && cordoned {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s does not see %s cordoned within 20s: %v", n.id, victim.id, err)
			}
			time.Sleep(10 * time.Millisecond)
		}
	}

	var (
		calls, failed atomic.Int64
		wg            sync.WaitGroup
		fresh         atomic.Int64
	)
	fail := func(format string, args ...any) {
		if failed.Add(1) <= 5 {
			t.Errorf(format, args...)
		}
	}
	for g := range 16 {
		wg.Go(func() {
			for i := range 25 {
				entry := nodes[(g+i)%3]
				calls.Add(1)
				switch {
				case i%3 == 0 && g < len(held): // a session node-b held before the cordon, one per client
					s := held[g]
					node, k, err := note(entry, s.id, s.mode)
					if err != nil || node != victim.id {
						fail("held session %s (%s) via %s: ran on %s, %v; want %s", s.id, s.mode, entry.id, node, err, victim.id)
						continue
					}
					if want := s.notes.Add(1); s.mode == snakepitv1.Affinity_AFFINITY_STRICT_QUEUE && int64(k) != want {
						fail("held strict_queue session %s: %d notes after %d calls (state lost)", s.id, k, want)
					}
				case i%3 == 1: // a new session
					id := fmt.Sprintf("fresh-%d", fresh.Add(1))
					node, k, err := note(entry, id, modes[i%len(modes)])
					if err != nil || node == victim.id || k != 1 {
						fail("new session %s via %s while %s is cordoned: ran on %s (%d notes), %v", id, entry.id, victim.id, node, k, err)
					}
				default: // sessionless
					cctx, cancel := context.WithTimeout(ctx, 20*time.Second)
					r, err := entry.conn.Snakepit.Execute(cctx, &snakepitv1.ExecuteRequest{Tool: "noop"})
					cancel()
					if err != nil || r.GetRanOn().GetNodeId() == victim.id {
						fail("sessionless call via %s while %s is cordoned: %v, %v", entry.id, victim.id, r.GetRanOn(), err)
					}
				}
			}
		})
	}
	wg.Wait()
	if n := failed.Load(); n != 0 {
		t.Fatalf("%d of %d calls went wrong while %s was cordoned", n, calls.Load(), victim.id)
	}
	t.Logf("%d calls while %s was cordoned: its %d held sessions stayed, no new work reached it", calls.Load(), victim.id, len(held))
	for _, s := range held[:2] {
		node, _, err := note(nodes[0], s.id, snakepitv1.Affinity_AFFINITY_STRICT_FAIL_FAST)
		if err != nil || node != victim.id {
			t.Errorf("held session %s as strict_fail_fast via node-a while cordoned: ran on %s, %v; want %s", s.id, node, err, victim.id)
		}
	}

	if _, err := victim.admin(t).Uncordon(ctx, &snakepitv1.UncordonRequest{}); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(20 * time.Second)
	for i := 0; ; i++ {
		node, _, err := note(nodes[0], fmt.Sprintf("back-%d", i), snakepitv1.Affinity_AFFINITY_HINT)
		if err == nil && node == victim.id {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no new session reached %s within 20s of uncordon (last: %s, %v)", victim.id, node, err)
		}
	}
}
