package cluster

import (
	"context"
	"math"
	"testing"
	"time"

	"github.com/rs/zerolog"
	"github.com/sony/gobreaker/v2"

	"github.com/snakepit/snakepit/internal/freeport"
	"github.com/snakepit/snakepit/pkg/agent/call"
	"github.com/snakepit/snakepit/pkg/discovery"
)

func testRouterConfig() Config {
	return Config{DedupWindow: time.Minute, DedupMaxEntries: 100, BreakGlassLease: time.Minute,
		RetryBudgetRatio: 0.1, RetryBudgetMin: 10, LoadRefreshInterval: time.Second,
		BreakerFailures: 3, BreakerBackoff: 5 * time.Second, MaxCandidates: 3}
}

// fakeLocal is an engine with one pool that never runs a call.
type fakeLocal struct{}

func (fakeLocal) Execute(context.Context, *call.Request, func([]byte) error) (*call.Result, error) {
	return nil, call.ErrShuttingDown
}
func (fakeLocal) DefaultPool() string                      { return "test" }
func (fakeLocal) Pools() []string                          { return []string{"test"} }
func (fakeLocal) Slots(string) int                         { return 1 }
func (fakeLocal) Load(string) float64                      { return math.NaN() }
func (fakeLocal) CallTimeout(string) (time.Duration, bool) { return time.Second, true }
func (fakeLocal) Healthy() bool                            { return true }
func (fakeLocal) Admission() (cordoned, draining bool)     { return false, false }

// A peer that discovery no longer lists (a node that deregistered on
// SIGTERM, or one its TTL dropped) is kept for the break-glass lease but
// not probed: it takes no calls, and probing a node that left only trips
// its breaker, logs an ejection that is not one, and would hold it back
// for a back-off when it returns. A listed peer that stopped answering is
// probed and ejected as before.
func TestUnlistedPeerIsNotProbed(t *testing.T) {
	cfg := testRouterConfig()
	cfg.BreakGlassLease = time.Hour // keep the unlisted peer
	// Nothing listens at these addresses: every probe fails.
	addrs := map[string]string{"listed": freeport.MustAddr(t), "gone": freeport.MustAddr(t)}
	snapshot := func(ids ...string) *discovery.Snapshot {
		dc := discovery.DefaultConfig()
		for _, id := range ids {
			dc.Static.Peers = append(dc.Static.Peers, discovery.StaticPeer{ID: discovery.NodeID(id), Addr: addrs[id], Pools: map[string]int{"test": 1}})
		}
		_, dir, err := discovery.NewStatic(dc)
		if err != nil {
			t.Fatal(err)
		}
		return dir.Current()
	}
	f := New(cfg, Deps{Log: zerolog.Nop(), NodeID: "node-a", Local: fakeLocal{}, MaxMessageBytes: 1 << 20})
	defer f.closeAll()
	f.sync(snapshot("listed", "gone"), time.Now())
	f.sync(snapshot("listed"), time.Now()) // "gone" left discovery
	f.mu.Lock()
	listed, gone := f.peers["listed"], f.peers["gone"]
	f.mu.Unlock()
	if listed == nil || gone == nil {
		t.Fatalf("peers kept: listed %v, gone %v; want both (gone for the lease)", listed != nil, gone != nil)
	}
	ctx := context.Background()
	for range f.cfg.BreakerFailures + 1 {
		f.refreshIdle(ctx)
	}
	if s := listed.br.State(); s != gobreaker.StateOpen {
		t.Fatalf("a listed peer that does not answer: breaker %v after %d refreshes, want open (the check proves nothing)", s, f.cfg.BreakerFailures+1)
	}
	if s := gone.br.State(); s != gobreaker.StateClosed {
		t.Errorf("a peer discovery no longer lists was probed: breaker %v, want closed", s)
	}
}
