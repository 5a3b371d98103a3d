package agent

import (
	"context"
	"errors"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

func TestDedupRunsOncePerID(t *testing.T) {
	d := newDedup(time.Minute, 100)
	var runs atomic.Int32
	release := make(chan struct{})
	fn := func() (*Result, error) {
		runs.Add(1)
		<-release
		return &Result{Payload: []byte("1")}, nil
	}
	var wg sync.WaitGroup
	results := make([]*Result, 5)
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
	refuse := func() (*Result, error) { runs++; return nil, &QueueFullError{Pool: "p"} }
	fail := func() (*Result, error) { runs++; return nil, errors.New("tool failed") }
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
	ok := func() (*Result, error) { return &Result{}, nil }
	for _, id := range []string{"a", "b", "c", "d", "e"} {
		_, _ = d.do(context.Background(), id, ok)
	}
	if n := d.len(); n != 3 {
		t.Fatalf("%d ids remembered with dedup_max_entries 3, want 3", n)
	}
	d = newDedup(0, 100) // every entry is past its window at once
	runs := 0
	count := func() (*Result, error) { runs++; return &Result{}, nil }
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

func TestParseLoads(t *testing.T) {
	m := parseLoads(formatLoads([]string{"a", "b"}, []float64{0.5, 2}))
	if m["a"] != 0.5 || m["b"] != 2 {
		t.Fatalf("round trip = %v", m)
	}
	if m := parseLoads("x=,=1,y=-1,z=NaN,ok=1"); len(m) != 1 || m["ok"] != 1 {
		t.Fatalf("parseLoads of bad entries = %v, want only ok=1", m)
	}
}

func TestRouterConfigErrorsNameTheKey(t *testing.T) {
	cfg := testConfig(t)
	cfg.Router.RetryBudgetRatio = 2
	cfg.Router.BreakGlassLease = -time.Second
	err := cfg.Validate()
	for _, want := range []string{"router.retry_budget_ratio", "router.break_glass_lease"} {
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("Validate() = %v, want it to name %s", err, want)
		}
	}
}
