package agent

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"github.com/snakepit/snakepit/pkg/agent/call"
	"io"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/snakepit/snakepit/pkg/client"
	snakepitv1 "github.com/snakepit/snakepit/proto/snakepit/v1"
)

type tallyResult struct {
	N   *int `json:"n"`
	PID int  `json:"pid"`
}

func tally(t testing.TB, tn *testNode, session string, mode snakepitv1.Affinity) (tallyResult, *snakepitv1.ExecuteResponse, error) {
	t.Helper()
	resp, err := tn.exec(t, &snakepitv1.ExecuteRequest{Tool: "tally", SessionId: session, Affinity: mode})
	var r tallyResult
	if err == nil {
		if jerr := json.Unmarshal(resp.GetResult(), &r); jerr != nil {
			t.Fatal(jerr)
		}
	}
	return r, resp, err
}

func n(r tallyResult) int {
	if r.N == nil {
		return -1
	}
	return *r.N
}

func TestSessionStateAcrossManyCalls(t *testing.T) {
	tn := startNode(t, testConfig(t, toolsPool(t, func(pc *PoolConfig) { pc.Size = 2 })))
	for i := 1; i <= 1000; i++ {
		r, resp, err := tally(t, tn, "chat-1", snakepitv1.Affinity_AFFINITY_HINT)
		if err != nil {
			t.Fatal(err)
		}
		want := snakepitv1.SessionOutcome_SESSION_OUTCOME_BOUND
		if i == 1 {
			want = snakepitv1.SessionOutcome_SESSION_OUTCOME_NEW
		}
		if n(r) != i || resp.GetSession() != want {
			t.Fatalf("call %d: n=%d outcome %s, want n=%d %s", i, n(r), resp.GetSession(), i, want)
		}
	}
}

func TestConcurrentSessionsKeepTheirOwnState(t *testing.T) {
	tn := startNode(t, testConfig(t, toolsPool(t, func(pc *PoolConfig) { pc.Size = 4 })))
	const sessions, calls = 200, 10
	var wg sync.WaitGroup
	errs := make(chan error, sessions)
	for s := 0; s < sessions; s++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			id := fmt.Sprintf("s-%d", s)
			pid := 0
			for i := 1; i <= calls; i++ {
				r, _, err := tally(t, tn, id, snakepitv1.Affinity_AFFINITY_STRICT_QUEUE)
				if err != nil {
					errs <- fmt.Errorf("%s call %d: %v", id, i, err)
					return
				}
				if pid == 0 {
					pid = r.PID
				}
				if n(r) != i || r.PID != pid {
					errs <- fmt.Errorf("%s call %d: n=%d pid %d, want n=%d on pid %d", id, i, n(r), r.PID, i, pid)
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	list, err := tn.sp.ListSessions(context.Background(), &snakepitv1.ListSessionsRequest{})
	if err != nil || len(list.GetSessions()) != sessions {
		t.Fatalf("ListSessions = %d sessions, %v; want %d", len(list.GetSessions()), err, sessions)
	}
	perWorker := map[uint64]int{}
	for _, s := range list.GetSessions() {
		perWorker[s.GetWorkerId()]++
		if s.GetCalls() != calls {
			t.Errorf("session %s calls = %d, want %d", s.GetSessionId(), s.GetCalls(), calls)
		}
	}
	if len(perWorker) != 4 {
		t.Errorf("sessions spread over %d workers, want all 4: %v", len(perWorker), perWorker)
	}
}

func TestKilledWorkerIsNeverASilentReset(t *testing.T) {
	tn := startNode(t, testConfig(t, toolsPool(t, func(pc *PoolConfig) { pc.Size = 2 })))
	// Bind sessions, then kill the worker that holds the first one.
	owner := map[string]int{}
	for _, id := range []string{"a", "b", "c", "d"} {
		r, _, err := tally(t, tn, id, snakepitv1.Affinity_AFFINITY_HINT)
		if err != nil {
			t.Fatal(err)
		}
		owner[id] = r.PID
	}
	victim := owner["a"]
	if err := syscall.Kill(victim, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	waitStatus(t, tn, func(p *snakepitv1.PoolStatus) bool {
		if p.GetReadyWorkers() != 2 {
			return false
		}
		for _, w := range p.GetWorkers() {
			if int(w.GetPid()) == victim {
				return false
			}
		}
		return true
	})
	strict := true
	for id, pid := range owner {
		if pid != victim {
			r, resp, err := tally(t, tn, id, snakepitv1.Affinity_AFFINITY_HINT)
			if err != nil || n(r) != 2 || resp.GetSession() != snakepitv1.SessionOutcome_SESSION_OUTCOME_BOUND {
				t.Errorf("session %s on the surviving worker: n=%d %s %v, want n=2 BOUND", id, n(r), resp.GetSession(), err)
			}
			continue
		}
		if strict {
			// strict: an error naming the lost generation; then a new session.
			_, _, err := tally(t, tn, id, snakepitv1.Affinity_AFFINITY_STRICT_QUEUE)
			ei := errorInfo(err)
			if status.Code(err) != codes.FailedPrecondition || ei.GetReason() != call.ReasonSessionLost || ei.GetMetadata()["generation"] == "0" {
				t.Errorf("strict call of %s after its worker died = %v (%v), want FAILED_PRECONDITION SESSION_LOST with the generation", id, err, ei)
			}
			r, resp, err := tally(t, tn, id, snakepitv1.Affinity_AFFINITY_STRICT_QUEUE)
			if err != nil || n(r) != 1 || resp.GetSession() != snakepitv1.SessionOutcome_SESSION_OUTCOME_NEW {
				t.Errorf("next strict call of %s = n=%d %s %v, want a NEW session", id, n(r), resp.GetSession(), err)
			}
		} else {
			r, resp, err := tally(t, tn, id, snakepitv1.Affinity_AFFINITY_HINT)
			if err != nil || n(r) != 1 || resp.GetSession() != snakepitv1.SessionOutcome_SESSION_OUTCOME_RESET {
				t.Errorf("hint call of %s after its worker died = n=%d %s %v, want n=1 RESET", id, n(r), resp.GetSession(), err)
			}
		}
		strict = !strict
	}
}

// busySession binds session id to a worker and keeps that worker busy
// with a call of the same session until the returned func is called.
func busySession(t *testing.T, tn *testNode, id string) (pid int, release func()) {
	t.Helper()
	r, _, err := tally(t, tn, id, snakepitv1.Affinity_AFFINITY_HINT)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	marker := filepath.Join(t.TempDir(), "m")
	go func() {
		defer close(done)
		tn.sp.Execute(ctx, &snakepitv1.ExecuteRequest{Pool: "test", Tool: "hold", SessionId: id, Args: []byte(fmt.Sprintf(`{"marker": %q}`, marker))})
	}()
	waitStatus(t, tn, func(p *snakepitv1.PoolStatus) bool { return p.GetBusy() == 1 })
	return r.PID, func() {
		cancel()
		<-done
		waitFile(t, marker, "cancelled")
		// The Python side has seen the cancel; wait until the pool has
		// taken the worker back too (its answer to the cancelled call).
		waitStatus(t, tn, func(p *snakepitv1.PoolStatus) bool { return p.GetBusy() == 0 })
	}
}

func TestAffinityModesWhenTheWorkerIsBusy(t *testing.T) {
	t.Run("hint runs elsewhere and says the state was not there", func(t *testing.T) {
		tn := startNode(t, testConfig(t, toolsPool(t, func(pc *PoolConfig) { pc.Size = 2 })))
		pid, release := busySession(t, tn, "s")
		defer release()
		r, resp, err := tally(t, tn, "s", snakepitv1.Affinity_AFFINITY_HINT)
		if err != nil || r.PID == pid || n(r) != 1 || resp.GetSession() != snakepitv1.SessionOutcome_SESSION_OUTCOME_UNAVAILABLE {
			t.Fatalf("hint call = pid %d n=%d %s %v; want another worker, an empty store, UNAVAILABLE", r.PID, n(r), resp.GetSession(), err)
		}
		release()
		r, resp, err = tally(t, tn, "s", snakepitv1.Affinity_AFFINITY_HINT)
		if err != nil || r.PID != pid || n(r) != 2 || resp.GetSession() != snakepitv1.SessionOutcome_SESSION_OUTCOME_BOUND {
			t.Fatalf("next hint call = pid %d n=%d %s %v; want its own worker with its state (n=2)", r.PID, n(r), resp.GetSession(), err)
		}
	})
	t.Run("strict_fail_fast refuses at once", func(t *testing.T) {
		tn := startNode(t, testConfig(t, toolsPool(t, func(pc *PoolConfig) { pc.Size = 2 })))
		_, release := busySession(t, tn, "s")
		defer release()
		_, _, err := tally(t, tn, "s", snakepitv1.Affinity_AFFINITY_STRICT_FAIL_FAST)
		if status.Code(err) != codes.ResourceExhausted || errorInfo(err).GetReason() != call.ReasonSessionBusy {
			t.Fatalf("strict_fail_fast = %v, want RESOURCE_EXHAUSTED SESSION_WORKER_BUSY", err)
		}
	})
	t.Run("strict_queue waits for its worker", func(t *testing.T) {
		tn := startNode(t, testConfig(t, toolsPool(t, func(pc *PoolConfig) { pc.Size = 2 })))
		pid, release := busySession(t, tn, "s")
		type out struct {
			r    tallyResult
			resp *snakepitv1.ExecuteResponse
			err  error
		}
		got := make(chan out, 1)
		go func() {
			r, resp, err := tally(t, tn, "s", snakepitv1.Affinity_AFFINITY_STRICT_QUEUE)
			got <- out{r, resp, err}
		}()
		waitStatus(t, tn, func(p *snakepitv1.PoolStatus) bool { return p.GetQueued() == 1 })
		// The other worker is idle, yet the call waits for its own.
		if _, err := tn.exec(t, &snakepitv1.ExecuteRequest{Tool: "noop"}); err != nil {
			t.Fatal(err)
		}
		release()
		o := <-got
		if o.err != nil || o.r.PID != pid || n(o.r) != 2 || o.resp.GetSession() != snakepitv1.SessionOutcome_SESSION_OUTCOME_BOUND {
			t.Fatalf("strict_queue = pid %d n=%d %s %v; want its worker (pid %d), n=2, BOUND", o.r.PID, n(o.r), o.resp.GetSession(), o.err, pid)
		}
	})
	t.Run("strict_queue within the deadline", func(t *testing.T) {
		tn := startNode(t, testConfig(t, toolsPool(t, func(pc *PoolConfig) { pc.Size = 2 })))
		_, release := busySession(t, tn, "s")
		defer release()
		ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
		defer cancel()
		_, err := tn.sp.Execute(ctx, &snakepitv1.ExecuteRequest{Pool: "test", Tool: "tally", SessionId: "s", Affinity: snakepitv1.Affinity_AFFINITY_STRICT_QUEUE})
		if status.Code(err) != codes.DeadlineExceeded {
			t.Fatalf("strict_queue past its deadline = %v, want DEADLINE_EXCEEDED", err)
		}
	})
}

func TestCloseSessionAndIdleExpiry(t *testing.T) {
	cfg := testConfig(t, toolsPool(t, func(pc *PoolConfig) { pc.SessionIdleTimeout = 100 * time.Millisecond }))
	cfg.MonitorInterval = 10 * time.Millisecond
	tn := startNode(t, cfg)
	ctx := context.Background()
	tally(t, tn, "x", 0)
	tally(t, tn, "x", 0)
	resp, err := tn.sp.CloseSession(ctx, &snakepitv1.CloseSessionRequest{SessionId: "x", Pool: "test"})
	if err != nil || !resp.GetClosed() {
		t.Fatalf("CloseSession = %v, %v", resp, err)
	}
	if r, out, _ := tally(t, tn, "x", 0); n(r) != 1 || out.GetSession() != snakepitv1.SessionOutcome_SESSION_OUTCOME_NEW {
		t.Fatalf("after CloseSession: n=%d %s, want a new session with fresh state", n(r), out.GetSession())
	}
	if resp, err := tn.sp.CloseSession(ctx, &snakepitv1.CloseSessionRequest{SessionId: "never", Pool: "test"}); err != nil || resp.GetClosed() {
		t.Fatalf("CloseSession(unknown) = %v, %v; want closed=false", resp, err)
	}
	// Idle expiry drops it (and its state) without any call.
	deadline := time.Now().Add(20 * time.Second)
	for {
		list, err := tn.sp.ListSessions(ctx, &snakepitv1.ListSessionsRequest{})
		if err != nil {
			t.Fatal(err)
		}
		if len(list.GetSessions()) == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("session not expired: %v", list)
		}
		time.Sleep(10 * time.Millisecond)
	}
	if r, out, _ := tally(t, tn, "x", 0); n(r) != 1 || out.GetSession() != snakepitv1.SessionOutcome_SESSION_OUTCOME_NEW {
		t.Fatalf("after expiry: n=%d %s, want a new session", n(r), out.GetSession())
	}
}

func TestSessionLimits(t *testing.T) {
	cfg := testConfig(t, toolsPool(t, func(pc *PoolConfig) { pc.Size = 2; pc.MaxSessionsPerWorker = 1 }))
	tn := startNode(t, cfg)
	for _, id := range []string{"a", "b"} {
		if _, _, err := tally(t, tn, id, 0); err != nil {
			t.Fatal(err)
		}
	}
	_, _, err := tally(t, tn, "c", 0)
	if status.Code(err) != codes.ResourceExhausted || errorInfo(err).GetMetadata()["limit"] != "max_sessions_per_worker" {
		t.Fatalf("third session on 2 workers x 1 = %v, want RESOURCE_EXHAUSTED naming max_sessions_per_worker", err)
	}
	cfg2 := testConfig(t, toolsPool(t, nil))
	cfg2.MaxSessions = 1
	tn2 := startNode(t, cfg2)
	tally(t, tn2, "a", 0)
	_, _, err = tally(t, tn2, "b", 0)
	if status.Code(err) != codes.ResourceExhausted || errorInfo(err).GetMetadata()["limit"] != "max_sessions" {
		t.Fatalf("second session with max_sessions 1 = %v, want RESOURCE_EXHAUSTED naming max_sessions", err)
	}
	// Existing sessions keep working.
	if r, _, err := tally(t, tn2, "a", 0); err != nil || n(r) != 2 {
		t.Fatalf("existing session = %d, %v", n(r), err)
	}
}

func readStream(t testing.TB, st grpc.ServerStreamingClient[snakepitv1.ExecuteStreamResponse], each func(*snakepitv1.Chunk)) (*snakepitv1.ExecuteResponse, error) {
	t.Helper()
	for {
		m, err := st.Recv()
		if err != nil {
			if errors.Is(err, io.EOF) {
				return nil, errors.New("stream ended without a done message")
			}
			return nil, err
		}
		if c := m.GetChunk(); c != nil {
			each(c)
			continue
		}
		return m.GetDone(), nil
	}
}

func TestStreamChunksThenOutcome(t *testing.T) {
	tn := startNode(t, testConfig(t))
	st, err := tn.sp.ExecuteStream(context.Background(), &snakepitv1.ExecuteRequest{Pool: "test", Tool: "count_stream", Args: []byte(`{"n": 500}`)})
	if err != nil {
		t.Fatal(err)
	}
	var seq uint64
	done, err := readStream(t, st, func(c *snakepitv1.Chunk) {
		if c.GetSeq() != seq || string(c.GetData()) != fmt.Sprintf(`{"i":%d,"pad":""}`, seq) {
			t.Fatalf("chunk %d = %d %s", seq, c.GetSeq(), c.GetData())
		}
		seq++
	})
	if err != nil || seq != 500 || string(done.GetResult()) != "500" || done.GetRanOn().GetWorkerGeneration() == 0 {
		t.Fatalf("stream: %d chunks, done %v, %v", seq, done, err)
	}
}

func TestStreamErrorArrivesAfterChunks(t *testing.T) {
	tn := startNode(t, testConfig(t))
	st, err := tn.sp.ExecuteStream(context.Background(), &snakepitv1.ExecuteRequest{Pool: "test", Tool: "fail_stream", Args: []byte(`{"n": 7}`)})
	if err != nil {
		t.Fatal(err)
	}
	count := 0
	_, err = readStream(t, st, func(*snakepitv1.Chunk) { count++ })
	if count != 7 || status.Code(err) != codes.Unknown || errorInfo(err).GetMetadata()["type"] != "RuntimeError" {
		t.Fatalf("got %d chunks then %v; want 7 chunks then UNKNOWN RuntimeError", count, err)
	}
}

func TestStreamToolOverUnaryIsRefused(t *testing.T) {
	tn := startNode(t, testConfig(t))
	_, err := tn.exec(t, &snakepitv1.ExecuteRequest{Tool: "count_stream", Args: []byte(`{"n": 3}`)})
	if status.Code(err) != codes.InvalidArgument || !strings.Contains(status.Convert(err).Message(), "ExecuteStream") {
		t.Fatalf("Execute(stream tool) = %v, want INVALID_ARGUMENT pointing at ExecuteStream", err)
	}
	// A plain tool over ExecuteStream: no chunks, the result in done.
	st, err := tn.sp.ExecuteStream(context.Background(), &snakepitv1.ExecuteRequest{Pool: "test", Tool: "add", Args: []byte(`{"a":1,"b":2}`)})
	if err != nil {
		t.Fatal(err)
	}
	done, err := readStream(t, st, func(*snakepitv1.Chunk) { t.Error("unexpected chunk") })
	if err != nil || string(done.GetResult()) != "3" {
		t.Fatalf("ExecuteStream(add) = %v, %v", done, err)
	}
}

func TestCancelledStreamStopsGenerator(t *testing.T) {
	tn := startNode(t, testConfig(t))
	marker := filepath.Join(t.TempDir(), "m")
	ctx, cancel := context.WithCancel(context.Background())
	st, err := tn.sp.ExecuteStream(ctx, &snakepitv1.ExecuteRequest{Pool: "test", Tool: "endless_stream", Args: []byte(fmt.Sprintf(`{"marker": %q}`, marker))})
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 100; i++ {
		if _, err := st.Recv(); err != nil {
			t.Fatal(err)
		}
	}
	cancel()
	waitFile(t, marker, "Cancelled")
	waitStatus(t, tn, func(p *snakepitv1.PoolStatus) bool { return p.GetBusy() == 0 })
}

// TestSlowStreamClientBoundsTheGenerator reads a 100,000-chunk stream slowly
// through a connection with a fixed 64 KiB flow-control window: the
// generator may never run further ahead of the reader than what that
// window, gRPC's buffers and the pool's stream_window hold (well under
// 5,000 chunks of 100 bytes). Without backpressure it would finish all
// 100,000 while the reader pauses.
func TestSlowStreamClientBoundsTheGenerator(t *testing.T) {
	if testing.Short() {
		t.Skip("100,000 chunks")
	}
	tn := startNode(t, testConfig(t))
	c, err := client.Dial(tn.addr, grpc.WithInitialWindowSize(64<<10), grpc.WithInitialConnWindowSize(64<<10))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	const total, size, maxLead = 100000, 100, 5000
	progress := filepath.Join(t.TempDir(), "progress")
	st, err := c.Snakepit.ExecuteStream(context.Background(), &snakepitv1.ExecuteRequest{Pool: "test", Tool: "progress_stream",
		Args: []byte(fmt.Sprintf(`{"n": %d, "size": %d, "progress": %q}`, total, size, progress))})
	if err != nil {
		t.Fatal(err)
	}
	var got, worst int
	done, err := readStream(t, st, func(ch *snakepitv1.Chunk) {
		got++
		if got%10000 != 0 {
			return
		}
		// The reader stalls here. Wait until the producer has stopped
		// moving (it is blocked on credit), then see how far ahead it is.
		last := -1
		for {
			time.Sleep(20 * time.Millisecond)
			b, _ := os.ReadFile(progress)
			var produced int
			fmt.Sscan(string(b), &produced)
			if produced == last {
				break
			}
			last = produced
		}
		worst = max(worst, last-got)
	})
	if err != nil || got != total || string(done.GetResult()) != fmt.Sprint(total) {
		t.Fatalf("slow stream: %d chunks, %v, %v", got, done, err)
	}
	t.Logf("generator ran at most %d chunks ahead of a stalled reader", worst)
	if worst > maxLead {
		t.Fatalf("the generator ran %d chunks ahead of a stalled reader, want at most %d: no backpressure", worst, maxLead)
	}
}

func TestNewSessionRatePerClient(t *testing.T) {
	cfg := testConfig(t)
	cfg.NewSessionsPerSecond = 0.001 // no refill within the test
	cfg.NewSessionsBurst = 2
	tn := startNode(t, cfg)
	for _, id := range []string{"a", "b"} {
		if _, _, err := tally(t, tn, id, 0); err != nil {
			t.Fatal(err)
		}
	}
	_, _, err := tally(t, tn, "c", 0)
	if status.Code(err) != codes.ResourceExhausted || errorInfo(err).GetReason() != call.ReasonSessionRate || errorInfo(err).GetMetadata()["client"] != "127.0.0.1" {
		t.Fatalf("third new session = %v (%v), want RESOURCE_EXHAUSTED SESSION_RATE for 127.0.0.1", err, errorInfo(err))
	}
	// Existing sessions and sessionless calls are not limited.
	if r, _, err := tally(t, tn, "a", 0); err != nil || n(r) != 2 {
		t.Fatalf("existing session = %d, %v", n(r), err)
	}
	if _, err := tn.exec(t, &snakepitv1.ExecuteRequest{Tool: "noop"}); err != nil {
		t.Fatal(err)
	}
}
