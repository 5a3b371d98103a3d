package engine

import (
	"context"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/rs/zerolog"
	"go.uber.org/goleak"

	"github.com/snakepit/snakepit/pkg/hw"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// testConfig returns an engine config with the given pools, each filled
// with small test values (the node's defaults live in pkg/agent, which
// fills every field in production).
func testConfig(t testing.TB, pools ...PoolConfig) Config {
	t.Helper()
	for i := range pools {
		pools[i] = testPool(pools[i])
	}
	return Config{
		NodeID: "node-a", StateDir: t.TempDir(), MaxMessageBytes: 16 << 20, StartConcurrency: 4,
		MonitorInterval: time.Second, MaxSessions: 1000, StderrTail: 20, DrainDeadline: time.Minute, Pools: pools,
	}
}

func testPool(p PoolConfig) PoolConfig {
	set := func(v *time.Duration, d time.Duration) {
		if *v == 0 {
			*v = d
		}
	}
	if p.Python == "" {
		p.Python = "python3"
	}
	if p.Size == 0 {
		p.Size = 1
	}
	if p.MinReady == 0 {
		p.MinReady = p.Size
	}
	if p.Capacity == 0 {
		p.Capacity = 1
	}
	if p.QueueDepth == 0 {
		p.QueueDepth = 64
	}
	if p.MaxSessionsPerWorker == 0 {
		p.MaxSessionsPerWorker = 64
	}
	if p.StreamWindow == 0 {
		p.StreamWindow = 8
	}
	if p.RestartBudget == 0 {
		p.RestartBudget = 5
	}
	set(&p.QueueMaxWait, 30*time.Second)
	set(&p.CallTimeout, 30*time.Second)
	set(&p.StartTimeout, 60*time.Second)
	set(&p.StopGrace, 5*time.Second)
	set(&p.RecycleDrainTimeout, 5*time.Second)
	set(&p.HeartbeatInterval, time.Second)
	set(&p.HeartbeatTimeout, 10*time.Second)
	set(&p.CancelGrace, 5*time.Second)
	set(&p.RestartBackoffMin, 20*time.Millisecond)
	set(&p.RestartBackoffMax, time.Second)
	set(&p.RestartWindow, time.Minute)
	set(&p.TaintCooldown, time.Minute)
	set(&p.SessionIdleTimeout, time.Minute)
	return p
}

// writeAdapter writes an adapter module into a temporary directory and
// returns its path.
func writeAdapter(t *testing.T, name, src string) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), name)
	if err := os.WriteFile(path, []byte(src), 0o644); err != nil {
		t.Fatal(err)
	}
	return path
}

// runGPUNode runs an engine on the inventory inv until the test ends, and
// returns it once ready, with a context that ends with the test.
func runGPUNode(t *testing.T, cfg Config, inv hw.Inventory) (*Engine, context.Context) {
	t.Helper()
	n, err := New(cfg, Deps{Log: zerolog.New(zerolog.NewTestWriter(t)).Level(zerolog.WarnLevel), GPUs: inv})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	runErr := make(chan error, 1)
	go func() { runErr <- n.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-runErr; err != nil {
			t.Errorf("Run = %v", err)
		}
	})
	select {
	case <-n.Ready():
	case err := <-runErr:
		runErr <- err
		t.Fatalf("Run before ready: %v", err)
	case <-time.After(60 * time.Second):
		t.Fatal("node not ready within 60s")
	}
	return n, ctx
}
