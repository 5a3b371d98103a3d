package discovery

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"net"
	"slices"
	"strconv"
	"sync"
	"time"

	"github.com/hashicorp/consul/api"
	"github.com/rs/zerolog"
)

// Check outputs. They are constant: Consul syncs output-only changes lazily,
// and fast-changing data does not belong in checks (DESIGN.md decision 7).
const (
	checkOutputPassing  = "pools can serve"
	checkOutputCritical = "pools cannot serve"
)

// ConsulRegistrar registers the local node as an instance of the Consul
// service ConsulConfig.Service, with ID = node ID, the node's gRPC address
// and port, its data in Meta (see encodeMeta) and a TTL check that Run
// refreshes every TTL/3 while the node is healthy. Safe for concurrent use.
type ConsulRegistrar struct {
	cc     *consulClient
	log    zerolog.Logger
	labels map[string]string
	wake   chan struct{}

	// opMu serializes the requests that change the registration, so a
	// Deregister can never be overtaken by a re-registration in flight.
	opMu sync.Mutex

	mu sync.Mutex
	st regState
}

// regState is the registrar's view of its registration. Guarded by mu.
type regState struct {
	node         *Node // desired; nil before Register
	gen          uint64
	pubGen       uint64 // gen last published
	healthy      bool
	healthGen    uint64
	pubHealthGen uint64 // healthGen last published
	urgent       bool   // a change that skips the update interval
	deregistered bool
	registered   bool // Consul holds our registration as of the last request
	lastPublish  time.Time
	lastRefresh  time.Time
	failures     int
	warned       bool // this series of failures has been logged
	retryAt      time.Time
}

// regAction is what the registrar has to do next.
type regAction int

const (
	actNone     regAction = iota
	actRegister           // (re-)register the service with Meta and check
	actSetCheck           // update the TTL check (refresh or health change)
)

// plan decides the next action at time now and, when there is none, how long
// to wait. Pure: no I/O, no clock.
func (s *regState) plan(now time.Time, ttl, interval time.Duration) (regAction, time.Duration) {
	const idle = time.Hour
	if s.node == nil || s.deregistered {
		return actNone, idle
	}
	if now.Before(s.retryAt) {
		return actNone, s.retryAt.Sub(now)
	}
	if !s.registered {
		return actRegister, 0
	}
	wait := idle
	if s.gen != s.pubGen {
		due := s.lastPublish.Add(interval)
		if s.urgent || !now.Before(due) {
			return actRegister, 0
		}
		wait = due.Sub(now)
	}
	if s.healthGen != s.pubHealthGen {
		return actSetCheck, 0
	}
	if s.healthy {
		due := s.lastRefresh.Add(ttl / 3)
		if !now.Before(due) {
			return actSetCheck, 0
		}
		wait = min(wait, due.Sub(now))
	}
	return actNone, wait
}

// NewConsulRegistrar returns a registrar for cfg.Consul publishing
// cfg.Labels with the node. It validates cfg but does no I/O.
func NewConsulRegistrar(cfg Config, log zerolog.Logger) (*ConsulRegistrar, error) {
	cfg.Kind = KindConsul
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	return &ConsulRegistrar{
		cc:     &consulClient{cfg: cfg.Consul},
		log:    log.With().Str("component", "discovery").Str("backend", KindConsul).Logger(),
		labels: maps.Clone(cfg.Labels),
		wake:   make(chan struct{}, 1),
	}, nil
}

// Requests returns the number of HTTP requests sent to Consul so far.
func (r *ConsulRegistrar) Requests() uint64 { return r.cc.requests.Load() }

func (r *ConsulRegistrar) kick() {
	select {
	case r.wake <- struct{}{}:
	default:
	}
}

// prepare validates n and merges the configured labels under its own.
func prepareNode(n Node, labels map[string]string) (Node, error) {
	n = n.Clone()
	if len(labels) > 0 {
		merged := maps.Clone(labels)
		maps.Copy(merged, n.Labels)
		n.Labels = merged
	}
	slices.Sort(n.GPUs.Models)
	n.GPUs.Models = slices.Compact(n.GPUs.Models)
	if len(n.Pools) == 0 {
		n.Pools = nil
	}
	if len(n.Labels) == 0 {
		n.Labels = nil
	}
	if len(n.GPUs.Models) == 0 {
		n.GPUs.Models = nil
	}
	if err := n.Validate(); err != nil {
		return Node{}, err
	}
	return n, nil
}

// Register publishes n at once: it returns when Consul holds the
// registration, or with the error that prevented it. An unreachable Consul
// gives an error wrapping ErrUnavailable; the registration is kept and Run
// completes it when Consul is back. A refused request (ACL) wraps
// ErrPermission. The node is registered as critical until SetHealthy(true).
func (r *ConsulRegistrar) Register(ctx context.Context, n Node) error {
	n, err := prepareNode(n, r.labels)
	if err != nil {
		return err
	}
	r.mu.Lock()
	if old := r.st.node; old != nil && !r.st.deregistered && old.ID != n.ID {
		r.mu.Unlock()
		return fmt.Errorf("%w: node id cannot change from %q to %q; Deregister first", ErrInvalidNode, old.ID, n.ID)
	}
	r.st.node = &n
	r.st.gen++
	r.st.deregistered = false
	r.st.registered = false
	r.st.retryAt = time.Time{}
	r.mu.Unlock()
	defer r.kick()
	_, err = r.step(ctx, false)
	return err
}

// Update replaces the published Node; Run publishes it (see Registrar).
func (r *ConsulRegistrar) Update(n Node) error {
	n, err := prepareNode(n, r.labels)
	if err != nil {
		return err
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	old := r.st.node
	if old == nil {
		return ErrNotRegistered
	}
	if old.ID != n.ID {
		return fmt.Errorf("%w: node id cannot change from %q to %q", ErrInvalidNode, old.ID, n.ID)
	}
	if old.Cordoned != n.Cordoned || old.Draining != n.Draining || old.Addr != n.Addr {
		r.st.urgent = true
	}
	r.st.node = &n
	r.st.gen++
	r.kick()
	return nil
}

// SetHealthy sets the node's health (see Registrar); Run publishes it.
func (r *ConsulRegistrar) SetHealthy(healthy bool) {
	r.mu.Lock()
	if r.st.healthy != healthy {
		r.st.healthy = healthy
		r.st.healthGen++
	}
	r.mu.Unlock()
	r.kick()
}

// Run keeps the registration alive until ctx is done (see Registrar). It
// returns nil on cancellation and an error only for configuration that
// cannot work (unreadable token or TLS files).
func (r *ConsulRegistrar) Run(ctx context.Context) error {
	defer r.cc.closeIdle()
	timer := time.NewTimer(0)
	defer timer.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-r.wake:
		case <-timer.C:
		}
		wait, err := r.step(ctx, true)
		if ctx.Err() != nil {
			return nil
		}
		if isBadConfig(err) {
			return err
		}
		timer.Reset(wait)
	}
}

// step performs the next due action and returns how long to wait before the
// next one. With logFailures, the first failure of a series is logged (the
// others at debug level); recovery after a logged failure is logged too.
func (r *ConsulRegistrar) step(ctx context.Context, logFailures bool) (time.Duration, error) {
	r.opMu.Lock()
	defer r.opMu.Unlock()

	now := time.Now()
	r.mu.Lock()
	ttl, interval := r.cc.cfg.TTL, r.cc.cfg.UpdateInterval
	act, wait := r.st.plan(now, ttl, interval)
	if act == actNone {
		r.mu.Unlock()
		return wait, nil
	}
	node, gen := r.st.node.Clone(), r.st.gen
	healthy, healthGen := r.st.healthy, r.st.healthGen
	r.mu.Unlock()

	var err error
	switch act {
	case actRegister:
		err = r.register(ctx, node, healthy)
	case actSetCheck:
		err = r.setCheck(ctx, node.ID, healthy)
	}

	r.mu.Lock()
	defer r.mu.Unlock()
	if r.st.deregistered {
		return time.Hour, nil
	}
	now = time.Now()
	if err != nil {
		if ctx.Err() != nil {
			return 0, ctx.Err()
		}
		r.st.failures++
		r.st.registered = false
		d := backoff(r.st.failures, DefaultRetryMin, DefaultRetryMax, jitter)
		r.st.retryAt = now.Add(d)
		ev := r.log.Debug()
		if logFailures && !r.st.warned {
			ev, r.st.warned = r.log.Warn(), true
		}
		ev.Err(err).Str("node_id", string(node.ID)).Int("failures", r.st.failures).Dur("retry_in", d).Msg("consul registration failed")
		return d, err
	}
	if r.st.warned {
		r.log.Info().Str("node_id", string(node.ID)).Int("failures", r.st.failures).Msg("consul registration recovered")
	}
	r.st.failures = 0
	r.st.warned = false
	r.st.retryAt = time.Time{}
	r.st.registered = true
	r.st.lastRefresh = now
	r.st.pubHealthGen = healthGen
	if act == actRegister {
		r.st.pubGen = gen
		r.st.lastPublish = now
		if gen == r.st.gen {
			r.st.urgent = false
		}
	}
	_, wait = r.st.plan(now, ttl, interval)
	return wait, nil
}

func checkID(id NodeID) string { return "snakepit-ttl:" + string(id) }

func checkStatus(healthy bool) (status, output string) {
	if healthy {
		return api.HealthPassing, checkOutputPassing
	}
	return api.HealthCritical, checkOutputCritical
}

func (r *ConsulRegistrar) register(ctx context.Context, n Node, healthy bool) error {
	client, err := r.cc.client()
	if err != nil {
		return err
	}
	host, portStr, _ := net.SplitHostPort(n.Addr)
	port, _ := strconv.Atoi(portStr)
	status, _ := checkStatus(healthy)
	reg := &api.AgentServiceRegistration{
		ID:      string(n.ID),
		Name:    r.cc.cfg.Service,
		Address: host,
		Port:    port,
		Meta:    encodeMeta(n),
		Check: &api.AgentServiceCheck{
			CheckID:                        checkID(n.ID),
			Name:                           "snakepit node health",
			TTL:                            r.cc.cfg.TTL.String(),
			Status:                         status,
			Notes:                          "passing while the node's pools can serve; refreshed every TTL/3",
			DeregisterCriticalServiceAfter: r.cc.cfg.DeregisterCriticalAfter.String(),
		},
	}
	ctx, cancel := context.WithTimeout(ctx, DefaultRequestTimeout)
	defer cancel()
	err = client.Agent().ServiceRegisterOpts(reg, api.ServiceRegisterOpts{ReplaceExistingChecks: true}.WithContext(ctx))
	return r.cc.wrapErr("register "+string(n.ID), err)
}

func (r *ConsulRegistrar) setCheck(ctx context.Context, id NodeID, healthy bool) error {
	client, err := r.cc.client()
	if err != nil {
		return err
	}
	status, output := checkStatus(healthy)
	ctx, cancel := context.WithTimeout(ctx, DefaultRequestTimeout)
	defer cancel()
	err = client.Agent().UpdateTTLOpts(checkID(id), output, status, (&api.QueryOptions{}).WithContext(ctx))
	return r.cc.wrapErr("update check of "+string(id), err)
}

// Deregister removes the registration from Consul now and stops Run from
// publishing it again until the next Register. A registration the agent no
// longer has counts as removed. If Consul is unreachable the error wraps
// ErrUnavailable; the TTL then marks the instance critical and Consul
// removes it after DeregisterCriticalAfter.
func (r *ConsulRegistrar) Deregister(ctx context.Context) error {
	r.mu.Lock()
	node := r.st.node
	r.st.deregistered = true
	r.st.registered = false
	r.mu.Unlock()
	if node == nil {
		return nil
	}
	r.opMu.Lock()
	defer r.opMu.Unlock()
	defer r.cc.closeIdle()
	client, err := r.cc.client()
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, DefaultRequestTimeout)
	defer cancel()
	err = client.Agent().ServiceDeregisterOpts(string(node.ID), (&api.QueryOptions{}).WithContext(ctx))
	if isNotFound(err) {
		return nil
	}
	return r.cc.wrapErr("deregister "+string(node.ID), err)
}

func isBadConfig(err error) bool { return errors.Is(err, ErrBadConfig) }
