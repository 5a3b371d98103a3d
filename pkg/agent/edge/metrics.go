package edge

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

	"github.com/snakepit/snakepit/pkg/agent/call"
	"github.com/snakepit/snakepit/pkg/agent/engine"
)

// Metrics are the node's Prometheus metrics, in one registry. Counters and
// histograms are updated on the call path (Metrics is the engine's and the
// cluster layer's Observer); gauges are read from the pools when scraped.
// docs/metrics.md lists them.
type Metrics struct {
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

// PoolStats gives the pools' gauges at scrape time (the engine).
type PoolStats interface {
	Status() engine.Status
}

// NewMetrics registers the node's metrics; ReadPools adds the pools'
// gauges.
func NewMetrics() *Metrics {
	m := &Metrics{
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
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return m
}

// Observe records one finished call of a pool (engine.Observer).
func (m *Metrics) Observe(pool string, res *call.Result, err error, total time.Duration) {
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
		var dle *call.DeadlineError
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
type poolCollector struct{ pools PoolStats }

func (c *poolCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{descWorkers, descQueue, descBusy, descRestart, descSess, descUp} {
		ch <- d
	}
}

func (c *poolCollector) Collect(ch chan<- prometheus.Metric) {
	for _, st := range c.pools.Status().Pools {
		name := st.Name
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
		ch <- prometheus.MustNewConstMetric(descSess, prometheus.GaugeValue, float64(st.Sessions), name)
		up := 0.0
		if st.State == engine.PoolReady || st.State == engine.PoolDegraded {
			up = 1
		}
		ch <- prometheus.MustNewConstMetric(descUp, prometheus.GaugeValue, up, name, st.State.String())
	}
}

// ReadPools registers the pools' gauges, read from pools at scrape time.
func (m *Metrics) ReadPools(pools PoolStats) {
	m.reg.MustRegister(&poolCollector{pools: pools})
}

// Retried counts a call moved to another worker or node
// (snakepit_retries_total).
func (m *Metrics) Retried(reason string) { m.retries.WithLabelValues(reason).Inc() }

// Forwarded counts a call forwarded to a peer (snakepit_forwards_total).
func (m *Metrics) Forwarded(peer, outcome string) { m.forwards.WithLabelValues(peer, outcome).Inc() }

// Ejected counts a peer ejected by its breaker
// (snakepit_peer_ejections_total).
func (m *Metrics) Ejected(peer string) { m.ejections.WithLabelValues(peer).Inc() }

// CountDiscoveryRequests exports the requests the node sent its discovery
// backend (snakepit_discovery_requests_total).
func (m *Metrics) CountDiscoveryRequests(requests func() uint64) {
	m.reg.MustRegister(prometheus.NewCounterFunc(prometheus.CounterOpts{
		Namespace: "snakepit", Name: "discovery_requests_total",
		Help: "Requests this node sent its discovery backend (Consul): registration, check refreshes, blocking queries. Flat under load: nothing is sent per call.",
	}, func() float64 { return float64(requests()) }))
}

// serveMetrics serves /metrics on addr until stop is called.
func (m *Metrics) serve(addr string) (net.Addr, func(), error) {
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
