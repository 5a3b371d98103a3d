package agent

import (
	"context"
	"fmt"
	"github.com/snakepit/snakepit/pkg/agent/call"
	"path/filepath"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"

	snakepitv1 "github.com/snakepit/snakepit/proto/snakepit/v1"
)

func drainAll(t *testing.T, admin snakepitv1.AdminClient, req *snakepitv1.DrainRequest) []*snakepitv1.DrainProgress {
	t.Helper()
	st, err := admin.Drain(context.Background(), req)
	if err != nil {
		t.Fatal(err)
	}
	var out []*snakepitv1.DrainProgress
	for {
		p, err := st.Recv()
		if err != nil {
			break
		}
		out = append(out, p)
	}
	if len(out) == 0 {
		t.Fatal("drain sent no progress")
	}
	return out
}

func TestDrainWaitsForCallsInFlight(t *testing.T) {
	cfg := testConfig(t)
	tn := startNode(t, cfg)
	admin := adminOverSocket(t, cfg)
	// A session call that will still run when the drain starts.
	tally(t, tn, "s1", 0)
	done := make(chan error, 1)
	go func() {
		_, err := tn.exec(t, &snakepitv1.ExecuteRequest{Tool: "nap", Args: []byte(`{"seconds": 0.5}`), SessionId: "s1"})
		done <- err
	}()
	waitStatus(t, tn, func(p *snakepitv1.PoolStatus) bool { return p.GetBusy() == 1 })
	progress := make(chan []*snakepitv1.DrainProgress, 1)
	go func() {
		progress <- drainAll(t, admin, &snakepitv1.DrainRequest{Deadline: durationpb.New(time.Minute)})
	}()
	waitIntent(t, admin, func(in *snakepitv1.IntentResponse) bool { return in.GetDraining() && in.GetCordoned() })
	// While draining: sessionless work is refused (not executed); the
	// session whose call runs here may still call here.
	if _, err := tn.exec(t, &snakepitv1.ExecuteRequest{Tool: "noop"}); status.Code(err) != codes.Unavailable || errorInfo(err).GetReason() != call.ReasonDraining {
		t.Fatalf("new call while draining = %v, want UNAVAILABLE DRAINING", err)
	}
	if r, _, err := tally(t, tn, "s1", snakepitv1.Affinity_AFFINITY_STRICT_QUEUE); err != nil || n(r) != 2 {
		t.Fatalf("call of a session with a call in flight = %d, %v; want it served here", n(r), err)
	}
	if err := <-done; err != nil {
		t.Fatalf("the call in flight during the drain failed: %v", err)
	}
	ps := <-progress
	last := ps[len(ps)-1]
	if !last.GetDrained() || last.GetInFlight() != 0 || last.GetCancelled() != 0 {
		t.Fatalf("last progress = %v, want drained with nothing in flight", last)
	}
	for _, p := range ps[:len(ps)-1] {
		if p.GetDrained() {
			t.Fatalf("drained reported before the last message: %v", ps)
		}
	}
	if ps[0].GetInFlight() != 1 {
		t.Errorf("first progress = %v, want the call in flight counted", ps[0])
	}
}

func TestDrainDeadlineCancelsCalls(t *testing.T) {
	cfg := testConfig(t)
	tn := startNode(t, cfg)
	admin := adminOverSocket(t, cfg)
	marker := filepath.Join(t.TempDir(), "m")
	done := make(chan string, 1)
	go func() {
		resp, err := tn.exec(t, &snakepitv1.ExecuteRequest{Tool: "hold", Args: []byte(fmt.Sprintf(`{"marker": %q}`, marker))})
		done <- fmt.Sprint(string(resp.GetResult()), err)
	}()
	waitStatus(t, tn, func(p *snakepitv1.PoolStatus) bool { return p.GetBusy() == 1 })
	ps := drainAll(t, admin, &snakepitv1.DrainRequest{Deadline: durationpb.New(200 * time.Millisecond)})
	last := ps[len(ps)-1]
	if !last.GetDrained() || last.GetCancelled() != 1 {
		t.Fatalf("last progress = %v, want drained with 1 call cancelled", last)
	}
	waitFile(t, marker, "cancelled")
	// The tool saw ctx.cancelled and returned early (how hold reports it).
	if got := <-done; got != `"cancelled"<nil>` {
		t.Fatalf("the call cut short by the drain deadline = %s, want the tool to have seen the cancellation", got)
	}
}

func TestDrainDryRunChangesNothing(t *testing.T) {
	cfg := testConfig(t)
	tn := startNode(t, cfg)
	admin := adminOverSocket(t, cfg)
	tally(t, tn, "a", 0)
	tally(t, tn, "b", 0)
	ps := drainAll(t, admin, &snakepitv1.DrainRequest{DryRun: true})
	if len(ps) != 1 || len(ps[0].GetMoves()) != 2 || ps[0].GetSessions() != 2 {
		t.Fatalf("dry run = %v, want the 2 sessions listed", ps)
	}
	in, _ := admin.Intent(context.Background(), &snakepitv1.IntentRequest{})
	if in.GetDraining() || in.GetCordoned() {
		t.Fatalf("a dry run changed the intent: %v", in)
	}
	if _, err := tn.exec(t, &snakepitv1.ExecuteRequest{Tool: "noop"}); err != nil {
		t.Fatal(err)
	}
}

func TestDrainedNodeRestartsCordoned(t *testing.T) {
	cfg := testConfig(t)
	tn := startNode(t, cfg)
	drainAll(t, adminOverSocket(t, cfg), &snakepitv1.DrainRequest{})
	if err := tn.stop(); err != nil {
		t.Fatal(err)
	}
	tn2 := startNode(t, cfg)
	admin := adminOverSocket(t, cfg)
	in, err := admin.Intent(context.Background(), &snakepitv1.IntentRequest{})
	if err != nil || !in.GetDraining() || !in.GetCordoned() {
		t.Fatalf("intent after restart = %v, %v; want still drained", in, err)
	}
	if _, err := tn2.exec(t, &snakepitv1.ExecuteRequest{Tool: "noop"}); status.Code(err) != codes.Unavailable {
		t.Fatalf("call to a drained node = %v, want UNAVAILABLE", err)
	}
	if _, err := admin.Uncordon(context.Background(), &snakepitv1.UncordonRequest{}); err != nil {
		t.Fatal(err)
	}
	if _, err := tn2.exec(t, &snakepitv1.ExecuteRequest{Tool: "noop"}); err != nil {
		t.Fatalf("after uncordon: %v", err)
	}
}

func waitIntent(t *testing.T, admin snakepitv1.AdminClient, cond func(*snakepitv1.IntentResponse) bool) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		in, err := admin.Intent(context.Background(), &snakepitv1.IntentRequest{})
		if err == nil && cond(in) {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("intent not reached: %v %v", in, err)
		}
		time.Sleep(5 * time.Millisecond)
	}
}
