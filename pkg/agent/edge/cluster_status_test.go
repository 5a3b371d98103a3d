package edge

import (
	"context"
	"testing"
	"time"

	"github.com/rs/zerolog"
	"go.uber.org/goleak"

	"github.com/snakepit/snakepit/internal/freeport"
	"github.com/snakepit/snakepit/pkg/agent/engine"
	snakepitv1 "github.com/snakepit/snakepit/proto/snakepit/v1"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// fakeEngine answers Status and Loads; the edge's other uses of the
// engine are not exercised here.
type fakeEngine struct {
	Engine
	id string
}

func (f fakeEngine) Status() engine.Status {
	return engine.Status{NodeID: f.id, Pools: []engine.PoolStatus{{Name: "p", Size: 2, Ready: 2}}}
}
func (fakeEngine) Loads() ([]string, []float64) { return []string{"p"}, []float64{0} }

type fakeCluster map[string]string

func (fakeCluster) NextOwner(string, string) string { return "" }
func (c fakeCluster) PeerAddrs() map[string]string  { return c }

func startEdge(t *testing.T, id string, peers fakeCluster) *Server {
	t.Helper()
	s := New(Config{NodeID: id, Listen: "127.0.0.1:0", MetricsListen: "off", MaxMessageBytes: 1 << 20,
		MaxStreamsPerConnection: 100, ClusterStatusTimeout: 5 * time.Second},
		Deps{Log: zerolog.Nop(), Engine: fakeEngine{id: id}, Cluster: peers, Metrics: NewMetrics()})
	if err := s.Listen(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- s.Run(context.Background()) }()
	t.Cleanup(func() {
		s.Stop(time.Second)
		if err := <-done; err != nil {
			t.Errorf("Run = %v", err)
		}
	})
	return s
}

// ClusterStatus asks every node the cluster layer lists: one that answers
// gets its status, one that does not a row with the error.
func TestClusterStatusAsksEveryPeer(t *testing.T) {
	other := startEdge(t, "node-b", fakeCluster{})
	dead := freeport.MustAddr(t) // nothing listens there
	s := startEdge(t, "node-a", fakeCluster{"node-b": other.Addr().String(), "node-c": dead})
	st, err := (&adminService{Server: s}).ClusterStatus(context.Background(), &snakepitv1.ClusterStatusRequest{})
	if err != nil || len(st.GetNodes()) != 3 || st.GetTotals().GetReachable() != 2 {
		t.Fatalf("ClusterStatus with peers = %v, %v; want 3 rows, 2 reachable", st, err)
	}
	if r := st.GetNodes()[2]; r.GetNodeId() != "node-c" || r.GetError() == "" || r.GetStatus() != nil {
		t.Errorf("unreachable row = %v, want node-c with an error", r)
	}
	if r := st.GetNodes()[1]; r.GetNodeId() != "node-b" || r.GetStatus().GetNodeId() != "node-b" {
		t.Errorf("peer row = %v, want node-b's status", r)
	}
}
