package agent

import (
	"errors"
	"fmt"
	"math"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"regexp"
	"runtime"
	"strconv"
	"strings"
	"time"

	"github.com/snakepit/snakepit/pkg/agent/cluster"
	"github.com/snakepit/snakepit/pkg/agent/edge"
	"github.com/snakepit/snakepit/pkg/agent/engine"
	"github.com/snakepit/snakepit/pkg/agent/policy"
	"github.com/snakepit/snakepit/pkg/client"
	"github.com/snakepit/snakepit/pkg/discovery"
	"github.com/snakepit/snakepit/pkg/pyruntime"
	"github.com/snakepit/snakepit/pkg/router"
)

// Defaults. Every default of the daemon lives here; the example config
// (configs/snakepitd.yaml) and docs/configuration.md are checked against
// these by tests.
const (
	// DefaultListen is the gRPC address a node serves on.
	DefaultListen = client.DefaultAddress
	// DefaultMetricsListen is where a node serves Prometheus metrics.
	DefaultMetricsListen = "127.0.0.1:7421"
	// DefaultMaxMessageBytes bounds a request or response message, and a
	// frame between the daemon and a worker.
	DefaultMaxMessageBytes = 16 << 20
	// DefaultShutdownGrace is how long a stopping node lets calls in flight
	// finish before cancelling them.
	DefaultShutdownGrace = 30 * time.Second
	// DefaultStartConcurrency is how many workers a node starts at once.
	DefaultStartConcurrency = 16

	// DefaultPoolName is the name of the pool a node runs when its config
	// names none, and of the pool a request without a pool goes to.
	DefaultPoolName = "default"
	// DefaultAdapter is the adapter of the default pool.
	DefaultAdapter = pyruntime.ExampleAdapter
	// DefaultPython is the interpreter workers run.
	DefaultPython = "python3"
	// DefaultPoolSize is the number of workers in a pool.
	DefaultPoolSize = 2
	// DefaultCapacity is how many calls one worker runs at once.
	DefaultCapacity = 1
	// DefaultQueueDepth is how many calls may wait for a worker in a pool.
	DefaultQueueDepth = 1024
	// DefaultQueueMaxWait is the longest a call waits for a worker.
	DefaultQueueMaxWait = 30 * time.Second
	// DefaultCallTimeout applies to calls that carry no deadline.
	DefaultCallTimeout = 5 * time.Minute
	// DefaultStartTimeout bounds a worker's start: spawn, import, setup.
	DefaultStartTimeout = 60 * time.Second
	// DefaultStopGrace is how long a worker gets at each step of stopping
	// (close, then SIGTERM, then SIGKILL).
	DefaultStopGrace = 5 * time.Second
	// DefaultStderrTail is how many stderr lines of a worker are kept to
	// explain its crash.
	DefaultStderrTail = 20
	// DefaultMonitorInterval is how often the age and memory of workers are
	// checked against their recycling limits.
	DefaultMonitorInterval = time.Second
	// DefaultHeartbeatInterval is how often a worker is pinged.
	DefaultHeartbeatInterval = time.Second
	// DefaultHeartbeatTimeout is how long a worker may leave pings
	// unanswered before it is killed as hung.
	DefaultHeartbeatTimeout = 10 * time.Second
	// DefaultCancelGrace is how long a cancelled call may keep running
	// before its worker is recycled.
	DefaultCancelGrace = 5 * time.Second
	// DefaultRecycleDrainTimeout bounds how long a worker being recycled may
	// finish its calls before it is stopped.
	DefaultRecycleDrainTimeout = 30 * time.Second
	// DefaultRestartBackoffMin and DefaultRestartBackoffMax bound the
	// exponential back-off between restarts of a crashing worker.
	DefaultRestartBackoffMin = 20 * time.Millisecond
	DefaultRestartBackoffMax = 30 * time.Second
	// DefaultRestartBudget is how many crashes of one worker slot within
	// DefaultRestartWindow are tolerated before the slot is tainted and
	// the pool reported degraded.
	DefaultRestartBudget = 5
	DefaultRestartWindow = time.Minute
	// DefaultTaintCooldown is how long a tainted slot waits before its next
	// restart.
	DefaultTaintCooldown = time.Minute

	// DefaultSessionIdleTimeout is how long a session lives without calls.
	DefaultSessionIdleTimeout = 30 * time.Minute
	// DefaultMaxSessionsPerWorker bounds the sessions bound to one worker.
	DefaultMaxSessionsPerWorker = 1024
	// DefaultMaxSessions bounds the sessions of the whole node.
	DefaultMaxSessions = 65536
	// DefaultMaxStreamsPerConnection bounds the concurrent calls (gRPC
	// streams) of one client connection.
	DefaultMaxStreamsPerConnection = 1000
	// DefaultNewSessionsPerSecond and DefaultNewSessionsBurst bound how fast
	// one client (by address) may open sessions.
	DefaultNewSessionsPerSecond = 100.0
	DefaultNewSessionsBurst     = 200
	// DefaultStreamWindow is how many chunks of a stream may be in flight
	// between a Python generator and the client before the generator waits.
	DefaultStreamWindow = 32

	// Default policies of a pool (pools[].policies, docs/policies.md).
	DefaultNodePolicy        = policy.TwoChoices
	DefaultSessionNodePolicy = policy.Rendezvous
	DefaultWorkerPolicy      = policy.SessionSticky
	DefaultQueuePolicy       = policy.Queue
	DefaultAffinityPolicy    = policy.Hint

	// DefaultDrainDeadline bounds a drain that names no deadline.
	DefaultDrainDeadline = 5 * time.Minute
	// DeregisterTimeout bounds the deregistration a stopping node does
	// first.
	DeregisterTimeout = 5 * time.Second
	// DefaultClusterStatusTimeout bounds the wait for each peer's status in
	// a cluster status.
	DefaultClusterStatusTimeout = 5 * time.Second
)

// Defaults of the cluster router (config section router.*).
const (
	// DefaultDedupWindow is how long a caller-supplied request id is
	// remembered by the node that executed it.
	DefaultDedupWindow = 5 * time.Minute
	// DefaultDedupMaxEntries bounds the request ids remembered.
	DefaultDedupMaxEntries = 100000
	// DefaultBreakGlassLease is how long a strict_queue session waits for
	// its unhealthy owner before the next-ranked node takes it over.
	DefaultBreakGlassLease = 30 * time.Second
	// DefaultRetryBudgetRatio and DefaultRetryBudgetMin bound retries to
	// other nodes: allowed while retries over the last 10s are below this
	// fraction of requests, or below the minimum.
	DefaultRetryBudgetRatio = 0.1
	DefaultRetryBudgetMin   = 10
	// DefaultLoadRefreshInterval is how often a peer that sent no answer
	// recently is asked for its health and load; it also bounds each
	// liveness probe of a peer that let a call time out.
	DefaultLoadRefreshInterval = time.Second
	// DefaultBreakerFailures consecutive failures to a peer (lost
	// connections, failed health checks or liveness probes) eject it from
	// this node's choices for DefaultBreakerBackoff; then one probe decides
	// whether it is readmitted.
	DefaultBreakerFailures = 3
	DefaultBreakerBackoff  = 5 * time.Second
	// DefaultMaxCandidates is how many nodes one call may be tried on.
	DefaultMaxCandidates = router.DefaultMax
)

// RouterConfig configures the cluster router (config section router;
// cluster.Config).
type RouterConfig = cluster.Config

// TLSConfig turns on TLS for the gRPC port (edge.TLSConfig).
type TLSConfig = edge.TLSConfig

// Client certificate policies of TLSConfig.ClientAuth.
const (
	ClientAuthNone    = edge.ClientAuthNone
	ClientAuthRequest = edge.ClientAuthRequest
	ClientAuthRequire = edge.ClientAuthRequire
)

// DefaultRouterConfig returns the router's defaults.
func DefaultRouterConfig() RouterConfig {
	return RouterConfig{
		DedupWindow:         DefaultDedupWindow,
		DedupMaxEntries:     DefaultDedupMaxEntries,
		BreakGlassLease:     DefaultBreakGlassLease,
		RetryBudgetRatio:    DefaultRetryBudgetRatio,
		RetryBudgetMin:      DefaultRetryBudgetMin,
		LoadRefreshInterval: DefaultLoadRefreshInterval,
		BreakerFailures:     DefaultBreakerFailures,
		BreakerBackoff:      DefaultBreakerBackoff,
		MaxCandidates:       DefaultMaxCandidates,
	}
}

func routerWithDefaults(c RouterConfig) RouterConfig {
	d := DefaultRouterConfig()
	setDur := func(v *time.Duration, def time.Duration) {
		if *v == 0 {
			*v = def
		}
	}
	setInt := func(v *int, def int) {
		if *v == 0 {
			*v = def
		}
	}
	setDur(&c.DedupWindow, d.DedupWindow)
	setInt(&c.DedupMaxEntries, d.DedupMaxEntries)
	setDur(&c.BreakGlassLease, d.BreakGlassLease)
	if c.RetryBudgetRatio == 0 {
		c.RetryBudgetRatio = d.RetryBudgetRatio
	}
	setInt(&c.RetryBudgetMin, d.RetryBudgetMin)
	setDur(&c.LoadRefreshInterval, d.LoadRefreshInterval)
	setInt(&c.BreakerFailures, d.BreakerFailures)
	setDur(&c.BreakerBackoff, d.BreakerBackoff)
	setInt(&c.MaxCandidates, d.MaxCandidates)
	return c
}

func validateRouter(c RouterConfig, bad func(string, ...any)) {
	for _, d := range []struct {
		key string
		v   time.Duration
	}{{"dedup_window", c.DedupWindow}, {"break_glass_lease", c.BreakGlassLease},
		{"load_refresh_interval", c.LoadRefreshInterval}, {"breaker_backoff", c.BreakerBackoff}} {
		if d.v < 0 {
			bad("router.%s must not be negative (got %s)", d.key, d.v)
		}
	}
	if c.DedupMaxEntries < 0 || c.RetryBudgetMin < 0 || c.BreakerFailures < 0 {
		bad("router.dedup_max_entries, retry_budget_min and breaker_failures must not be negative (got %d, %d, %d)",
			c.DedupMaxEntries, c.RetryBudgetMin, c.BreakerFailures)
	}
	if c.RetryBudgetRatio < 0 || c.RetryBudgetRatio > 1 || math.IsNaN(c.RetryBudgetRatio) {
		bad("router.retry_budget_ratio must be between 0 and 1 (got %g)", c.RetryBudgetRatio)
	}
	if c.MaxCandidates < 0 || c.MaxCandidates > 16 {
		bad("router.max_candidates must be between 1 and 16 (got %d)", c.MaxCandidates)
	}
}

// Config is the configuration of a node. DefaultConfig returns it filled
// with the defaults above; cmd/snakepitd overlays the config file, the
// environment and flags.
type Config struct {
	// NodeID names the node in its cluster; it must be unique and stable
	// across restarts. Empty means the host name.
	NodeID string `mapstructure:"node_id"`
	// Listen is the gRPC address (host:port).
	Listen string `mapstructure:"listen"`
	// Advertise is the address (host:port) peers dial, published to
	// discovery; empty means the bound listen address. Required when listen
	// is a wildcard address and discovery is consul.
	Advertise string `mapstructure:"advertise"`
	// MetricsListen is the HTTP address of /metrics (Prometheus); "off"
	// disables it.
	MetricsListen string `mapstructure:"metrics_listen"`
	// AdminSocket is the local Unix socket that serves the Admin API (and
	// the public one); empty means $RUNTIME_DIRECTORY/admin.sock, else
	// <state_dir>/admin.sock; "off" disables it.
	AdminSocket string `mapstructure:"admin_socket"`
	// AdminSocketGroup owns the admin socket (mode 0660); empty keeps the
	// daemon's group.
	AdminSocketGroup string `mapstructure:"admin_socket_group"`
	// AdminTokenFile holds a bearer token that grants the Admin API over
	// TCP; empty means admin verbs only on the local socket.
	AdminTokenFile string `mapstructure:"admin_token_file"`
	// AdminIdentities are the client certificate names (common name or DNS
	// name, verified by tls.client_ca_file) granted the Admin API over TCP.
	AdminIdentities []string `mapstructure:"admin_identities"`
	// TLS turns on TLS (and mutual TLS) on the gRPC port.
	TLS TLSConfig `mapstructure:"tls"`
	// StateDir holds what survives a restart: the Python runtime copy and
	// the record of running workers. Empty means DefaultStateDir().
	StateDir string `mapstructure:"state_dir"`
	// MaxMessageBytes bounds request and response messages.
	MaxMessageBytes int `mapstructure:"max_message_bytes"`
	// ShutdownGrace bounds how long calls in flight may run on stop.
	ShutdownGrace time.Duration `mapstructure:"shutdown_grace"`
	// StartConcurrency bounds how many workers start at once.
	StartConcurrency int `mapstructure:"start_concurrency"`
	// MonitorInterval is how often workers' age and memory are checked.
	MonitorInterval time.Duration `mapstructure:"monitor_interval"`
	// MaxSessions bounds the sessions of the node, all pools together.
	MaxSessions int `mapstructure:"max_sessions"`
	// MaxStreamsPerConnection bounds the concurrent calls of one client
	// connection; more wait in the client.
	MaxStreamsPerConnection int `mapstructure:"max_streams_per_connection"`
	// NewSessionsPerSecond and NewSessionsBurst bound how fast one client
	// address opens sessions; negative NewSessionsPerSecond disables it.
	NewSessionsPerSecond float64 `mapstructure:"new_sessions_per_second"`
	NewSessionsBurst     int     `mapstructure:"new_sessions_burst"`
	// Pools are the worker pools; the first one is the default pool. Empty
	// means one pool named DefaultPoolName serving DefaultAdapter.
	Pools []PoolConfig `mapstructure:"pools"`
	// Discovery publishes the node to its cluster and finds its peers
	// (keys discovery.*, see docs/discovery.md); static, a cluster of one,
	// by default.
	Discovery discovery.Config `mapstructure:"discovery"`
	// Router configures the cluster router: forwarding, deduplication,
	// retries, circuit breaking (see docs/forwarding.md).
	Router RouterConfig `mapstructure:"router"`
	// Policies is the registry pools[].policies names are looked up in;
	// nil means policy.Builtin(). A program that registers its own
	// policies sets it (docs/policies.md); it is not a config-file key.
	Policies *policy.Registry `mapstructure:"-"`
}

// PoolConfig configures one pool of identical workers (engine.PoolConfig).
type PoolConfig = engine.PoolConfig

// GPUConfig pins a pool's workers to GPUs (engine.GPUConfig).
type GPUConfig = engine.GPUConfig

// DefaultConfig returns the configuration a node runs with when nothing is
// configured: a standalone node with one pool of the example adapter.
func DefaultConfig() Config {
	return Config{
		Listen:           DefaultListen,
		MetricsListen:    DefaultMetricsListen,
		MaxMessageBytes:  DefaultMaxMessageBytes,
		ShutdownGrace:    DefaultShutdownGrace,
		StartConcurrency: DefaultStartConcurrency,
		MonitorInterval:  DefaultMonitorInterval,
		MaxSessions:      DefaultMaxSessions,

		MaxStreamsPerConnection: DefaultMaxStreamsPerConnection,
		NewSessionsPerSecond:    DefaultNewSessionsPerSecond,
		NewSessionsBurst:        DefaultNewSessionsBurst,

		Discovery: discovery.DefaultConfig(),
		Router:    DefaultRouterConfig(),
	}
}

// DefaultPool returns a pool config with every default filled in.
func DefaultPool(name, adapter string) PoolConfig {
	return PoolConfig{
		Name:         name,
		Adapter:      adapter,
		Python:       DefaultPython,
		Size:         DefaultPoolSize,
		Capacity:     DefaultCapacity,
		QueueDepth:   DefaultQueueDepth,
		QueueMaxWait: DefaultQueueMaxWait,
		CallTimeout:  DefaultCallTimeout,
		StartTimeout: DefaultStartTimeout,
		StopGrace:    DefaultStopGrace,

		RecycleDrainTimeout: DefaultRecycleDrainTimeout,
		HeartbeatInterval:   DefaultHeartbeatInterval,
		HeartbeatTimeout:    DefaultHeartbeatTimeout,
		CancelGrace:         DefaultCancelGrace,
		RestartBackoffMin:   DefaultRestartBackoffMin,
		RestartBackoffMax:   DefaultRestartBackoffMax,
		RestartBudget:       DefaultRestartBudget,
		RestartWindow:       DefaultRestartWindow,
		TaintCooldown:       DefaultTaintCooldown,

		SessionIdleTimeout:   DefaultSessionIdleTimeout,
		MaxSessionsPerWorker: DefaultMaxSessionsPerWorker,
		StreamWindow:         DefaultStreamWindow,
		Policies: policy.Config{
			Node:        policy.Ref{Name: DefaultNodePolicy},
			SessionNode: policy.Ref{Name: DefaultSessionNodePolicy},
			Worker:      policy.Ref{Name: DefaultWorkerPolicy},
			Queue:       policy.Ref{Name: DefaultQueuePolicy},
			Affinity:    policy.Ref{Name: DefaultAffinityPolicy},
		},
	}
}

// DefaultStateDir is where a node keeps its state when none is configured:
// $STATE_DIRECTORY (set by systemd's StateDirectory=), else
// $XDG_STATE_HOME/snakepitd, else ~/.local/state/snakepitd. spctl finds the
// admin socket there, so the rule lives in pkg/client.
func DefaultStateDir() string { return client.DefaultStateDir() }

// withDefaults returns the config with empty values replaced by defaults.
// Zero means "the default" for every numeric key.
func (c Config) withDefaults() Config {
	d := DefaultConfig()
	if c.NodeID == "" {
		if h, err := os.Hostname(); err == nil {
			c.NodeID = h
		}
	}
	if c.Listen == "" {
		c.Listen = d.Listen
	}
	if c.MetricsListen == "" {
		c.MetricsListen = d.MetricsListen
	}
	if c.StateDir == "" {
		c.StateDir = DefaultStateDir()
	}
	if c.MaxMessageBytes == 0 {
		c.MaxMessageBytes = d.MaxMessageBytes
	}
	if c.ShutdownGrace == 0 {
		c.ShutdownGrace = d.ShutdownGrace
	}
	if c.MonitorInterval == 0 {
		c.MonitorInterval = d.MonitorInterval
	}
	if c.MaxSessions == 0 {
		c.MaxSessions = d.MaxSessions
	}
	if c.MaxStreamsPerConnection == 0 {
		c.MaxStreamsPerConnection = d.MaxStreamsPerConnection
	}
	if c.NewSessionsPerSecond == 0 {
		c.NewSessionsPerSecond = d.NewSessionsPerSecond
	}
	if c.NewSessionsBurst == 0 {
		c.NewSessionsBurst = d.NewSessionsBurst
	}
	if c.StartConcurrency == 0 {
		c.StartConcurrency = min(d.StartConcurrency, 4*runtime.NumCPU())
	}
	c.Discovery = discoveryWithDefaults(c.Discovery)
	c.Router = routerWithDefaults(c.Router)
	if len(c.Pools) == 0 {
		c.Pools = []PoolConfig{{Name: DefaultPoolName, Adapter: DefaultAdapter}}
	}
	pools := make([]PoolConfig, len(c.Pools))
	for i, p := range c.Pools {
		pools[i] = poolWithDefaults(p)
	}
	c.Pools = pools
	return c
}

func poolWithDefaults(p PoolConfig) PoolConfig {
	d := DefaultPool(p.Name, p.Adapter)
	if p.Python == "" {
		p.Python = d.Python
		if p.Virtualenv != "" {
			p.Python = filepath.Join(p.Virtualenv, "bin", "python")
		}
	}
	if p.MinReady == 0 {
		p.MinReady = p.Size
	}
	setDur := func(v *time.Duration, def time.Duration) {
		if *v == 0 {
			*v = def
		}
	}
	setDur(&p.RecycleDrainTimeout, d.RecycleDrainTimeout)
	setDur(&p.HeartbeatInterval, d.HeartbeatInterval)
	setDur(&p.HeartbeatTimeout, d.HeartbeatTimeout)
	setDur(&p.CancelGrace, d.CancelGrace)
	setDur(&p.RestartBackoffMin, d.RestartBackoffMin)
	setDur(&p.RestartBackoffMax, d.RestartBackoffMax)
	setDur(&p.RestartWindow, d.RestartWindow)
	setDur(&p.TaintCooldown, d.TaintCooldown)
	if p.RestartBudget == 0 {
		p.RestartBudget = d.RestartBudget
	}
	setDur(&p.SessionIdleTimeout, d.SessionIdleTimeout)
	if p.MaxSessionsPerWorker == 0 {
		p.MaxSessionsPerWorker = d.MaxSessionsPerWorker
	}
	if p.StreamWindow == 0 {
		p.StreamWindow = d.StreamWindow
	}
	if p.Size == 0 {
		p.Size = d.Size
	}
	if p.Capacity == 0 {
		p.Capacity = d.Capacity
	}
	if p.QueueDepth == 0 {
		p.QueueDepth = d.QueueDepth
	}
	if p.QueueMaxWait == 0 {
		p.QueueMaxWait = d.QueueMaxWait
	}
	if p.CallTimeout == 0 {
		p.CallTimeout = d.CallTimeout
	}
	if p.StartTimeout == 0 {
		p.StartTimeout = d.StartTimeout
	}
	if p.StopGrace == 0 {
		p.StopGrace = d.StopGrace
	}
	setName := func(r *policy.Ref, def string) {
		if r.Name == "" {
			r.Name = def
		}
	}
	setName(&p.Policies.Node, DefaultNodePolicy)
	setName(&p.Policies.SessionNode, DefaultSessionNodePolicy)
	setName(&p.Policies.Worker, DefaultWorkerPolicy)
	setName(&p.Policies.Queue, DefaultQueuePolicy)
	setName(&p.Policies.Affinity, DefaultAffinityPolicy)
	return p
}

// registry returns the policy registry of the config.
func (c Config) registry() *policy.Registry {
	if c.Policies != nil {
		return c.Policies
	}
	return policy.Builtin()
}

// buildPolicies builds every pool's policies (c has its defaults applied);
// errors name their keys.
func (c Config) buildPolicies() (map[string]*policy.Set, error) {
	reg := c.registry()
	out := make(map[string]*policy.Set, len(c.Pools))
	var errs []error
	for _, p := range c.Pools {
		env := policy.Env{Pool: p.Name, Key: fmt.Sprintf("pools[%s].policies", p.Name), Labels: c.Discovery.Labels}
		set, err := reg.Build(env, p.Policies)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		out[p.Name] = set
	}
	return out, errors.Join(errs...)
}

var namePattern = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$`)

// Validate reports every problem of the config, each naming its key and
// the bad value. It checks the config as given, after defaults are applied.
func (c Config) Validate() error {
	c = c.withDefaults()
	var errs []error
	bad := func(format string, args ...any) { errs = append(errs, fmt.Errorf(format, args...)) }
	if !namePattern.MatchString(c.NodeID) {
		bad("node_id must be 1-63 letters, digits, '_', '.' or '-' (got %q)", c.NodeID)
	}
	if _, port, err := splitHostPort(c.Listen); err != nil {
		bad("listen must be host:port (got %q): %v", c.Listen, err)
	} else if port == "" {
		bad("listen must include a port (got %q)", c.Listen)
	}
	validateCluster(c, bad)
	c.TLS.Validate(bad)
	validateRouter(c.Router, bad)
	if len(c.AdminIdentities) > 0 && c.TLS.ClientCAFile == "" {
		bad("admin_identities need tls.client_ca_file to verify client certificates")
	}
	if c.MetricsListen != "off" {
		if _, port, err := splitHostPort(c.MetricsListen); err != nil || port == "" {
			bad("metrics_listen must be host:port or \"off\" (got %q)", c.MetricsListen)
		}
	}
	if c.MaxMessageBytes < 1024 {
		bad("max_message_bytes must be at least 1024 (got %d)", c.MaxMessageBytes)
	}
	if c.ShutdownGrace < 0 {
		bad("shutdown_grace must not be negative (got %s)", c.ShutdownGrace)
	}
	if c.MaxStreamsPerConnection < 0 || c.NewSessionsBurst < 0 {
		bad("max_streams_per_connection and new_sessions_burst must not be negative (got %d, %d)", c.MaxStreamsPerConnection, c.NewSessionsBurst)
	}
	if c.MaxSessions < 0 {
		bad("max_sessions must not be negative (got %d)", c.MaxSessions)
	}
	if c.MonitorInterval < 0 {
		bad("monitor_interval must not be negative (got %s)", c.MonitorInterval)
	}
	if c.StartConcurrency < 0 {
		bad("start_concurrency must be >0 (got %d)", c.StartConcurrency)
	}
	seen := map[string]bool{}
	for i, p := range c.Pools {
		key := fmt.Sprintf("pools[%d]", i)
		if !namePattern.MatchString(p.Name) {
			bad("%s.name must be 1-63 letters, digits, '_', '.' or '-' (got %q)", key, p.Name)
		} else if seen[p.Name] {
			bad("%s.name %q is used by another pool", key, p.Name)
		}
		seen[p.Name] = true
		if p.Name != "" {
			key = fmt.Sprintf("pools[%s]", p.Name)
		}
		if strings.TrimSpace(p.Adapter) == "" {
			bad("%s.adapter must name a Python module or file (got %q)", key, p.Adapter)
		}
		if p.Size < 1 {
			bad("%s.size must be >0 (got %d)", key, p.Size)
		}
		if p.Capacity < 1 {
			bad("%s.capacity must be >0 (got %d)", key, p.Capacity)
		}
		if p.QueueDepth < 0 {
			bad("%s.queue_depth must not be negative (got %d)", key, p.QueueDepth)
		}
		if p.MinReady < 0 || p.MinReady > p.Size {
			bad("%s.min_ready must be between 1 and size %d (got %d)", key, p.Size, p.MinReady)
		}
		if p.MaxCalls < 0 || p.MaxMemoryMB < 0 || p.RestartBudget < 0 || p.MaxSessionsPerWorker < 0 || p.StreamWindow < 0 {
			bad("%s: max_calls, max_memory_mb, restart_budget, max_sessions_per_worker and stream_window must not be negative", key)
		}
		if p.HeartbeatTimeout > 0 && p.HeartbeatTimeout <= p.HeartbeatInterval {
			bad("%s.heartbeat_timeout (%s) must be longer than heartbeat_interval (%s)", key, p.HeartbeatTimeout, p.HeartbeatInterval)
		}
		if p.RestartBackoffMax < p.RestartBackoffMin {
			bad("%s.restart_backoff_max (%s) must not be below restart_backoff_min (%s)", key, p.RestartBackoffMax, p.RestartBackoffMin)
		}
		for _, d := range []struct {
			name string
			v    time.Duration
		}{{"queue_max_wait", p.QueueMaxWait}, {"call_timeout", p.CallTimeout}, {"start_timeout", p.StartTimeout}, {"stop_grace", p.StopGrace},
			{"max_age", p.MaxAge}, {"recycle_drain_timeout", p.RecycleDrainTimeout}, {"heartbeat_interval", p.HeartbeatInterval},
			{"heartbeat_timeout", p.HeartbeatTimeout}, {"cancel_grace", p.CancelGrace}, {"restart_backoff_min", p.RestartBackoffMin},
			{"restart_backoff_max", p.RestartBackoffMax}, {"restart_window", p.RestartWindow}, {"taint_cooldown", p.TaintCooldown},
			{"session_idle_timeout", p.SessionIdleTimeout}} {
			if d.v < 0 {
				bad("%s.%s must not be negative (got %s)", key, d.name, d.v)
			}
		}
		for k := range p.Env {
			if k == "" || strings.ContainsAny(k, "=\x00") {
				bad("%s.env has an invalid variable name %q", key, k)
			}
		}
		p.GPUs.Validate(key, p, bad)
	}
	if seen := len(seen); seen == len(c.Pools) {
		if _, err := c.buildPolicies(); err != nil {
			for _, e := range unjoin(err) {
				for _, e := range unjoin(e) {
					bad("%s", e.Error())
				}
			}
		}
	}
	return errors.Join(errs...)
}

func splitHostPort(addr string) (string, string, error) {
	i := strings.LastIndexByte(addr, ':')
	if i < 0 {
		return "", "", errors.New("missing port")
	}
	return addr[:i], addr[i+1:], nil
}

// discoveryWithDefaults fills the zero values of d with the defaults, so a
// Config built in code without Discovery is a standalone static node.
func discoveryWithDefaults(d discovery.Config) discovery.Config {
	def := discovery.DefaultConfig()
	if d.Kind == "" {
		d.Kind = def.Kind
	}
	c, dc := &d.Consul, def.Consul
	if c.Address == "" {
		c.Address = dc.Address
	}
	if c.Service == "" {
		c.Service = dc.Service
	}
	if c.TTL == 0 {
		c.TTL = dc.TTL
	}
	if c.DeregisterCriticalAfter == 0 {
		c.DeregisterCriticalAfter = dc.DeregisterCriticalAfter
	}
	if c.UpdateInterval == 0 {
		c.UpdateInterval = dc.UpdateInterval
	}
	if c.WatchWait == 0 {
		c.WatchWait = dc.WatchWait
	}
	return d
}

// validateCluster checks advertise and the discovery keys (c has its
// defaults applied).
func validateCluster(c Config, bad func(string, ...any)) {
	if err := c.Discovery.Validate(); err != nil {
		// Each line already names its discovery.* key.
		for _, e := range unjoin(err) {
			bad("%s", trimBadConfig(e))
		}
	}
	if c.Advertise != "" {
		host, port, err := net.SplitHostPort(c.Advertise)
		p, perr := strconv.Atoi(port)
		switch {
		case err != nil:
			bad("advertise must be host:port (got %q): %v", c.Advertise, err)
		case host == "":
			bad("advertise must name a host peers can dial (got %q)", c.Advertise)
		case perr != nil || p < 1 || p > 65535:
			bad("advertise port must be 1-65535 (got %q)", c.Advertise)
		}
		if ip, err := netip.ParseAddr(host); err == nil && ip.IsUnspecified() {
			bad("advertise must not be a wildcard address (got %q); publish an address peers can dial", c.Advertise)
		}
		return
	}
	if c.Discovery.Kind != discovery.KindConsul {
		return
	}
	host, _, err := splitHostPort(c.Listen)
	if err != nil {
		return // reported by the listen check
	}
	if host == "" || host == "[::]" {
		bad("advertise must be set when listen has a wildcard host (listen %q): peers need an address they can dial", c.Listen)
	} else if ip, err := netip.ParseAddr(host); err == nil && ip.IsUnspecified() {
		bad("advertise must be set when listen has a wildcard host (listen %q): peers need an address they can dial", c.Listen)
	}
}

// unjoin splits an errors.Join result into its errors.
func unjoin(err error) []error {
	if j, ok := err.(interface{ Unwrap() []error }); ok {
		return j.Unwrap()
	}
	return []error{err}
}

// trimBadConfig drops discovery's "invalid discovery config: " prefix, so
// the message starts with the key like every other config error.
func trimBadConfig(err error) string {
	msg := err.Error()
	prefix := discovery.ErrBadConfig.Error() + ": "
	if len(msg) > len(prefix) && msg[:len(prefix)] == prefix {
		return msg[len(prefix):]
	}
	return msg
}

// AdminSocketPath resolves the admin socket of a config: admin_socket, else
// $RUNTIME_DIRECTORY/admin.sock (systemd's RuntimeDirectory=), else
// <state_dir>/admin.sock. "off" yields "".
func AdminSocketPath(cfg Config) string {
	switch cfg.AdminSocket {
	case "off":
		return ""
	case "":
	default:
		return cfg.AdminSocket
	}
	if d := os.Getenv("RUNTIME_DIRECTORY"); d != "" {
		return filepath.Join(strings.Split(d, ":")[0], "admin.sock")
	}
	return filepath.Join(cfg.withDefaults().StateDir, "admin.sock")
}
