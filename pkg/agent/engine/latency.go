package engine

import (
	"math/bits"
	"sync/atomic"
	"time"
)

// histogram records durations in log-linear buckets (four per power of
// two, so a reported percentile is within 19% of the truth) without locks.
type histogram struct {
	buckets [4 * 64]atomic.Uint64
	max     atomic.Int64
}

func bucketOf(us uint64) int {
	if us < 4 {
		return int(us)
	}
	e := bits.Len64(us) - 1
	m := (us >> (e - 2)) & 3
	return e*4 + int(m)
}

// upper returns the largest value in bucket i, in microseconds.
func upper(i int) uint64 {
	if i < 4 {
		return uint64(i)
	}
	e := i / 4
	m := uint64(i % 4)
	return ((4+m+1)<<(e-2) - 1)
}

func (h *histogram) record(d time.Duration) {
	us := uint64(max(d.Microseconds(), 0))
	h.buckets[bucketOf(us)].Add(1)
	for {
		cur := h.max.Load()
		if int64(d) <= cur || h.max.CompareAndSwap(cur, int64(d)) {
			return
		}
	}
}

// quantiles returns the durations at the given quantiles (0..1), reported
// as the upper bound of their bucket, and the maximum.
func (h *histogram) quantiles(qs ...float64) ([]time.Duration, time.Duration) {
	var counts [len(histogram{}.buckets)]uint64
	var total uint64
	for i := range h.buckets {
		counts[i] = h.buckets[i].Load()
		total += counts[i]
	}
	out := make([]time.Duration, len(qs))
	if total == 0 {
		return out, 0
	}
	mx := time.Duration(h.max.Load())
	for j, q := range qs {
		rank := uint64(q*float64(total) + 0.5)
		rank = max(rank, 1)
		var seen uint64
		for i, c := range counts {
			seen += c
			if seen >= rank {
				out[j] = min(time.Duration(upper(i))*time.Microsecond, mx)
				break
			}
		}
	}
	return out, mx
}
