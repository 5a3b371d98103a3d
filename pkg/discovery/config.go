package discovery

import (
	"errors"
	"fmt"
	"net"
	"net/url"
	"os"
	"strings"
	"time"
)

// Kinds of discovery backend (Config.Kind, key discovery.kind).
const (
	KindStatic = "static"
	KindConsul = "consul"
)

// Defaults. Every default of this package is here; docs/discovery.md is
// checked against them by a test.
const (
	// DefaultKind: standalone, no external service.
	DefaultKind = KindStatic
	// DefaultConsulAddress is the local Consul agent's HTTP API.
	DefaultConsulAddress = "127.0.0.1:8500"
	// DefaultConsulService is the Consul service name all nodes register
	// under.
	DefaultConsulService = "snakepit"
	// DefaultTTL is the TTL of the node's health check; the Registrar
	// refreshes it every TTL/3 while healthy. A node that dies leaves
	// watchers' snapshots about one TTL after its last refresh.
	DefaultTTL = 15 * time.Second
	// DefaultDeregisterCriticalAfter: Consul removes an instance whose check
	// stayed critical this long (Consul's minimum is 1m).
	DefaultDeregisterCriticalAfter = 2 * time.Minute
	// DefaultUpdateInterval is the least time between two publications of a
	// changed Node (cordon and drain changes are not delayed).
	DefaultUpdateInterval = 10 * time.Second
	// DefaultWatchWait is how long one blocking query may wait for a change.
	DefaultWatchWait = 60 * time.Second
	// DefaultRequestTimeout bounds each non-blocking request to Consul.
	DefaultRequestTimeout = 5 * time.Second
	// DefaultRetryMin and DefaultRetryMax bound the backoff between retries
	// while Consul is unreachable or refuses a request (doubling, jittered).
	DefaultRetryMin = 200 * time.Millisecond
	DefaultRetryMax = 10 * time.Second
	// DefaultWatchMinInterval is the least time between two blocking queries,
	// so a churning catalog cannot make a watcher spin.
	DefaultWatchMinInterval = 100 * time.Millisecond
)

// Bounds checked by Validate.
const (
	MinTTL                     = time.Second
	MaxTTL                     = 10 * time.Minute
	MinDeregisterCriticalAfter = time.Minute
	MaxWatchWait               = 10 * time.Minute
)

// Config selects and configures the discovery backend. The daemon fills it
// from its config file (keys under discovery.*); start from DefaultConfig.
type Config struct {
	// Kind is the backend: "static" (default) or "consul". Key discovery.kind.
	Kind string `mapstructure:"kind"`
	// Labels are published with the node for placement filters
	// (discovery.labels); a Node's own Labels override them per key.
	Labels map[string]string `mapstructure:"labels"`
	// Consul configures the consul backend (discovery.consul.*).
	Consul ConsulConfig `mapstructure:"consul"`
	// Static configures the static backend (discovery.static.*).
	Static StaticConfig `mapstructure:"static"`
}

// ConsulConfig configures the consul backend.
type ConsulConfig struct {
	// Address of the Consul agent's HTTP API: host:port,
	// http://host:port, https://host:port or unix:///path.
	// Key discovery.consul.address.
	Address string `mapstructure:"address"`
	// Token is the ACL token (discovery.consul.token). TokenFile
	// (discovery.consul.token_file) names a file holding it instead; it is
	// read when the client is first used. With neither, Consul's own
	// CONSUL_HTTP_TOKEN / CONSUL_HTTP_TOKEN_FILE environment applies, as for
	// the consul CLI.
	Token     string `mapstructure:"token"`
	TokenFile string `mapstructure:"token_file"`
	// Datacenter to query and register in; "" is the agent's own
	// (discovery.consul.datacenter).
	Datacenter string `mapstructure:"datacenter"`
	// Service is the Consul service name (discovery.consul.service).
	Service string `mapstructure:"service"`
	// TTL of the health check (discovery.consul.ttl).
	TTL time.Duration `mapstructure:"ttl"`
	// DeregisterCriticalAfter (discovery.consul.deregister_critical_after).
	DeregisterCriticalAfter time.Duration `mapstructure:"deregister_critical_after"`
	// UpdateInterval rate-limits Meta updates (discovery.consul.update_interval).
	UpdateInterval time.Duration `mapstructure:"update_interval"`
	// WatchWait is the blocking query wait (discovery.consul.watch_wait).
	WatchWait time.Duration `mapstructure:"watch_wait"`
	// TLS to the agent (discovery.consul.tls.*).
	TLS TLSConfig `mapstructure:"tls"`
}

// TLSConfig configures TLS to the Consul agent. It is used when Address is
// https:// (or when any file is set).
type TLSConfig struct {
	// CAFile verifies the agent's certificate (discovery.consul.tls.ca_file).
	CAFile string `mapstructure:"ca_file"`
	// CertFile and KeyFile are the client certificate for mutual TLS
	// (discovery.consul.tls.cert_file, discovery.consul.tls.key_file).
	CertFile string `mapstructure:"cert_file"`
	KeyFile  string `mapstructure:"key_file"`
	// ServerName overrides the name checked in the agent's certificate
	// (discovery.consul.tls.server_name).
	ServerName string `mapstructure:"server_name"`
	// InsecureSkipVerify disables certificate checks; for tests only
	// (discovery.consul.tls.insecure_skip_verify).
	InsecureSkipVerify bool `mapstructure:"insecure_skip_verify"`
}

// StaticConfig configures the static backend.
type StaticConfig struct {
	// Peers are the other nodes of the cluster (discovery.static.peers). The
	// local node is added by its Registrar; an entry with the local node's
	// ID is replaced by what the Registrar publishes.
	Peers []StaticPeer `mapstructure:"peers"`
}

// StaticPeer is one configured peer.
type StaticPeer struct {
	// ID and Addr (host:port of its gRPC endpoint) are required.
	ID   NodeID `mapstructure:"id"`
	Addr string `mapstructure:"addr"`
	// Pools maps pool names to worker slots, used by routers as weights.
	Pools map[string]int `mapstructure:"pools"`
	// Labels for placement filters.
	Labels map[string]string `mapstructure:"labels"`
}

// DefaultConfig returns the configuration used when none is given: static
// discovery, Consul settings at their defaults for when Kind is switched.
func DefaultConfig() Config {
	return Config{
		Kind: DefaultKind,
		Consul: ConsulConfig{
			Address:                 DefaultConsulAddress,
			Service:                 DefaultConsulService,
			TTL:                     DefaultTTL,
			DeregisterCriticalAfter: DefaultDeregisterCriticalAfter,
			UpdateInterval:          DefaultUpdateInterval,
			WatchWait:               DefaultWatchWait,
		},
	}
}

// Validate checks the configuration without any I/O (files named in it are
// read later). Errors wrap ErrBadConfig and name the key and the bad value.
func (c Config) Validate() error {
	var errs []error
	bad := func(format string, args ...any) {
		errs = append(errs, fmt.Errorf("%w: "+format, append([]any{ErrBadConfig}, args...)...))
	}
	switch c.Kind {
	case KindStatic, KindConsul:
	default:
		bad("discovery.kind must be %q or %q (got %q)", KindStatic, KindConsul, c.Kind)
	}
	if err := ValidateLabels(c.Labels); err != nil {
		bad("discovery.%v", err)
	}
	if c.Kind == KindConsul {
		c.Consul.validate(bad)
	}
	if c.Kind == KindStatic {
		seen := make(map[NodeID]bool)
		for i, p := range c.Static.Peers {
			key := fmt.Sprintf("discovery.static.peers[%d]", i)
			if err := p.ID.Validate(); err != nil {
				bad("%s.id: %v", key, err)
			} else if seen[p.ID] {
				bad("%s.id: %q listed twice", key, p.ID)
			}
			seen[p.ID] = true
			if err := validateAddr(p.Addr); err != nil {
				bad("%s.addr: %v", key, err)
			}
			pools := make(map[string]PoolOffer, len(p.Pools))
			for name, slots := range p.Pools {
				pools[name] = PoolOffer{Slots: slots}
			}
			n := Node{ID: "x", Addr: "x:1", Pools: pools, Labels: p.Labels}
			if err := n.validate(); err != nil {
				bad("%s: %v", key, err)
			}
		}
	}
	return errors.Join(errs...)
}

func (c ConsulConfig) validate(bad func(string, ...any)) {
	if _, _, err := parseConsulAddress(c.Address); err != nil {
		bad("discovery.consul.address: %v", err)
	}
	if c.Token != "" && c.TokenFile != "" {
		bad("discovery.consul.token and discovery.consul.token_file are both set; use one")
	}
	if strings.ContainsAny(c.Token, " \t\r\n") {
		bad("discovery.consul.token contains white space")
	}
	if !nodeIDRe.MatchString(c.Service) || strings.Contains(c.Service, ".") {
		bad("discovery.consul.service must be 1-128 of [A-Za-z0-9_-] (got %q)", c.Service)
	}
	if c.TTL < MinTTL || c.TTL > MaxTTL {
		bad("discovery.consul.ttl must be between %v and %v (got %v)", MinTTL, MaxTTL, c.TTL)
	}
	if c.DeregisterCriticalAfter < MinDeregisterCriticalAfter {
		bad("discovery.consul.deregister_critical_after must be at least %v, Consul's minimum (got %v)", MinDeregisterCriticalAfter, c.DeregisterCriticalAfter)
	}
	if c.UpdateInterval < 0 {
		bad("discovery.consul.update_interval must be >= 0 (got %v)", c.UpdateInterval)
	}
	if c.WatchWait < time.Second || c.WatchWait > MaxWatchWait {
		bad("discovery.consul.watch_wait must be between 1s and %v (got %v)", MaxWatchWait, c.WatchWait)
	}
	if (c.TLS.CertFile == "") != (c.TLS.KeyFile == "") {
		bad("discovery.consul.tls.cert_file and discovery.consul.tls.key_file must be set together")
	}
}

// parseConsulAddress splits a Consul address into scheme (http, https, unix)
// and host:port or socket path.
func parseConsulAddress(addr string) (scheme, target string, err error) {
	if addr == "" {
		return "", "", errors.New("empty")
	}
	if !strings.Contains(addr, "://") {
		addr = "http://" + addr
	}
	u, err := url.Parse(addr)
	if err != nil {
		return "", "", fmt.Errorf("%q: %w", addr, err)
	}
	switch u.Scheme {
	case "unix":
		if u.Path == "" {
			return "", "", fmt.Errorf("%q: want unix:///path/to/socket", addr)
		}
		return "unix", u.Path, nil
	case "http", "https":
	default:
		return "", "", fmt.Errorf("%q: scheme must be http, https or unix", addr)
	}
	if u.Path != "" && u.Path != "/" {
		return "", "", fmt.Errorf("%q: no path allowed", addr)
	}
	host, port, err := net.SplitHostPort(u.Host)
	if err != nil || host == "" || port == "" {
		return "", "", fmt.Errorf("%q: want host:port", addr)
	}
	return u.Scheme, u.Host, nil
}

// readToken returns the configured token, reading TokenFile if set.
func (c ConsulConfig) readToken() (string, error) {
	if c.TokenFile == "" {
		return c.Token, nil
	}
	b, err := os.ReadFile(c.TokenFile)
	if err != nil {
		return "", fmt.Errorf("%w: discovery.consul.token_file: %w", ErrBadConfig, err)
	}
	return strings.TrimSpace(string(b)), nil
}
