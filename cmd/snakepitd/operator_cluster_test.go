package main

import (
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	snakepitv1 "github.com/snakepit/snakepit/proto/snakepit/v1"
)

// TestClusterOperatorPlane runs the operator's checks on a three-node
// cluster (separate processes, real Consul): admin over TCP without
// credentials is refused and with the token works (Execute never needs
// it); a pool is resized up and down under load through every entry with
// no failed call; afterwards every node's metrics add up to the calls made:
// calls_total counts each call once, on the node that ran it, and the
// entry nodes' forwards_total counts each call that ran elsewhere.
func TestClusterOperatorPlane(t *testing.T) {
	bin, _, agent := skipUnlessCluster(t)
	token := filepath.Join(t.TempDir(), "admin-token")
	const secret = "operator-token-of-enough-length"
	if err := os.WriteFile(token, []byte(secret+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	pool := "  - name: default\n    adapter: snakepit_examples.example\n    size: 2\n"
	var nodes []*drainNode
	for _, id := range []string{"node-a", "node-b", "node-c"} {
		cfg := clusterConfig(id, agent.Addr, 5*time.Second, pool)
		if id == "node-c" {
			cfg = "admin_token_file: " + token + "\n" + cfg
		}
		nodes = append(nodes, startDrainNode(t, bin, id, cfg, t.TempDir()))
	}
	for _, n := range nodes {
		waitView(t, n.clusterNode, 20*time.Second, "node-a", "node-b", "node-c")
	}
	target := nodes[2]
	ctx := context.Background()

	// Admin over TCP (the gRPC port).
	tcpAdmin := snakepitv1.NewAdminClient(target.conn)
	if _, err := tcpAdmin.Status(ctx, &snakepitv1.AdminStatusRequest{}); status.Code(err) != codes.PermissionDenied {
		t.Fatalf("admin Status over TCP without credentials: %v, want PERMISSION_DENIED", err)
	}
	if _, err := tcpAdmin.Resize(ctx, &snakepitv1.ResizeRequest{Pool: "default", Size: 9}); status.Code(err) != codes.PermissionDenied {
		t.Fatalf("admin Resize over TCP without credentials: %v, want PERMISSION_DENIED", err)
	}
	if _, err := snakepitv1.NewAdminClient(nodes[0].conn).Cordon(ctx, &snakepitv1.CordonRequest{}); status.Code(err) != codes.PermissionDenied {
		t.Fatalf("admin Cordon over TCP on a node without a token file: %v, want PERMISSION_DENIED", err)
	}
	authed := metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+secret)
	if _, err := tcpAdmin.Status(authed, &snakepitv1.AdminStatusRequest{}); err != nil {
		t.Fatalf("admin Status over TCP with the token: %v", err)
	}

	// Load: 16 clients, random entry nodes, sessionless and session calls.
	var (
		ok, failed atomic.Int64
		mu         sync.Mutex
		forwarded  = map[string]int{} // entry -> calls it forwarded
		wg         sync.WaitGroup
	)
	stop := make(chan struct{})
	for g := range 16 {
		wg.Go(func() {
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				entry := nodes[rand.IntN(len(nodes))]
				req := &snakepitv1.ExecuteRequest{Tool: "sleep", Args: []byte(`{"seconds": 0.005}`)}
				if g%2 == 0 {
					req.SessionId = fmt.Sprintf("op-%d-%d", g, i%5)
				}
				cctx, cancel := context.WithTimeout(ctx, 20*time.Second)
				r, err := entry.conn.Snakepit.Execute(cctx, req)
				cancel()
				if err != nil {
					if failed.Add(1) <= 5 {
						t.Errorf("call via %s during resizes: %v", entry.id, err)
					}
					continue
				}
				ok.Add(1)
				if r.GetRanOn().GetNodeId() != entry.id {
					mu.Lock()
					forwarded[entry.id]++
					mu.Unlock()
				}
			}
		})
	}
	waitCalls := func(n int64) {
		deadline := time.Now().Add(30 * time.Second)
		for ok.Load()+failed.Load() < n {
			if time.Now().After(deadline) {
				t.Fatalf("load stalled at %d calls", ok.Load()+failed.Load())
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
	workers := func() int {
		r, err := tcpAdmin.ListWorkers(authed, &snakepitv1.ListWorkersRequest{Pool: "default"})
		if err != nil {
			t.Fatalf("ListWorkers over TCP with the token: %v", err)
		}
		return len(r.GetWorkers())
	}
	waitCalls(200)
	for _, size := range []uint32{5, 1, 3, 2} {
		if _, err := tcpAdmin.Resize(authed, &snakepitv1.ResizeRequest{Pool: "default", Size: size}); err != nil {
			t.Fatalf("resize to %d: %v", size, err)
		}
		deadline := time.Now().Add(30 * time.Second)
		for workers() != int(size) {
			if time.Now().After(deadline) {
				t.Fatalf("node-c's pool has %d workers 30s after resize to %d", workers(), size)
			}
			time.Sleep(20 * time.Millisecond)
		}
		waitCalls(ok.Load() + failed.Load() + 100)
	}
	close(stop)
	wg.Wait()
	if n := failed.Load(); n != 0 {
		t.Fatalf("%d of %d calls failed while node-c's pool was resized 2-5-1-3-2", n, n+ok.Load())
	}

	// Metrics add up to the calls made.
	var ran, fwd float64
	for _, n := range nodes {
		ran += n.scrapeMetric(t, "snakepit_calls_total", `outcome="ok",pool="default"`)
		f := 0.0
		for _, peer := range nodes {
			if peer != n {
				f += n.scrapeMetric(t, "snakepit_forwards_total", `outcome="ok",peer="`+peer.id+`"`)
			}
		}
		mu.Lock()
		want := forwarded[n.id]
		mu.Unlock()
		if int(f) != want {
			t.Errorf("%s: snakepit_forwards_total{outcome=\"ok\"} sums to %v, want %d (calls it forwarded)", n.id, f, want)
		}
		fwd += f
	}
	if int64(ran) != ok.Load() {
		t.Errorf("snakepit_calls_total{outcome=\"ok\"} over the three nodes = %v, want %d (the calls made)", ran, ok.Load())
	}
	t.Logf("%d calls, none failed, through resizes 2-5-1-3-2 of node-c; metrics: %v run, %v forwarded", ok.Load(), ran, fwd)
}
