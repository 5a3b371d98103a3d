package agent

import (
	"context"
	"encoding/json"
	"fmt"
	"github.com/snakepit/snakepit/pkg/agent/call"
	"github.com/snakepit/snakepit/pkg/agent/wire"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	snakepitv1 "github.com/snakepit/snakepit/proto/snakepit/v1"
)

// A cordoned node keeps serving the sessions it holds, in every affinity
// mode, and takes no new session and no sessionless work: a new session it
// owns starts on its next owner, and a routed sessionless call is refused
// (UNAVAILABLE CORDONED, not executed) and runs elsewhere. The peers here
// learn nothing of the cordon (static discovery): the cordoned node's own
// refusal is what keeps work away. Uncordon ends it.
func TestClusterCordonKeepsHeldSessions(t *testing.T) {
	if testing.Short() {
		t.Skip("three nodes with workers")
	}
	sizes := []int{1, 1, 1}
	var cordonedCfg Config
	nodes := startCluster(t, sizes, func(i int, cfg *Config) {
		if i == 1 {
			cfg.AdminSocket = ""
			cordonedCfg = *cfg
		}
	})
	ids := []string{"node-0", "node-1", "node-2"}
	owner := owners(t, ids, sizes)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	ownedBy := func(prefix, id string, n int) []string {
		var out []string
		for k := 0; len(out) < n; k++ {
			if s := fmt.Sprintf("%s-%d", prefix, k); owner(s) == id {
				out = append(out, s)
			}
		}
		return out
	}
	modes := []snakepitv1.Affinity{snakepitv1.Affinity_AFFINITY_HINT, snakepitv1.Affinity_AFFINITY_STRICT_QUEUE, snakepitv1.Affinity_AFFINITY_STRICT_FAIL_FAST}
	held := ownedBy("held", "node-1", len(modes))
	for i, s := range held {
		r, err := execOn(ctx, nodes[0], &snakepitv1.ExecuteRequest{Tool: "tally", SessionId: s, Affinity: modes[i]})
		if err != nil || r.GetRanOn().GetNodeId() != "node-1" {
			t.Fatalf("session %s before the cordon: %v, %v", s, r.GetRanOn(), err)
		}
	}
	admin := adminOverSocket(t, cordonedCfg)
	if _, err := admin.Cordon(ctx, &snakepitv1.CordonRequest{}); err != nil {
		t.Fatal(err)
	}

	// Held sessions keep going to node-1, through every entry, each call
	// seeing the session's state (its count goes on).
	for round := range 2 {
		for i, s := range held {
			entry := nodes[(i+round)%len(nodes)]
			r, err := execOn(ctx, entry, &snakepitv1.ExecuteRequest{Tool: "tally", SessionId: s, Affinity: modes[i]})
			if err != nil || r.GetRanOn().GetNodeId() != "node-1" {
				t.Fatalf("held session %s (%s) via %s while cordoned: %v, %v; want it kept on node-1", s, modes[i], entry.id, r.GetRanOn(), err)
			}
			if got := count(t, r); got != 2+round {
				t.Errorf("held session %s call %d: count %d, want %d (its state kept)", s, 2+round, got, 2+round)
			}
		}
	}

	// New sessions node-1 would own start on another node, in every mode,
	// and stay there while the cordon lasts.
	fresh := ownedBy("fresh", "node-1", len(modes))
	for i, s := range fresh {
		var first string
		for call := range 2 {
			entry := nodes[call%len(nodes)] // node-0, then node-1 itself
			r, err := execOn(ctx, entry, &snakepitv1.ExecuteRequest{Tool: "tally", SessionId: s, Affinity: modes[i]})
			if err != nil || r.GetRanOn().GetNodeId() == "node-1" {
				t.Fatalf("new session %s (%s) via %s while node-1 is cordoned: %v, %v; want another node", s, modes[i], entry.id, r.GetRanOn(), err)
			}
			if call == 0 {
				first = r.GetRanOn().GetNodeId()
			} else if r.GetRanOn().GetNodeId() != first || count(t, r) != 2 {
				t.Errorf("new session %s call 2 ran on %s with count %d, want %s with 2", s, r.GetRanOn().GetNodeId(), count(t, r), first)
			}
		}
	}

	// Sessionless calls, through every entry, never run on node-1.
	for i := range 30 {
		entry := nodes[i%len(nodes)]
		r, err := execOn(ctx, entry, &snakepitv1.ExecuteRequest{Tool: "noop"})
		if err != nil || r.GetRanOn().GetNodeId() == "node-1" {
			t.Fatalf("sessionless call %d via %s while node-1 is cordoned: %v, %v; want another node", i, entry.id, r.GetRanOn(), err)
		}
	}
	// A routed call that reaches node-1 anyway (a peer's stale view) is
	// refused, not executed.
	fwd := metadata.AppendToOutgoingContext(ctx, wire.ForwardedHeader, "node-0")
	_, err := execOn(fwd, nodes[1], &snakepitv1.ExecuteRequest{Tool: "noop"})
	if status.Code(err) != codes.Unavailable || errorInfo(err).GetReason() != call.ReasonCordoned {
		t.Fatalf("forwarded sessionless call to the cordoned node: %v, want UNAVAILABLE CORDONED", err)
	}

	// Uncordon: new sessions and sessionless work come back.
	if _, err := admin.Uncordon(ctx, &snakepitv1.UncordonRequest{}); err != nil {
		t.Fatal(err)
	}
	after := ownedBy("after", "node-1", 1)[0]
	r, err := execOn(ctx, nodes[2], &snakepitv1.ExecuteRequest{Tool: "tally", SessionId: after})
	if err != nil || r.GetRanOn().GetNodeId() != "node-1" {
		t.Fatalf("new session of node-1 after uncordon: %v, %v; want node-1", r.GetRanOn(), err)
	}
	if _, err := execOn(fwd, nodes[1], &snakepitv1.ExecuteRequest{Tool: "noop"}); err != nil {
		t.Fatalf("forwarded sessionless call after uncordon: %v", err)
	}
}

// count is a tally call's session count.
func count(t *testing.T, r *snakepitv1.ExecuteResponse) int {
	t.Helper()
	var tr tallyResult
	if err := json.Unmarshal(r.GetResult(), &tr); err != nil {
		t.Fatalf("tally result %q: %v", r.GetResult(), err)
	}
	return n(tr)
}
