package agent

import (
	"errors"
	"net"
	"net/http"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"google.golang.org/grpc/status"
)

// metrics are the node's Prometheus metrics. Counters and histograms are
// updated on the call path; gauges are read from the pools when scraped.
// docs/metrics.md lists them.
type metrics struct {
	reg       *prometheus.Registry
	calls     *prometheus.CounterVec
	queueWait *prometheus.HistogramVec
	runTime   *prometheus.HistogramVec
	total     *prometheus.HistogramVec
	// Counters other parts of the node add to (the router).
	forwards  *prometheus.CounterVec
	retries   *prometheus.CounterVec
	ejections *prometheus.CounterVec
}

// latencyBuckets span 50 us to 60 s.
var latencyBuckets = prometheus.ExponentialBucketsRange(50e-6, 60, 22)

func newMetrics(n *Node) *metrics {
	m := &metrics{
		reg: prometheus.NewRegistry(),
		calls: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "snakepit", Name: "calls_total",
			Help: "Calls run by this node, by pool and outcome (the gRPC status code, lower case: ok, unknown, resource_exhausted, ...).",
		}, []string{"pool", "outcome"}),
		queueWait: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Namespace: "snakepit", Name: "queue_wait_seconds", Buckets: latencyBuckets,
			Help: "Time calls waited for a worker.",
		}, []string{"pool"}),
		runTime: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Namespace: "snakepit", Name: "run_seconds", Buckets: latencyBuckets,
			Help: "Time from handing a call to a worker to its result.",
		}, []string{"pool"}),
		total: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Namespace: "snakepit", Name: "call_seconds", Buckets: latencyBuckets,
			Help: "Time calls spent in this node, end to end, whatever their outcome.",
		}, []string{"pool"}),
		forwards: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "snakepit", Name: "forwards_total",
			Help: "Calls this node forwarded to a peer, by peer and outcome.",
		}, []string{"peer", "outcome"}),
		retries: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "snakepit", Name: "retries_total",
			Help: "Calls retried on another worker or node, by reason.",
		}, []string{"reason"}),
		ejections: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "snakepit", Name: "peer_ejections_total",
			Help: "Times a peer was ejected from this node's routing by its circuit breaker.",
		}, []string{"peer"}),
	}
	m.reg.MustRegister(m.calls, m.queueWait, m.runTime, m.total, m.forwards, m.retries, m.ejections,
		&poolCollector{n: n},
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return m
}

// observe records one finished call of a pool.
func (m *metrics) observe(pool string, res *Result, err error, total time.Duration) {
	outcome := "ok"
	if err != nil {
		outcome = strings.ToLower(codeName(err))
	}
	m.calls.WithLabelValues(pool, outcome).Inc()
	m.total.WithLabelValues(pool).Observe(total.Seconds())
	if res != nil {
		m.queueWait.WithLabelValues(pool).Observe(res.Queued.Seconds())
		m.runTime.WithLabelValues(pool).Observe(res.Ran.Seconds())
	} else {
		var dle *DeadlineError
		if errors.As(err, &dle) {
			m.queueWait.WithLabelValues(pool).Observe(dle.Queued.Seconds())
		}
	}
}

// codeName is the gRPC code an error maps to, from the one mapping table.
func codeName(err error) string {
	c := status.Code(toStatus(err))
	s := c.String()
	// codes.Code.String gives "ResourceExhausted": make it snake case.
	var b strings.Builder
	for i, r := range s {
		if i > 0 && r >= 'A' && r <= 'Z' {
			b.WriteByte('_')
		}
		b.WriteRune(r)
	}
	return b.String()
}

var (
	descWorkers = prometheus.NewDesc("snakepit_workers", "Workers of a pool by state: busy (running a call), idle (ready, no call), missing (not ready).", []string{"pool", "state"}, nil)
	descQueue   = prometheus.NewDesc("snakepit_queue_depth", "Calls waiting for a worker.", []string{"pool"}, nil)
	descBusy    = prometheus.NewDesc("snakepit_calls_in_flight", "Calls running in workers.", []string{"pool"}, nil)
	descRestart = prometheus.NewDesc("snakepit_worker_restarts_total", "Workers replaced, by cause (exit causes, recycle_<reason>, start_failed).", []string{"pool", "cause"}, nil)
	descSess    = prometheus.NewDesc("snakepit_sessions", "Live sessions.", []string{"pool"}, nil)
	descUp      = prometheus.NewDesc("snakepit_pool_ready", "1 while the pool is ready or degraded (serving), else 0.", []string{"pool", "state"}, nil)
)

// poolCollector reads the pools' gauges at scrape time.
type poolCollector struct{ n *Node }

func (c *poolCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{descWorkers, descQueue, descBusy, descRestart, descSess, descUp} {
		ch <- d
	}
}

func (c *poolCollector) Collect(ch chan<- prometheus.Metric) {
	for _, name := range c.n.order {
		p := c.n.pools[name]
		st := p.status()
		busyWorkers, idle := 0, 0
		for _, w := range st.Workers {
			switch {
			case w.InFlight > 0:
				busyWorkers++
			case w.State == "ready":
				idle++
			}
		}
		ch <- prometheus.MustNewConstMetric(descWorkers, prometheus.GaugeValue, float64(busyWorkers), name, "busy")
		ch <- prometheus.MustNewConstMetric(descWorkers, prometheus.GaugeValue, float64(idle), name, "idle")
		ch <- prometheus.MustNewConstMetric(descWorkers, prometheus.GaugeValue, float64(st.Size-busyWorkers-idle), name, "missing")
		ch <- prometheus.MustNewConstMetric(descQueue, prometheus.GaugeValue, float64(st.Queued), name)
		ch <- prometheus.MustNewConstMetric(descBusy, prometheus.GaugeValue, float64(st.Busy), name)
		for cause, v := range st.Restarts {
			ch <- prometheus.MustNewConstMetric(descRestart, prometheus.CounterValue, float64(v), name, cause)
		}
		p.mu.Lock()
		sessions := len(p.sessions)
		p.mu.Unlock()
		ch <- prometheus.MustNewConstMetric(descSess, prometheus.GaugeValue, float64(sessions), name)
		up := 0.0
		if st.State == PoolReady || st.State == PoolDegraded {
			up = 1
		}
		ch <- prometheus.MustNewConstMetric(descUp, prometheus.GaugeValue, up, name, st.State.String())
	}
}

// serveMetrics serves /metrics on addr until stop is called.
func (m *metrics) serve(addr string) (net.Addr, func(), error) {
	lis, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, nil, err
	}
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(m.reg, promhttp.HandlerOpts{Registry: m.reg}))
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	go func() { _ = srv.Serve(lis) }()
	return lis.Addr(), func() { _ = srv.Close() }, nil
}
