package agent

import (
	"context"
	"fmt"
	"github.com/snakepit/snakepit/pkg/agent/call"
	"math/rand/v2"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"

	"github.com/snakepit/snakepit/pkg/worker"
	snakepitv1 "github.com/snakepit/snakepit/proto/snakepit/v1"
)

func toolsPool(t testing.TB, mod func(*PoolConfig)) PoolConfig {
	pc := PoolConfig{Name: "test", Adapter: testAdapter(t, "tools.py"), Size: 1}
	if mod != nil {
		mod(&pc)
	}
	return pc
}

func generationOf(t testing.TB, tn *testNode, id uint64) uint64 {
	t.Helper()
	st, err := tn.sp.Status(context.Background(), &snakepitv1.StatusRequest{})
	if err != nil {
		t.Fatal(err)
	}
	for _, w := range st.GetPools()[0].GetWorkers() {
		if w.GetId() == id {
			return w.GetGeneration()
		}
	}
	return 0
}

func TestHungWorkerIsReplaced(t *testing.T) {
	tn := startNode(t, testConfig(t, toolsPool(t, func(pc *PoolConfig) {
		pc.HeartbeatInterval = 50 * time.Millisecond
		pc.HeartbeatTimeout = 500 * time.Millisecond
	})))
	gen := generationOf(t, tn, 0)
	_, err := tn.exec(t, &snakepitv1.ExecuteRequest{Tool: "gil_sleep", Args: []byte(`{"seconds": 60}`)})
	ei := errorInfo(err)
	if status.Code(err) != codes.Unavailable || ei.GetMetadata()["cause"] != worker.CauseHung {
		t.Fatalf("call in a worker stuck holding the GIL = %v (%v), want UNAVAILABLE with cause hung", err, ei)
	}
	waitStatus(t, tn, func(p *snakepitv1.PoolStatus) bool {
		return p.GetReadyWorkers() == 1 && p.GetWorkers()[0].GetGeneration() != gen
	})
}

func TestBusyWorkerIsNotHung(t *testing.T) {
	tn := startNode(t, testConfig(t, toolsPool(t, func(pc *PoolConfig) {
		pc.HeartbeatInterval = 50 * time.Millisecond
		pc.HeartbeatTimeout = 300 * time.Millisecond
	})))
	gen := generationOf(t, tn, 0)
	// Ten times the heartbeat timeout of pure-Python work: the control
	// thread keeps answering.
	resp, err := tn.exec(t, &snakepitv1.ExecuteRequest{Tool: "compute", Args: []byte(`{"seconds": 3}`)})
	if err != nil {
		t.Fatalf("long computation = %v, want a result", err)
	}
	if resp.GetRanOn().GetWorkerGeneration() != gen {
		t.Fatalf("ran on generation %d, want %d (not replaced)", resp.GetRanOn().GetWorkerGeneration(), gen)
	}
}

func TestMemoryGrowthRecycles(t *testing.T) {
	cfg := testConfig(t, toolsPool(t, func(pc *PoolConfig) { pc.MaxMemoryMB = 150 }))
	cfg.MonitorInterval = 20 * time.Millisecond
	tn := startNode(t, cfg)
	gen := generationOf(t, tn, 0)
	// Four calls keep 160 MiB, past the 150 MiB limit: the worker is
	// replaced, and no call fails on the way.
	for i := 0; i < 4; i++ {
		if _, err := tn.exec(t, &snakepitv1.ExecuteRequest{Tool: "leak", Args: []byte(`{"mb": 40}`)}); err != nil {
			t.Fatalf("call %d: %v", i, err)
		}
	}
	waitStatus(t, tn, func(p *snakepitv1.PoolStatus) bool {
		return p.GetReadyWorkers() == 1 && p.GetWorkers()[0].GetGeneration() != gen
	})
	resp, err := tn.exec(t, &snakepitv1.ExecuteRequest{Tool: "leak", Args: []byte(`{"mb": 1}`)})
	if err != nil || string(resp.GetResult()) != "1" {
		t.Fatalf("first call on the replacement = %s, %v; want a fresh process (1 item held)", resp.GetResult(), err)
	}
}

func TestMaxCallsRecyclesWithoutFailures(t *testing.T) {
	tn := startNode(t, testConfig(t, toolsPool(t, func(pc *PoolConfig) { pc.MaxCalls = 5 })))
	gens := map[uint64]int{}
	for i := 0; i < 23; i++ {
		resp, err := tn.exec(t, &snakepitv1.ExecuteRequest{Tool: "count"})
		if err != nil {
			t.Fatalf("call %d during recycling: %v", i, err)
		}
		gens[resp.GetRanOn().GetWorkerGeneration()]++
	}
	for g, n := range gens {
		if n > 5 {
			t.Errorf("generation %d served %d calls, want at most max_calls=5", g, n)
		}
	}
	if len(gens) < 5 {
		t.Errorf("23 calls ran on %d generations, want at least 5", len(gens))
	}
}

func TestIgnoredCancellationRecycles(t *testing.T) {
	tn := startNode(t, testConfig(t, toolsPool(t, func(pc *PoolConfig) { pc.CancelGrace = 100 * time.Millisecond })))
	gen := generationOf(t, tn, 0)
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	_, err := tn.sp.Execute(ctx, &snakepitv1.ExecuteRequest{Pool: "test", Tool: "stubborn", Args: []byte(`{"seconds": 60}`)})
	if status.Code(err) != codes.DeadlineExceeded {
		t.Fatalf("stubborn call = %v, want DEADLINE_EXCEEDED", err)
	}
	waitStatus(t, tn, func(p *snakepitv1.PoolStatus) bool {
		return p.GetReadyWorkers() == 1 && p.GetWorkers()[0].GetGeneration() != gen
	})
	if _, err := tn.exec(t, &snakepitv1.ExecuteRequest{Tool: "noop"}); err != nil {
		t.Fatalf("after recycling: %v", err)
	}
}

func TestRestartBudgetTaintsAndDegrades(t *testing.T) {
	tn := startNode(t, testConfig(t, toolsPool(t, func(pc *PoolConfig) {
		pc.RestartBudget = 2
		pc.RestartBackoffMin = 10 * time.Millisecond
		pc.RestartBackoffMax = 10 * time.Millisecond
		pc.TaintCooldown = time.Hour
	})))
	for i := 0; i < 3; i++ {
		waitStatus(t, tn, func(p *snakepitv1.PoolStatus) bool { return p.GetReadyWorkers() == 1 })
		if _, err := tn.exec(t, &snakepitv1.ExecuteRequest{Tool: "crash"}); status.Code(err) != codes.Unavailable {
			t.Fatalf("crash %d = %v, want UNAVAILABLE", i, err)
		}
	}
	// Wait for the taint itself: right after the third crash the pool is
	// degraded with no worker ready before the supervisor has counted the
	// crash against the budget.
	waitStatus(t, tn, func(p *snakepitv1.PoolStatus) bool {
		return p.GetState() == snakepitv1.PoolState_POOL_STATE_DEGRADED && p.GetReadyWorkers() == 0 &&
			strings.Contains(p.GetReason(), "restart budget exhausted")
	})
	st, _ := tn.sp.Status(context.Background(), &snakepitv1.StatusRequest{})
	if r := st.GetPools()[0].GetReason(); !strings.Contains(r, "restart budget exhausted") || !strings.Contains(r, "exit_code") {
		t.Errorf("reason = %q, want it to explain the taint and the last cause", r)
	}
	// The tainted pool refuses at once instead of queueing for an hour.
	_, err := tn.exec(t, &snakepitv1.ExecuteRequest{Tool: "noop"})
	if status.Code(err) != codes.Unavailable || errorInfo(err).GetReason() != call.ReasonPoolUnavailable {
		t.Fatalf("call to a tainted pool = %v, want UNAVAILABLE POOL_UNAVAILABLE", err)
	}
	hc := healthpb.NewHealthClient(tn.conn)
	for _, svc := range []string{"", PoolHealthService("test")} {
		r, err := hc.Check(context.Background(), &healthpb.HealthCheckRequest{Service: svc})
		if err != nil || r.GetStatus() != healthpb.HealthCheckResponse_NOT_SERVING {
			t.Errorf("health(%q) = %v, %v; want NOT_SERVING", svc, r, err)
		}
	}
}

func TestMathThreadsFollowCapacity(t *testing.T) {
	tn := startNode(t, testConfig(t,
		toolsPool(t, func(pc *PoolConfig) { pc.Capacity = 3 }),
		PoolConfig{Name: "override", Adapter: testAdapter(t, "tools.py"), Size: 1, Env: map[string]string{"OMP_NUM_THREADS": "7"}},
	))
	for _, tt := range []struct{ pool, name, want string }{
		{"test", "OMP_NUM_THREADS", `"3"`},
		{"test", "OPENBLAS_NUM_THREADS", `"3"`},
		{"override", "OMP_NUM_THREADS", `"7"`},
		{"override", "MKL_NUM_THREADS", `"1"`},
	} {
		resp, err := tn.exec(t, &snakepitv1.ExecuteRequest{Pool: tt.pool, Tool: "env", Args: []byte(fmt.Sprintf(`{"name": %q}`, tt.name))})
		if err != nil || string(resp.GetResult()) != tt.want {
			t.Errorf("pool %s %s = %s, %v; want %s", tt.pool, tt.name, resp.GetResult(), err, tt.want)
		}
	}
}

func TestVirtualenvPerPool(t *testing.T) {
	if testing.Short() {
		t.Skip("creates a virtualenv")
	}
	venv := filepath.Join(t.TempDir(), "venv")
	if out, err := exec.Command("python3", "-m", "venv", "--without-pip", venv).CombinedOutput(); err != nil {
		t.Skipf("python3 -m venv is not available here: %v\n%s", err, out)
	}
	tn := startNode(t, testConfig(t, toolsPool(t, func(pc *PoolConfig) { pc.Virtualenv = venv })))
	resp, err := tn.exec(t, &snakepitv1.ExecuteRequest{Tool: "prefix"})
	if err != nil || string(resp.GetResult()) != strconv.Quote(venv) {
		t.Fatalf("sys.prefix = %s, %v; want %q", resp.GetResult(), err, venv)
	}
}

func TestMinReady(t *testing.T) {
	// Workers start one at a time here; the node reports ready after the
	// first (min_ready 1) and the others follow.
	cfg := testConfig(t, toolsPool(t, func(pc *PoolConfig) { pc.Size = 3; pc.MinReady = 1 }))
	cfg.StartConcurrency = 1
	tn := startNode(t, cfg)
	if _, err := tn.exec(t, &snakepitv1.ExecuteRequest{Tool: "noop"}); err != nil {
		t.Fatal(err)
	}
	waitStatus(t, tn, func(p *snakepitv1.PoolStatus) bool { return p.GetReadyWorkers() == 3 })
}

// TestChaosSigkill kills a random worker 100 times under concurrency-32
// load: no call hangs past its deadline, every failure is UNAVAILABLE and
// names a killed worker generation, idempotent calls all succeed, and the
// pool is back to size after each kill.
func TestChaosSigkill(t *testing.T) {
	if testing.Short() {
		t.Skip("chaos loop")
	}
	const size, kills, conc = 4, 100, 32
	tn := startNode(t, testConfig(t, toolsPool(t, func(pc *PoolConfig) {
		pc.Size = size
		pc.RestartBudget = 1000
		pc.RestartBackoffMin = 5 * time.Millisecond
		pc.RestartBackoffMax = 20 * time.Millisecond
	})))
	var (
		killedMu  sync.Mutex
		killed    = map[string]bool{}
		calls     atomic.Int64
		badErrs   atomic.Int64
		idemFails atomic.Int64
		unavail   atomic.Int64
	)
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for g := 0; g < conc; g++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			idem := g%2 == 0
			for {
				select {
				case <-stop:
					return
				default:
				}
				ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
				t0 := time.Now()
				_, err := tn.sp.Execute(ctx, &snakepitv1.ExecuteRequest{Pool: "test", Tool: "nap", Args: []byte(`{"seconds": 0.002}`), Idempotent: idem})
				cancel()
				calls.Add(1)
				if time.Since(t0) > 11*time.Second {
					t.Errorf("a call took %s, past its 10s deadline", time.Since(t0))
				}
				if err == nil {
					continue
				}
				if idem {
					idemFails.Add(1)
					t.Errorf("idempotent call failed: %v", err)
					continue
				}
				ei := errorInfo(err)
				killedMu.Lock()
				ok := status.Code(err) == codes.Unavailable && ei.GetReason() == call.ReasonWorkerExited && killed[ei.GetMetadata()["generation"]]
				killedMu.Unlock()
				if ok {
					unavail.Add(1)
				} else {
					badErrs.Add(1)
					t.Errorf("non-idempotent call failed with %v (%v), want UNAVAILABLE naming a killed generation", err, ei)
				}
			}
		}()
	}
	for k := 0; k < kills; k++ {
		var st *snakepitv1.StatusResponse
		waitStatus(t, tn, func(p *snakepitv1.PoolStatus) bool {
			if p.GetReadyWorkers() != size {
				return false
			}
			for _, w := range p.GetWorkers() {
				if w.GetPid() == 0 {
					return false
				}
			}
			return true
		})
		st, _ = tn.sp.Status(context.Background(), &snakepitv1.StatusRequest{})
		ws := st.GetPools()[0].GetWorkers()
		victim := ws[rand.IntN(len(ws))]
		killedMu.Lock()
		killed[strconv.FormatUint(victim.GetGeneration(), 10)] = true
		killedMu.Unlock()
		if err := syscall.Kill(int(victim.GetPid()), syscall.SIGKILL); err != nil {
			t.Fatalf("kill %d: %v", victim.GetPid(), err)
		}
		waitStatus(t, tn, func(p *snakepitv1.PoolStatus) bool {
			for _, w := range p.GetWorkers() {
				if w.GetId() == victim.GetId() {
					return w.GetGeneration() != victim.GetGeneration() && w.GetState() == "ready"
				}
			}
			return false
		})
	}
	close(stop)
	wg.Wait()
	waitStatus(t, tn, func(p *snakepitv1.PoolStatus) bool { return p.GetReadyWorkers() == size })
	t.Logf("%d calls, %d killed workers, %d non-idempotent calls failed as UNAVAILABLE", calls.Load(), kills, unavail.Load())
	if calls.Load() < kills {
		t.Errorf("only %d calls ran during %d kills", calls.Load(), kills)
	}
}
