package worker

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/rs/zerolog"
	"go.uber.org/goleak"

	"github.com/snakepit/snakepit/pkg/pyruntime"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

func python(t testing.TB) string {
	t.Helper()
	p, err := exec.LookPath("python3")
	if err != nil {
		t.Fatalf("python3 is required: %v", err)
	}
	return p
}

type testWorker struct {
	*Worker
	released atomic.Int64
}

func startWorker(t testing.TB, adapter string, capacity int) *testWorker {
	t.Helper()
	rt, err := pyruntime.Install(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	tw := &testWorker{}
	w, err := Start(context.Background(), Spec{
		Pool: "test", ID: 1, Generation: 1,
		Python: python(t), Adapter: adapter, Capacity: capacity,
		Env:          []string{"PYTHONPATH=" + rt, "PYTHONUNBUFFERED=1", "PATH=/usr/bin:/bin"},
		MaxFrame:     1 << 20,
		StartTimeout: 20 * time.Second,
		StderrTail:   20,
		OnRelease:    func(*Worker) { tw.released.Add(1) },
		Logger:       zerolog.New(zerolog.NewTestWriter(t)),
	})
	if err != nil {
		t.Fatalf("Start(%s): %v", adapter, err)
	}
	tw.Worker = w
	t.Cleanup(func() { w.Stop(2 * time.Second) })
	return tw
}

func misbehave(t testing.TB, capacity int) *testWorker {
	p, err := filepath.Abs("testdata/misbehave.py")
	if err != nil {
		t.Fatal(err)
	}
	return startWorker(t, p, capacity)
}

func call(t *testing.T, w *testWorker, tool, args string) ([]byte, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	return w.Call(ctx, &Call{Tool: tool, Args: []byte(args), RequestID: "r1"})
}

func TestHandshakeListsTools(t *testing.T) {
	w := startWorker(t, pyruntime.ExampleAdapter, 1)
	h := w.Hello()
	if h.Protocol != ProtocolVersion || h.PID != w.PID() {
		t.Fatalf("hello = %+v, want protocol %d pid %d", h, ProtocolVersion, w.PID())
	}
	byName := map[string]Tool{}
	for _, tl := range h.Tools {
		byName[tl.Name] = tl
	}
	add, ok := byName["add"]
	if !ok {
		t.Fatalf("tools = %v, want add among them", h.Tools)
	}
	want := []Param{{Name: "a", Type: "float", Required: true}, {Name: "b", Type: "float", Required: true}}
	if fmt.Sprint(add.Parameters) != fmt.Sprint(want) || add.Doc != "Add two numbers." {
		t.Errorf("add = %+v, want params %v and its docstring", add, want)
	}
	if sl := byName["sleep"]; len(sl.Parameters) != 1 || sl.Parameters[0].Name != "seconds" {
		t.Errorf("sleep params = %+v, want only seconds (ctx is not a parameter)", sl.Parameters)
	}
	if f := byName["fail"]; len(f.Parameters) != 1 || f.Parameters[0].Required || f.Parameters[0].DefaultJSON != `"failed on purpose"` {
		t.Errorf("fail params = %+v, want an optional message with its default", f.Parameters)
	}
}

func TestCallResults(t *testing.T) {
	w := misbehave(t, 1)
	tests := []struct {
		name, tool, args string
		want             string
		kind             string // ToolError kind, when an error is wanted
		contains         string
	}{
		{name: "add", tool: "add", args: `{"a":2,"b":40}`, want: "42"},
		{name: "empty args", tool: "noop", args: ``, want: "null"},
		{name: "printing does not disturb the protocol", tool: "chatty", args: `{"text":"hi"}`, want: `"hi"`},
		{name: "exception", tool: "boom", args: `{"message":"kaput"}`, kind: KindException, contains: "kaput"},
		{name: "unencodable result", tool: "unencodable", args: `{}`, kind: KindEncode, contains: "object"},
		{name: "unknown tool", tool: "nope", args: `{}`, kind: KindUnknownTool, contains: "nope"},
		{name: "missing argument", tool: "add", args: `{"a":1}`, kind: KindInvalidArgs, contains: "b"},
		{name: "extra argument", tool: "add", args: `{"a":1,"b":2,"c":3}`, kind: KindInvalidArgs, contains: "c"},
		{name: "args not an object", tool: "add", args: `[1,2]`, kind: KindInvalidArgs, contains: "object"},
		{name: "args not json", tool: "add", args: `{"a":`, kind: KindInvalidArgs, contains: "JSON"},
		{name: "context", tool: "context", args: `{}`, want: `{"request_id":"r1","session_id":"","has_deadline":false,"correlation_id":""}`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := call(t, w, tt.tool, tt.args)
			if tt.kind == "" {
				if err != nil || string(got) != tt.want {
					t.Fatalf("Call(%s, %s) = %s, %v; want %s", tt.tool, tt.args, got, err, tt.want)
				}
				return
			}
			var te *ToolError
			if !errors.As(err, &te) || te.Kind != tt.kind || !strings.Contains(te.Error(), tt.contains) {
				t.Fatalf("Call(%s, %s) error = %v (%#v); want kind %s mentioning %q", tt.tool, tt.args, err, te, tt.kind, tt.contains)
			}
		})
	}
	// The worker survived all of it.
	if got, err := call(t, w, "add", `{"a":1,"b":1}`); err != nil || string(got) != "2" {
		t.Fatalf("after errors: add = %s, %v; want 2", got, err)
	}
	if got, want := w.released.Load(), int64(len(tests)+1); got != want {
		t.Errorf("released %d slots, want %d (one per call)", got, want)
	}
}

func TestExceptionCarriesTraceback(t *testing.T) {
	w := misbehave(t, 1)
	_, err := call(t, w, "boom", `{"message":"kaput"}`)
	var te *ToolError
	if !errors.As(err, &te) || te.Type != "RuntimeError" || !strings.Contains(te.Traceback, "misbehave.py") || !strings.Contains(te.Traceback, "raise RuntimeError") {
		t.Fatalf("error = %#v, want RuntimeError with a traceback into misbehave.py", te)
	}
}

func TestConcurrentCallsUseCapacity(t *testing.T) {
	w := misbehave(t, 4)
	// Four calls that meet at a barrier in Python only all return when
	// the worker runs them at once.
	var wg sync.WaitGroup
	errs := make(chan error, 4)
	for i := 0; i < 4; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			got, err := call(t, w, "barrier", `{"parties":4}`)
			if err == nil && string(got) != "true" {
				err = fmt.Errorf("barrier = %s", got)
			}
			errs <- err
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Error(err)
		}
	}
}

func TestManyInterleavedCalls(t *testing.T) {
	w := misbehave(t, 2)
	var wg sync.WaitGroup
	var bad atomic.Int64
	for g := 0; g < 8; g++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; i < 200; i++ {
				got, err := call(t, w, "add", fmt.Sprintf(`{"a":%d,"b":%d}`, g, i))
				if err != nil || string(got) != fmt.Sprint(g+i) {
					bad.Add(1)
				}
			}
		}()
	}
	wg.Wait()
	if bad.Load() != 0 {
		t.Fatalf("%d of 1600 multiplexed calls got a wrong answer", bad.Load())
	}
}

func TestCancelReachesPython(t *testing.T) {
	w := misbehave(t, 2)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		_, err := w.Call(ctx, &Call{Tool: "wait_cancel", Args: []byte(`{"limit":30}`)})
		done <- err
	}()
	// Cancel once the call is in Python: wait for it to be pending.
	waitFor(t, func() bool { w.mu.Lock(); defer w.mu.Unlock(); return len(w.pending) == 1 })
	cancel()
	if err := <-done; !errors.Is(err, context.Canceled) {
		t.Fatalf("Call after cancel = %v, want context.Canceled", err)
	}
	// The slot is released only when Python gives the call up, which it
	// does because ctx.cancelled became true.
	waitFor(t, func() bool { return w.released.Load() == 1 })
}

func TestDeadlineReachesPython(t *testing.T) {
	w := misbehave(t, 1)
	got, err := w.Call(context.Background(), &Call{Tool: "wait_cancel", Args: []byte(`{"limit":30}`), Timeout: 50 * time.Millisecond})
	if err != nil || string(got) != `"cancelled"` {
		t.Fatalf("Call with 50ms timeout = %s, %v; want the tool to see ctx.cancelled", got, err)
	}
}

func TestCrashFailsCallsInFlight(t *testing.T) {
	w := misbehave(t, 2)
	slow := make(chan error, 1)
	go func() {
		_, err := call(t, w, "nap", `{"seconds":30}`)
		slow <- err
	}()
	waitFor(t, func() bool { w.mu.Lock(); defer w.mu.Unlock(); return len(w.pending) == 1 })
	_, err := call(t, w, "crash", `{"code":7}`)
	for _, e := range []error{err, <-slow} {
		var ee *ExitError
		if !errors.As(e, &ee) || ee.Code != 7 || ee.Cause != CauseExitCode || ee.Generation != 1 {
			t.Fatalf("call on crashed worker: %v, want ExitError with status 7", e)
		}
		if !strings.Contains(e.Error(), "about to crash") {
			t.Errorf("error %q does not quote the last stderr line", e)
		}
	}
	<-w.Done()
	if got := w.released.Load(); got != 2 {
		t.Errorf("released %d, want 2", got)
	}
	// A call after death fails at once with the same cause.
	if _, err := call(t, w, "noop", `{}`); !errors.As(err, new(*ExitError)) {
		t.Fatalf("call after death = %v, want ExitError", err)
	}
}

func TestSegfaultIsClassified(t *testing.T) {
	w := misbehave(t, 1)
	_, err := call(t, w, "segfault", `{}`)
	var ee *ExitError
	if !errors.As(err, &ee) || ee.Signal != syscall.SIGSEGV || ee.Cause != CauseSegfault {
		t.Fatalf("segfault: %v, want ExitError SIGSEGV cause segfault", err)
	}
}

func TestSigkillIsClassified(t *testing.T) {
	w := misbehave(t, 1)
	done := make(chan error, 1)
	go func() { _, err := call(t, w, "nap", `{"seconds":30}`); done <- err }()
	waitFor(t, func() bool { w.mu.Lock(); defer w.mu.Unlock(); return len(w.pending) == 1 })
	if err := syscall.Kill(w.PID(), syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	var ee *ExitError
	if err := <-done; !errors.As(err, &ee) || ee.Cause != CauseKilled {
		t.Fatalf("after SIGKILL: %v, want ExitError cause killed", err)
	}
}

func TestBrokenAdapterReportsTraceback(t *testing.T) {
	rt, err := pyruntime.Install(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	p, _ := filepath.Abs("testdata/broken.py")
	_, err = Start(context.Background(), Spec{
		Pool: "test", Python: python(t), Adapter: p, Env: []string{"PYTHONPATH=" + rt},
		StartTimeout: 20 * time.Second, Logger: zerolog.New(zerolog.NewTestWriter(t)),
	})
	var se *StartError
	if !errors.As(err, &se) || se.Type != "ImportError" || !strings.Contains(se.Message, "broken on purpose") || !strings.Contains(se.Traceback, "broken.py") {
		t.Fatalf("Start(broken) = %v (%#v), want StartError with the ImportError and its traceback", err, se)
	}
}

func TestMissingInterpreter(t *testing.T) {
	_, err := Start(context.Background(), Spec{Pool: "test", Python: "/nonexistent/python3", Adapter: "x", StartTimeout: time.Second, Logger: zerolog.Nop()})
	var se *StartError
	if !errors.As(err, &se) || !strings.Contains(err.Error(), "/nonexistent/python3") {
		t.Fatalf("Start with a missing interpreter = %v, want a StartError naming it", err)
	}
}

func TestStopEndsProcess(t *testing.T) {
	w := misbehave(t, 1)
	w.Stop(2 * time.Second)
	var ee *ExitError
	if err := w.Err(); !errors.As(err, &ee) || ee.Cause != CauseStopped {
		t.Fatalf("after Stop, Err() = %v, want cause stopped", err)
	}
	if err := syscall.Kill(w.PID(), 0); !errors.Is(err, syscall.ESRCH) {
		t.Fatalf("process %d still exists after Stop (kill 0: %v)", w.PID(), err)
	}
}

// waitFor polls cond until it holds or a deadline passes.
func waitFor(t testing.TB, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatal("condition not met within 20s")
		}
		time.Sleep(2 * time.Millisecond)
	}
}

// syncBuffer is a bytes.Buffer safe for the relay goroutines and the test.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

func TestOutputCarriesCorrelationID(t *testing.T) {
	rt, err := pyruntime.Install(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	var logs syncBuffer
	p, _ := filepath.Abs("testdata/misbehave.py")
	w, err := Start(context.Background(), Spec{
		Pool: "test", Python: python(t), Adapter: p, Env: []string{"PYTHONPATH=" + rt},
		StartTimeout: 20 * time.Second, Logger: zerolog.New(&logs),
	})
	if err != nil {
		t.Fatal(err)
	}
	defer w.Stop(2 * time.Second)
	got, err := w.Call(context.Background(), &Call{Tool: "chatty", Args: []byte(`{"text":"hi"}`), CorrelationID: "corr-42"})
	if err != nil || string(got) != `"hi"` {
		t.Fatalf("chatty = %s, %v", got, err)
	}
	got, err = w.Call(context.Background(), &Call{Tool: "context", CorrelationID: "corr-43"})
	if err != nil || !strings.Contains(string(got), `"correlation_id":"corr-43"`) {
		t.Fatalf("ctx.correlation_id: %s, %v", got, err)
	}
	waitFor(t, func() bool { return strings.Count(logs.String(), `"correlation_id":"corr-42"`) == 2 })
	for _, l := range strings.Split(logs.String(), "\n") {
		if strings.Contains(l, "chatty") && (!strings.Contains(l, `"correlation_id":"corr-42"`) || strings.Contains(l, "\\u001e")) {
			t.Errorf("log line %s: want the correlation id as a field and no marker in the text", l)
		}
	}
}
