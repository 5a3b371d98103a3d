package cluster

import (
	"github.com/snakepit/snakepit/pkg/agent/call"

	"context"
	"errors"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

func TestDedupRunsOncePerID(t *testing.T) {
	d := newDedup(time.Minute, 100)
	var runs atomic.Int32
	release := make(chan struct{})
	fn := func() (*call.Result, error) {
		runs.Add(1)
		<-release
		return &call.Result{Payload: []byte("1")}, nil
	}
	var wg sync.WaitGroup
	results := make([]*call.Result, 5)
	for i := range results {
		wg.Go(func() {
			r, err := d.do(context.Background(), "id", fn)
			if err != nil {
				t.Errorf("do: %v", err)
			}
			results[i] = r
		})
	}
	waitCond(t, 5*time.Second, "first run", func() bool { return runs.Load() == 1 })
	close(release)
	wg.Wait()
	if n := runs.Load(); n != 1 {
		t.Fatalf("fn ran %d times for one id, want 1", n)
	}
	for i, r := range results {
		if r == nil || string(r.Payload) != "1" {
			t.Fatalf("caller %d got %v, want the first outcome", i, r)
		}
	}
}

func TestDedupForgetsNotExecuted(t *testing.T) {
	d := newDedup(time.Minute, 100)
	runs := 0
	refuse := func() (*call.Result, error) { runs++; return nil, &call.QueueFullError{Pool: "p"} }
	fail := func() (*call.Result, error) { runs++; return nil, errors.New("tool failed") }
	for range 2 {
		_, _ = d.do(context.Background(), "refused", refuse)
	}
	if runs != 2 {
		t.Fatalf("a refused call ran %d times over 2 tries, want 2 (refusals are not remembered)", runs)
	}
	runs = 0
	for range 2 {
		if _, err := d.do(context.Background(), "failed", fail); err == nil {
			t.Fatal("want the first error again")
		}
	}
	if runs != 1 {
		t.Fatalf("a failed call ran %d times over 2 tries, want 1 (its outcome is remembered)", runs)
	}
}

func TestDedupBounds(t *testing.T) {
	d := newDedup(time.Minute, 3)
	ok := func() (*call.Result, error) { return &call.Result{}, nil }
	for _, id := range []string{"a", "b", "c", "d", "e"} {
		_, _ = d.do(context.Background(), id, ok)
	}
	if n := d.len(); n != 3 {
		t.Fatalf("%d ids remembered with dedup_max_entries 3, want 3", n)
	}
	d = newDedup(0, 100) // every entry is past its window at once
	runs := 0
	count := func() (*call.Result, error) { runs++; return &call.Result{}, nil }
	_, _ = d.do(context.Background(), "x", count)
	_, _ = d.do(context.Background(), "x", count)
	if runs != 2 {
		t.Fatalf("ran %d times with the window past, want 2", runs)
	}
}

func TestRetryBudget(t *testing.T) {
	b := newRetryBudget(0.1, 2)
	now := time.Unix(1000, 0)
	for range 100 {
		b.request(now)
	}
	allowed := 0
	for range 50 {
		if b.allowRetry(now) {
			allowed++
		}
	}
	if allowed != 10 {
		t.Fatalf("%d retries allowed over 100 requests at ratio 0.1, want 10", allowed)
	}
	// Ten seconds later the window has moved on: only the minimum.
	later := now.Add(10 * time.Second)
	allowed = 0
	for range 10 {
		if b.allowRetry(later) {
			allowed++
		}
	}
	if allowed != 2 {
		t.Fatalf("%d retries allowed with no recent requests, want the minimum 2", allowed)
	}
}

func waitCond(t *testing.T, d time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for %s", d, what)
		}
		time.Sleep(time.Millisecond)
	}
}
