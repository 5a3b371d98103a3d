package discovery

import (
	"context"
	"flag"
	"fmt"
	"testing"
	"time"

	"github.com/snakepit/snakepit/internal/consultest"
)

var benchWindow = flag.Duration("discovery.window", 2*time.Minute,
	"BenchmarkConsulSteadyStateRequests: how long to count requests")

// BenchmarkConsulTTLExpiry measures, for several TTLs, the time from a node's
// last TTL refresh to its removal from a watcher's snapshot when the node
// stops refreshing without deregistering (a killed daemon).
//
//	go test -run '^$' -bench ConsulTTLExpiry ./pkg/discovery/
func BenchmarkConsulTTLExpiry(b *testing.B) {
	a := consultest.Start(b)
	for _, ttl := range []time.Duration{time.Second, 2 * time.Second, 5 * time.Second, 10 * time.Second} {
		b.Run("ttl="+ttl.String(), func(b *testing.B) {
			cfg := consulConfig(a)
			cfg.Consul.TTL = ttl
			d, err := NewConsulDirectory(cfg, testLoggerNop())
			if err != nil {
				b.Fatal(err)
			}
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			dirDone := make(chan struct{})
			go func() { defer close(dirDone); _ = d.Run(ctx) }()
			defer func() { cancel(); <-dirDone }()

			var total time.Duration
			for i := range b.N {
				id := NodeID(fmt.Sprintf("ttl-%v-%d", ttl, i))
				r, err := NewConsulRegistrar(cfg, testLoggerNop())
				if err != nil {
					b.Fatal(err)
				}
				if err := r.Register(ctx, testNode(string(id), 7000+i)); err != nil {
					b.Fatal(err)
				}
				r.SetHealthy(true)
				rctx, rcancel := context.WithCancel(ctx)
				runDone := make(chan struct{})
				go func() { defer close(runDone); _ = r.Run(rctx) }()
				benchWait(b, d, 5*time.Second, func(s *Snapshot) bool { _, ok := s.Lookup(id); return ok })
				rcancel() // killed: no refresh, no deregistration
				<-runDone
				r.mu.Lock()
				last := r.st.lastRefresh
				r.mu.Unlock()
				benchWait(b, d, ttl+30*time.Second, func(s *Snapshot) bool { _, ok := s.Lookup(id); return !ok })
				total += time.Since(last)
			}
			avg := total / time.Duration(b.N)
			b.ReportMetric(float64(avg.Milliseconds()), "ms-to-removal")
			b.ReportMetric(float64(avg)/float64(ttl), "x-ttl")
		})
	}
}

// BenchmarkConsulSteadyStateRequests counts the requests one node sends to
// Consul per minute in steady state with the default settings: a healthy
// registration and a watcher, nothing changing. The window is set with
// -discovery.window (default 2m).
//
//	go test -run '^$' -bench ConsulSteadyState -benchtime 1x ./pkg/discovery/
func BenchmarkConsulSteadyStateRequests(b *testing.B) {
	a := consultest.Start(b)
	cfg := DefaultConfig()
	cfg.Kind = KindConsul
	cfg.Consul.Address = a.Addr
	r, err := NewConsulRegistrar(cfg, testLoggerNop())
	if err != nil {
		b.Fatal(err)
	}
	d, err := NewConsulDirectory(cfg, testLoggerNop())
	if err != nil {
		b.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{}, 2)
	go func() { _ = r.Run(ctx); done <- struct{}{} }()
	go func() { _ = d.Run(ctx); done <- struct{}{} }()
	defer func() { cancel(); <-done; <-done }()
	if err := r.Register(ctx, testNode("steady", 7000)); err != nil {
		b.Fatal(err)
	}
	r.SetHealthy(true)
	benchWait(b, d, 5*time.Second, func(s *Snapshot) bool { _, ok := s.Lookup("steady"); return ok })

	for range b.N {
		r0, d0 := r.Requests(), d.Requests()
		time.Sleep(*benchWindow) // the measurement window itself
		perMin := func(n uint64) float64 { return float64(n) / benchWindow.Minutes() }
		b.ReportMetric(perMin(r.Requests()-r0), "registrar-req/min")
		b.ReportMetric(perMin(d.Requests()-d0), "directory-req/min")
		b.ReportMetric(perMin(r.Requests()-r0+d.Requests()-d0), "node-req/min")
	}
}

func benchWait(b *testing.B, d Directory, timeout time.Duration, cond func(*Snapshot) bool) {
	b.Helper()
	deadline := time.NewTimer(timeout)
	defer deadline.Stop()
	for {
		s := d.Current()
		if cond(s) {
			return
		}
		select {
		case <-s.Changed():
		case <-deadline.C:
			b.Fatalf("condition not met within %v", timeout)
		}
	}
}
