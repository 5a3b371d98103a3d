package cluster

import (
	"sync"
	"time"
)

// retryBudgetWindow is the span of recent requests a retry budget counts.
const retryBudgetWindow = 10 * time.Second

// retryBudget bounds the retries a router makes to a fraction of its recent
// requests, so a sick cluster is not buried under retries: a retry is
// allowed while the retries of the last 10 s stay below ratio × the
// requests of the same span, or below min (so a quiet node can still
// retry). Every router bounds its own retries, so the cluster's retries
// stay within the same fraction of the cluster's requests. It keeps one
// bucket per second; the clock is passed in. Safe for concurrent use.
type retryBudget struct {
	ratio float64
	min   int

	mu      sync.Mutex
	buckets [10]budgetBucket
}

type budgetBucket struct {
	sec               int64
	requests, retries int
}

func newRetryBudget(ratio float64, min int) *retryBudget {
	return &retryBudget{ratio: ratio, min: min}
}

func (b *retryBudget) bucket(now time.Time) *budgetBucket {
	sec := now.Unix()
	bk := &b.buckets[sec%int64(len(b.buckets))]
	if bk.sec != sec {
		*bk = budgetBucket{sec: sec}
	}
	return bk
}

// request counts one request (a first try).
func (b *retryBudget) request(now time.Time) {
	b.mu.Lock()
	b.bucket(now).requests++
	b.mu.Unlock()
}

// allowRetry reports whether one more retry fits the budget, and counts it
// when it does.
func (b *retryBudget) allowRetry(now time.Time) bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	cur := b.bucket(now)
	oldest := now.Unix() - int64(len(b.buckets)) + 1
	var requests, retries int
	for i := range b.buckets {
		if bk := &b.buckets[i]; bk.sec >= oldest {
			requests += bk.requests
			retries += bk.retries
		}
	}
	if retries >= b.min && float64(retries) >= b.ratio*float64(requests) {
		return false
	}
	cur.retries++
	return true
}
