package discovery

import (
	"bytes"
	"context"
	"errors"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/rs/zerolog"
	"go.uber.org/goleak"

	"github.com/snakepit/snakepit/internal/consultest"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// syncBuffer is a log sink tests can read while the code under test writes.
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

func testLogger(t testing.TB) (zerolog.Logger, *syncBuffer) {
	buf := &syncBuffer{}
	return zerolog.New(zerolog.MultiLevelWriter(buf, zerolog.NewTestWriter(t))).Level(zerolog.DebugLevel), buf
}

func testLoggerNop() zerolog.Logger { return zerolog.Nop() }

func testNode(id string, port int) Node {
	return Node{
		ID:          NodeID(id),
		Addr:        "127.0.0.1:" + strconv.Itoa(port),
		Version:     "1.2.3",
		ProtoMin:    1,
		ProtoMax:    2,
		Pools:       map[string]PoolOffer{"default": {Slots: 4}, "gpu": {Slots: 2}},
		GPUs:        GPUSummary{Count: 8, Models: []string{"NVIDIA A100-SXM4-40GB"}, MemoryBytes: 8 * 40 << 30},
		Labels:      map[string]string{"zone": "a"},
		ToolsDigest: "sha256:0123abcd",
	}
}

func consulConfig(a *consultest.Agent) Config {
	cfg := DefaultConfig()
	cfg.Kind = KindConsul
	cfg.Consul.Address = a.Addr
	cfg.Consul.Token = a.Token
	cfg.Consul.TTL = 3 * time.Second
	cfg.Consul.UpdateInterval = 0
	cfg.Consul.WatchWait = 5 * time.Second
	return cfg
}

// runBG runs fn(ctx) in a goroutine; the returned stop cancels it and waits,
// failing the test if fn returned an error. It also runs at cleanup.
func runBG(t *testing.T, fn func(context.Context) error) (stop func()) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- fn(ctx) }()
	var once sync.Once
	stop = func() {
		once.Do(func() {
			cancel()
			if err := <-done; err != nil {
				t.Errorf("Run returned %v, want nil on cancellation", err)
			}
		})
	}
	t.Cleanup(stop)
	return stop
}

func startDirectory(t *testing.T, cfg Config) *ConsulDirectory {
	t.Helper()
	log, _ := testLogger(t)
	d, err := NewConsulDirectory(cfg, log)
	if err != nil {
		t.Fatalf("NewConsulDirectory: %v", err)
	}
	runBG(t, d.Run)
	return d
}

// waitSnapshot waits (on Changed, never by polling) until cond holds for the
// directory's snapshot, and returns that snapshot.
func waitSnapshot(t *testing.T, d Directory, timeout time.Duration, what string, cond func(*Snapshot) bool) *Snapshot {
	t.Helper()
	deadline := time.NewTimer(timeout)
	defer deadline.Stop()
	for {
		s := d.Current()
		if cond(s) {
			return s
		}
		select {
		case <-s.Changed():
		case <-deadline.C:
			s := d.Current()
			t.Fatalf("after %v: %s never held; last snapshot seq=%d stale=%v err=%v peers=%v", timeout, what, s.Seq(), s.Stale(), s.Err(), peerIDs(s))
		}
	}
}

func peerIDs(s *Snapshot) []NodeID {
	var ids []NodeID
	for _, p := range s.Peers() {
		ids = append(ids, p.ID)
	}
	return ids
}

func has(id NodeID) func(*Snapshot) bool {
	return func(s *Snapshot) bool { _, ok := s.Lookup(id); return ok && !s.Stale() }
}

func hasNot(id NodeID) func(*Snapshot) bool {
	return func(s *Snapshot) bool { _, ok := s.Lookup(id); return !ok && s.Seq() > 0 && !s.Stale() }
}

// retry polls fn against an external process until it returns nil or the
// deadline passes.
func retry(t *testing.T, timeout time.Duration, what string, fn func() error) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		err := fn()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: still failing after %v: %v", what, timeout, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func wantErr(t *testing.T, err error, target error, substrs ...string) {
	t.Helper()
	if err == nil {
		t.Fatalf("got nil error, want %v", target)
	}
	if target != nil && !errors.Is(err, target) {
		t.Errorf("error %q does not wrap %v", err, target)
	}
	for _, s := range substrs {
		if !strings.Contains(err.Error(), s) {
			t.Errorf("error %q does not mention %q", err, s)
		}
	}
}
