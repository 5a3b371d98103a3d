package engine

import (
	"sync"
	"time"

	"golang.org/x/time/rate"
)

// clientLimiter holds a token bucket of new sessions per client address.
// Buckets unused for a while are dropped, so the map stays small.
type clientLimiter struct {
	rate  rate.Limit
	burst int
	mu    sync.Mutex
	m     map[string]*clientBucket
	swept time.Time
}

type clientBucket struct {
	lim  *rate.Limiter
	used time.Time
}

// clientIdle is how long a client's bucket is kept without use.
const clientIdle = 10 * time.Minute

func newClientLimiter(perSecond float64, burst int) *clientLimiter {
	if perSecond <= 0 {
		return nil
	}
	return &clientLimiter{rate: rate.Limit(perSecond), burst: max(burst, 1), m: map[string]*clientBucket{}}
}

// allow takes a token for client; it returns how long to wait when none is
// left. A nil limiter allows everything.
func (l *clientLimiter) allow(client string, now time.Time) (bool, time.Duration) {
	if l == nil {
		return true, 0
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if now.Sub(l.swept) > clientIdle {
		for k, b := range l.m {
			if now.Sub(b.used) > clientIdle {
				delete(l.m, k)
			}
		}
		l.swept = now
	}
	b := l.m[client]
	if b == nil {
		b = &clientBucket{lim: rate.NewLimiter(l.rate, l.burst)}
		l.m[client] = b
	}
	b.used = now
	r := b.lim.ReserveN(now, 1)
	if d := r.DelayFrom(now); d > 0 {
		r.CancelAt(now)
		return false, d
	}
	return true, 0
}
