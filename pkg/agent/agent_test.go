package agent

import (
	"context"
	"errors"
	"fmt"
	"github.com/snakepit/snakepit/pkg/agent/call"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/rs/zerolog"
	"go.uber.org/goleak"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/snakepit/snakepit/pkg/client"
	snakepitv1 "github.com/snakepit/snakepit/proto/snakepit/v1"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// testNode is a node served in-process on a loopback port.
type testNode struct {
	addr        string
	metricsAddr string
	conn        *client.Conn
	sp          snakepitv1.SnakepitClient
	stop        func() error
}

func testAdapter(t testing.TB, name string) string {
	t.Helper()
	p, err := filepath.Abs(filepath.Join("testdata", name))
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// testConfig returns a config with one pool of testdata/tools.py.
func testConfig(t testing.TB, pools ...PoolConfig) Config {
	t.Helper()
	if len(pools) == 0 {
		pools = []PoolConfig{{Name: "test", Adapter: testAdapter(t, "tools.py"), Size: 2}}
	}
	return Config{NodeID: "node-a", Listen: "127.0.0.1:0", MetricsListen: "127.0.0.1:0", StateDir: t.TempDir(), Pools: pools, ShutdownGrace: 10 * time.Second}
}

// startNode serves cfg and waits until it is ready.
func startNode(t testing.TB, cfg Config) *testNode {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	addrCh := make(chan string, 1)
	metricsCh := make(chan string, 1)
	ready := make(chan struct{})
	errCh := make(chan error, 1)
	go func() {
		errCh <- Serve(ctx, cfg, zerolog.New(zerolog.NewTestWriter(t)).Level(zerolog.WarnLevel), Hooks{
			Listening:        func(a net.Addr) { addrCh <- a.String() },
			MetricsListening: func(a net.Addr) { metricsCh <- a.String() },
			Ready:            func() { close(ready) },
		})
	}()
	var addr string
	select {
	case addr = <-addrCh:
	case err := <-errCh:
		cancel()
		t.Fatalf("Serve: %v", err)
	}
	select {
	case <-ready:
	case err := <-errCh:
		cancel()
		t.Fatalf("Serve before ready: %v", err)
	case <-time.After(60 * time.Second):
		cancel()
		t.Fatal("node not ready within 60s")
	}
	c, err := client.Dial(addr)
	if err != nil {
		t.Fatal(err)
	}
	var once sync.Once
	var stopErr error
	tn := &testNode{addr: addr, conn: c, sp: c.Snakepit}
	select {
	case tn.metricsAddr = <-metricsCh:
	default:
	}
	tn.stop = func() error {
		once.Do(func() {
			c.Close()
			cancel()
			stopErr = <-errCh
		})
		return stopErr
	}
	t.Cleanup(func() {
		if err := tn.stop(); err != nil {
			t.Errorf("Serve returned %v on stop, want nil", err)
		}
	})
	return tn
}

func (tn *testNode) exec(t testing.TB, req *snakepitv1.ExecuteRequest) (*snakepitv1.ExecuteResponse, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if req.Pool == "" {
		req.Pool = "test"
	}
	return tn.sp.Execute(ctx, req)
}

func errorInfo(err error) *errdetails.ErrorInfo {
	for _, d := range status.Convert(err).Details() {
		if ei, ok := d.(*errdetails.ErrorInfo); ok {
			return ei
		}
	}
	return nil
}

func TestExecuteReportsWhereItRan(t *testing.T) {
	tn := startNode(t, testConfig(t))
	resp, err := tn.exec(t, &snakepitv1.ExecuteRequest{Tool: "add", Args: []byte(`{"a": 40, "b": 2}`), RequestId: "req-1"})
	if err != nil {
		t.Fatal(err)
	}
	if string(resp.GetResult()) != "42" {
		t.Errorf("result = %s, want 42", resp.GetResult())
	}
	ran := resp.GetRanOn()
	if ran.GetNodeId() != "node-a" || ran.GetPool() != "test" || ran.GetWorkerGeneration() == 0 || resp.GetRequestId() != "req-1" {
		t.Errorf("ran_on = %v request_id %q, want node-a/test with a generation and req-1", ran, resp.GetRequestId())
	}
	if resp.GetRan().AsDuration() <= 0 || resp.GetQueued() == nil {
		t.Errorf("timings queued=%v ran=%v, want both set", resp.GetQueued(), resp.GetRan())
	}
}

func TestDefaultPoolIsTheFirst(t *testing.T) {
	tn := startNode(t, testConfig(t))
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	resp, err := tn.sp.Execute(ctx, &snakepitv1.ExecuteRequest{Tool: "add", Args: []byte(`{"a":1,"b":2}`)})
	if err != nil || resp.GetRanOn().GetPool() != "test" {
		t.Fatalf("Execute without pool = %v, %v; want it to run in pool test", resp, err)
	}
	if resp.GetRequestId() == "" {
		t.Error("the node did not assign a request id")
	}
}

func TestBadInput(t *testing.T) {
	cfg := testConfig(t)
	cfg.MaxMessageBytes = 64 << 10
	tn := startNode(t, cfg)
	tests := []struct {
		name     string
		req      *snakepitv1.ExecuteRequest
		code     codes.Code
		reason   string
		contains []string
	}{
		{"unknown tool", &snakepitv1.ExecuteRequest{Tool: "nope"}, codes.NotFound, call.ReasonUnknownTool, []string{`"nope"`, "add", "noop"}},
		{"unknown pool", &snakepitv1.ExecuteRequest{Tool: "add", Pool: "gpu"}, codes.NotFound, call.ReasonUnknownPool, []string{`"gpu"`, "test"}},
		{"no tool", &snakepitv1.ExecuteRequest{}, codes.InvalidArgument, call.ReasonInvalidArgument, []string{"tool"}},
		{"args not json", &snakepitv1.ExecuteRequest{Tool: "add", Args: []byte(`{"a":`)}, codes.InvalidArgument, call.ReasonInvalidArgument, []string{"not valid JSON"}},
		{"args an array", &snakepitv1.ExecuteRequest{Tool: "add", Args: []byte(`[1, 2]`)}, codes.InvalidArgument, call.ReasonInvalidArgument, []string{"JSON object", "array"}},
		{"args missing", &snakepitv1.ExecuteRequest{Tool: "add", Args: []byte(`{"a": 1}`)}, codes.InvalidArgument, call.ReasonInvalidArgument, []string{"'b'"}},
		{"args unexpected", &snakepitv1.ExecuteRequest{Tool: "add", Args: []byte(`{"a": 1, "b": 2, "c": 3}`)}, codes.InvalidArgument, call.ReasonInvalidArgument, []string{"'c'"}},
		{"tool raises", &snakepitv1.ExecuteRequest{Tool: "boom", Args: []byte(`{"message": "kaput"}`)}, codes.Unknown, call.ReasonToolException, []string{"KeyError", "kaput"}},
		{"result not json", &snakepitv1.ExecuteRequest{Tool: "unencodable"}, codes.Unknown, call.ReasonResultNotJSON, []string{"set"}},
		{"message too large", &snakepitv1.ExecuteRequest{Tool: "add", Args: []byte(`{"a": "` + strings.Repeat("x", 100<<10) + `"}`)}, codes.ResourceExhausted, "", []string{"larger than max"}},
		{"result too large", &snakepitv1.ExecuteRequest{Tool: "big", Args: []byte(`{"n": 200000}`)}, codes.ResourceExhausted, call.ReasonResultTooLarge, []string{"200002 bytes", "max_message_bytes"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := tn.exec(t, tt.req)
			st := status.Convert(err)
			if st.Code() != tt.code {
				t.Fatalf("Execute(%s) code = %s (%v), want %s", tt.req.GetTool(), st.Code(), err, tt.code)
			}
			for _, s := range tt.contains {
				if !strings.Contains(st.Message(), s) {
					t.Errorf("message %q does not mention %q", st.Message(), s)
				}
			}
			if tt.reason != "" {
				if ei := errorInfo(err); ei == nil || ei.GetReason() != tt.reason {
					t.Errorf("ErrorInfo = %v, want reason %s", ei, tt.reason)
				}
			}
		})
	}
	// Nothing above hurt the workers: both still serve.
	for i := 0; i < 4; i++ {
		if resp, err := tn.exec(t, &snakepitv1.ExecuteRequest{Tool: "add", Args: []byte(`{"a":1,"b":1}`)}); err != nil || string(resp.GetResult()) != "2" {
			t.Fatalf("after bad input: %v, %v", resp, err)
		}
	}
}

func TestToolExceptionCarriesTraceback(t *testing.T) {
	tn := startNode(t, testConfig(t))
	_, err := tn.exec(t, &snakepitv1.ExecuteRequest{Tool: "boom", Args: []byte(`{"message":"kaput"}`)})
	var dbg *errdetails.DebugInfo
	for _, d := range status.Convert(err).Details() {
		if di, ok := d.(*errdetails.DebugInfo); ok {
			dbg = di
		}
	}
	tb := strings.Join(dbg.GetStackEntries(), "\n")
	if !strings.Contains(tb, "tools.py") || !strings.Contains(tb, "raise KeyError(message)") || strings.Contains(tb, "_worker.py") {
		t.Fatalf("traceback = %q, want the user's frames only", tb)
	}
	if ei := errorInfo(err); ei.GetMetadata()["type"] != "KeyError" {
		t.Errorf("ErrorInfo metadata = %v, want type KeyError", ei.GetMetadata())
	}
}

func TestPrintingToolDoesNotDisturbProtocol(t *testing.T) {
	tn := startNode(t, testConfig(t))
	for i := 0; i < 20; i++ {
		resp, err := tn.exec(t, &snakepitv1.ExecuteRequest{Tool: "chatty", Args: []byte(`{"text":"hello"}`)})
		if err != nil || string(resp.GetResult()) != `"hello"` {
			t.Fatalf("chatty = %v, %v", resp, err)
		}
	}
}

func TestBrokenAdapterFailsStartWithTraceback(t *testing.T) {
	cfg := testConfig(t, PoolConfig{Name: "broken", Adapter: testAdapter(t, "broken.py"), Size: 2})
	errCh := make(chan error, 1)
	go func() { errCh <- Serve(context.Background(), cfg, zerolog.Nop(), Hooks{}) }()
	select {
	case err := <-errCh:
		if err == nil || !strings.Contains(err.Error(), `pool "broken"`) || !strings.Contains(err.Error(), "ModuleNotFoundError") ||
			!strings.Contains(err.Error(), "no_such_module_anywhere") || !strings.Contains(err.Error(), "broken.py") {
			t.Fatalf("Serve with a broken adapter = %v, want an error naming the pool with the Python traceback", err)
		}
	case <-time.After(60 * time.Second):
		t.Fatal("Serve with a broken adapter hung")
	}
}

func TestQueueFullIsRefusedAtOnce(t *testing.T) {
	tn := startNode(t, testConfig(t, PoolConfig{Name: "test", Adapter: testAdapter(t, "tools.py"), Size: 1, QueueDepth: 1}))
	marker := filepath.Join(t.TempDir(), "m")
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	holding := make(chan error, 1)
	go func() {
		_, err := tn.sp.Execute(ctx, &snakepitv1.ExecuteRequest{Pool: "test", Tool: "hold", Args: []byte(fmt.Sprintf(`{"marker": %q}`, marker))})
		holding <- err
	}()
	waitStatus(t, tn, func(p *snakepitv1.PoolStatus) bool { return p.GetBusy() == 1 })
	queued := make(chan error, 1)
	go func() {
		_, err := tn.sp.Execute(context.Background(), &snakepitv1.ExecuteRequest{Pool: "test", Tool: "count", Idempotent: true})
		queued <- err
	}()
	waitStatus(t, tn, func(p *snakepitv1.PoolStatus) bool { return p.GetQueued() == 1 })
	_, err := tn.exec(t, &snakepitv1.ExecuteRequest{Tool: "count"})
	if status.Code(err) != codes.ResourceExhausted || errorInfo(err).GetReason() != call.ReasonQueueFull {
		t.Fatalf("third call = %v, want RESOURCE_EXHAUSTED QUEUE_FULL", err)
	}
	var retry *errdetails.RetryInfo
	for _, d := range status.Convert(err).Details() {
		if r, ok := d.(*errdetails.RetryInfo); ok {
			retry = r
		}
	}
	if retry.GetRetryDelay().AsDuration() <= 0 {
		t.Errorf("RetryInfo = %v, want a retry delay", retry)
	}
	cancel()
	if err := <-holding; status.Code(err) != codes.Canceled {
		t.Fatalf("held call = %v, want CANCELED", err)
	}
	if err := <-queued; err != nil {
		t.Fatalf("queued call = %v, want it served", err)
	}
	// The refused call never ran: the queued one was count's first call.
	resp, err := tn.exec(t, &snakepitv1.ExecuteRequest{Tool: "count"})
	if err != nil || string(resp.GetResult()) != "2" {
		t.Fatalf("count = %v, %v; want 2 (the refused call must not have run)", resp, err)
	}
}

func TestQueueMaxWait(t *testing.T) {
	tn := startNode(t, testConfig(t, PoolConfig{Name: "test", Adapter: testAdapter(t, "tools.py"), Size: 1, QueueMaxWait: 100 * time.Millisecond}))
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go tn.sp.Execute(ctx, &snakepitv1.ExecuteRequest{Pool: "test", Tool: "hold", Args: []byte(fmt.Sprintf(`{"marker": %q}`, filepath.Join(t.TempDir(), "m")))})
	waitStatus(t, tn, func(p *snakepitv1.PoolStatus) bool { return p.GetBusy() == 1 })
	_, err := tn.exec(t, &snakepitv1.ExecuteRequest{Tool: "count"})
	if status.Code(err) != codes.ResourceExhausted || errorInfo(err).GetReason() != call.ReasonQueueTimeout {
		t.Fatalf("call past queue_max_wait = %v, want RESOURCE_EXHAUSTED QUEUE_TIMEOUT", err)
	}
	cancel()
}

func TestDeadlineShorterThanQueueWait(t *testing.T) {
	tn := startNode(t, testConfig(t, PoolConfig{Name: "test", Adapter: testAdapter(t, "tools.py"), Size: 1}))
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go tn.sp.Execute(ctx, &snakepitv1.ExecuteRequest{Pool: "test", Tool: "hold", Args: []byte(fmt.Sprintf(`{"marker": %q}`, filepath.Join(t.TempDir(), "m")))})
	waitStatus(t, tn, func(p *snakepitv1.PoolStatus) bool { return p.GetBusy() == 1 })
	short, cancelShort := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancelShort()
	_, err := tn.sp.Execute(short, &snakepitv1.ExecuteRequest{Pool: "test", Tool: "count"})
	if status.Code(err) != codes.DeadlineExceeded {
		t.Fatalf("short deadline while queued = %v, want DEADLINE_EXCEEDED", err)
	}
	cancel()
	// It never ran.
	resp, err := tn.exec(t, &snakepitv1.ExecuteRequest{Tool: "count"})
	if err != nil || string(resp.GetResult()) != "1" {
		t.Fatalf("count = %v, %v; want 1: the timed-out call must not have run", resp, err)
	}
}

func TestDeadlineWhileRunningCancelsPython(t *testing.T) {
	tn := startNode(t, testConfig(t))
	marker := filepath.Join(t.TempDir(), "m")
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	_, err := tn.sp.Execute(ctx, &snakepitv1.ExecuteRequest{Pool: "test", Tool: "hold", Args: []byte(fmt.Sprintf(`{"marker": %q}`, marker))})
	if status.Code(err) != codes.DeadlineExceeded {
		t.Fatalf("hold with 200ms deadline = %v, want DEADLINE_EXCEEDED", err)
	}
	waitFile(t, marker, "cancelled")
}

func TestClientDisconnectCancelsPython(t *testing.T) {
	tn := startNode(t, testConfig(t))
	marker := filepath.Join(t.TempDir(), "m")
	c, err := client.Dial(tn.addr)
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() {
		_, err := c.Snakepit.Execute(context.Background(), &snakepitv1.ExecuteRequest{Pool: "test", Tool: "hold", Args: []byte(fmt.Sprintf(`{"marker": %q}`, marker))})
		done <- err
	}()
	waitStatus(t, tn, func(p *snakepitv1.PoolStatus) bool { return p.GetBusy() == 1 })
	c.Close() // the client goes away mid-call
	<-done
	waitFile(t, marker, "cancelled")
	waitStatus(t, tn, func(p *snakepitv1.PoolStatus) bool { return p.GetBusy() == 0 })
}

func TestWorkerCrashFailsCallAndIsReplaced(t *testing.T) {
	tn := startNode(t, testConfig(t))
	_, err := tn.exec(t, &snakepitv1.ExecuteRequest{Tool: "crash", Args: []byte(`{"code": 9}`)})
	ei := errorInfo(err)
	if status.Code(err) != codes.Unavailable || ei.GetReason() != call.ReasonWorkerExited || ei.GetMetadata()["exit_code"] != "9" || ei.GetMetadata()["generation"] == "" {
		t.Fatalf("crash = %v (%v), want UNAVAILABLE WORKER_EXITED with exit code 9 and the generation", err, ei)
	}
	waitStatus(t, tn, func(p *snakepitv1.PoolStatus) bool { return p.GetReadyWorkers() == 2 })
	if _, err := tn.exec(t, &snakepitv1.ExecuteRequest{Tool: "noop"}); err != nil {
		t.Fatalf("after replacement: %v", err)
	}
}

func TestListToolsAndStatus(t *testing.T) {
	tn := startNode(t, testConfig(t))
	ctx := context.Background()
	lt, err := tn.sp.ListTools(ctx, &snakepitv1.ListToolsRequest{})
	if err != nil {
		t.Fatal(err)
	}
	var add *snakepitv1.Tool
	for _, tl := range lt.GetTools() {
		if tl.GetName() == "add" {
			add = tl
		}
	}
	if add == nil || add.GetPool() != "test" || len(add.GetParameters()) != 2 || add.GetParameters()[0].GetType() != "int" {
		t.Fatalf("ListTools add = %v", add)
	}
	if _, err := tn.sp.ListTools(ctx, &snakepitv1.ListToolsRequest{Pool: "nope"}); status.Code(err) != codes.NotFound {
		t.Fatalf("ListTools(nope) = %v, want NOT_FOUND", err)
	}
	for i := 0; i < 5; i++ {
		tn.exec(t, &snakepitv1.ExecuteRequest{Tool: "noop"})
	}
	tn.exec(t, &snakepitv1.ExecuteRequest{Tool: "boom", Args: []byte(`{"message":"x"}`)})
	st, err := tn.sp.Status(ctx, &snakepitv1.StatusRequest{})
	if err != nil {
		t.Fatal(err)
	}
	p := st.GetPools()[0]
	if p.GetServed() != 5 || p.GetErrors() != 1 || p.GetReadyWorkers() != 2 || len(p.GetWorkers()) != 2 || p.GetLatency().GetP50().AsDuration() <= 0 {
		t.Fatalf("status = %v, want 5 served, 1 error, 2 workers and a p50", p)
	}
}

func waitStatus(t testing.TB, tn *testNode, cond func(*snakepitv1.PoolStatus) bool) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		st, err := tn.sp.Status(context.Background(), &snakepitv1.StatusRequest{})
		if err == nil && cond(st.GetPools()[0]) {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("pool status not reached within 30s: %v %v", st, err)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func waitFile(t testing.TB, path, want string) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		b, err := os.ReadFile(path)
		if err == nil && string(b) == want {
			return
		}
		if err != nil && !errors.Is(err, os.ErrNotExist) {
			t.Fatal(err)
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s = %q within 30s, want %q", path, b, want)
		}
		time.Sleep(5 * time.Millisecond)
	}
}
