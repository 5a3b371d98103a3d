package cluster

import (
	"context"
	"errors"
	"sync"
	"sync/atomic"
	"time"

	"github.com/sony/gobreaker/v2"
	"google.golang.org/grpc"
	"google.golang.org/grpc/connectivity"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/stats"

	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	"github.com/snakepit/snakepit/pkg/agent/wire"
	"github.com/snakepit/snakepit/pkg/client"
	snakepitv1 "github.com/snakepit/snakepit/proto/snakepit/v1"
)

// peerConn is this node's connection to one peer and what it learnt of it:
// its load (from answers), whether calls to it fail (the breaker) and since
// when it is down. It lives from the snapshot that adds the peer until the
// peer has been gone for the break-glass lease.
type peerConn struct {
	id     string
	addr   string
	conn   *grpc.ClientConn
	client snakepitv1.SnakepitClient
	health healthpb.HealthClient
	br     *gobreaker.TwoStepCircuitBreaker[struct{}]

	loads     atomic.Pointer[map[string]float64]
	lastHeard atomic.Int64 // unix nanos of the last answer
	notServ   atomic.Bool  // its health check said NOT_SERVING
	probing   atomic.Bool  // a liveness probe is running
	probeTO   time.Duration
	failures  int // breaker_failures: probes in a row that eject
	ctx       context.Context
	cancel    context.CancelFunc

	mu        sync.Mutex
	listed    bool      // in the current snapshot, healthy
	goneAt    time.Time // when it left the snapshot (zero while listed)
	downSince time.Time // zero while up
}

// errPeerFailed is what a peer's breaker counts as a failure: the call did
// not reach the peer, its connection failed, or a liveness probe timed out.
var errPeerFailed = errors.New("peer failed")

// errNoAnswer ends a call that the caller's deadline or cancellation cut
// short before the peer answered. The breaker ignores it: a slow tool on a
// healthy peer looks the same as a frozen peer. Instead it starts a
// liveness probe (probe), whose answer decides.
var errNoAnswer = errors.New("no answer before the caller's deadline")

// dialPeer creates the connection to a peer (it connects in the
// background; no I/O here).
func dialPeer(id, addr string, cfg Config, maxMsg int, creds grpc.DialOption, onChange func(id string, to gobreaker.State)) (*peerConn, error) {
	p := &peerConn{id: id, addr: addr, probeTO: cfg.LoadRefreshInterval, failures: cfg.BreakerFailures}
	p.ctx, p.cancel = context.WithCancel(context.Background())
	conn, err := grpc.NewClient("passthrough:///"+addr, append(client.FlowControl(), creds,
		grpc.WithStatsHandler(sentTracker{}),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(maxMsg*2), grpc.MaxCallSendMsgSize(maxMsg*2)),
		// A peer that stops answering (SIGSTOP, a dead link) is noticed
		// within Time+Timeout even when no call is running; the servers'
		// enforcement policy allows pings every 5s.
		grpc.WithKeepaliveParams(keepalive.ClientParameters{Time: 5 * time.Second, Timeout: 2 * time.Second, PermitWithoutStream: true}),
	)...)
	if err != nil {
		return nil, err
	}
	p.conn = conn
	p.client = snakepitv1.NewSnakepitClient(conn)
	p.health = healthpb.NewHealthClient(conn)
	p.br = gobreaker.NewTwoStepCircuitBreaker[struct{}](gobreaker.Settings{
		Name:        id,
		MaxRequests: 1,
		Timeout:     cfg.BreakerBackoff,
		ReadyToTrip: func(c gobreaker.Counts) bool { return c.ConsecutiveFailures >= uint32(cfg.BreakerFailures) },
		IsExcluded:  func(err error) bool { return errors.Is(err, errNoAnswer) },
		OnStateChange: func(_ string, _, to gobreaker.State) {
			if to == gobreaker.StateOpen {
				p.markDown(time.Now())
			}
			if onChange != nil {
				onChange(id, to) // the table changes (and strict waiters wake)
			}
		},
	})
	conn.Connect()
	return p, nil
}

// usable reports whether calls may be sent to the peer now: its breaker is
// not open and its connection is not failing. A half-open breaker is usable
// (the call is its probe, if no other probe is out).
func (p *peerConn) usable() bool {
	if p.br.State() == gobreaker.StateOpen || p.notServ.Load() {
		return false
	}
	return p.conn.GetState() != connectivity.TransientFailure
}

// down reports whether the peer is down (not listed healthy, ejected, or
// its connection failing) and since when, as this node saw it first. The
// clock keeps running while the breaker is half-open (a probe is deciding):
// it stops only once the peer is up for good, so an owner that fails every
// probe is down for the whole time, as strict_queue's break-glass lease
// needs.
func (p *peerConn) down(now time.Time) (bool, time.Time) {
	isDown := !p.usable()
	settled := p.br.State() == gobreaker.StateClosed
	p.mu.Lock()
	defer p.mu.Unlock()
	isDown = isDown || !p.listed
	switch {
	case !isDown && settled:
		p.downSince = time.Time{}
	case isDown && p.downSince.IsZero():
		p.downSince = now
	}
	return isDown, p.downSince
}

func (p *peerConn) markDown(now time.Time) {
	p.mu.Lock()
	if p.downSince.IsZero() {
		p.downSince = now
	}
	p.mu.Unlock()
}

// load returns the peer's last reported load of a pool (NaN: none yet).
func (p *peerConn) load(pool string) float64 {
	m := p.loads.Load()
	if m == nil {
		return nan
	}
	if v, ok := (*m)[pool]; ok {
		return v
	}
	return nan
}

// heard records an answer's load trailer.
func (p *peerConn) heard(md metadata.MD) {
	p.lastHeard.Store(time.Now().UnixNano())
	if v := md.Get(wire.LoadHeader); len(v) > 0 {
		if m := wire.ParseLoads(v[0]); m != nil {
			p.loads.Store(&m)
		}
	}
}

// probe checks, in the background, whether a peer that let a call run
// past its caller's deadline still answers: a health check bounded by
// load_refresh_interval. Each probe that gets no answer counts as a
// failure, and it probes again at once, until the peer answers or its
// breaker opens (after breaker_failures probes): a frozen peer is ejected
// within about breaker_failures × load_refresh_interval of its first
// timed-out call, long before its discovery TTL lapses, while a slow tool
// on a live peer costs one cheap health check. One probe runs at a time.
func (p *peerConn) probe() {
	if !p.probing.CompareAndSwap(false, true) {
		return
	}
	go func() {
		defer p.probing.Store(false)
		for range max(p.failures, 1) {
			if p.ctx.Err() != nil || !p.check(p.ctx, p.probeTO) {
				return
			}
		}
	}()
}

// check runs one health check through the breaker (a half-open breaker
// lets it through as its probe; an open one skips it until its back-off is
// over); the answer's trailer carries the peer's load. It reports whether
// to keep probing: the peer did not answer and its breaker is still closed.
func (p *peerConn) check(ctx context.Context, timeout time.Duration) (again bool) {
	done, err := p.br.Allow()
	if err != nil {
		return false
	}
	cctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	var tr metadata.MD
	r, err := p.health.Check(cctx, &healthpb.HealthCheckRequest{}, grpc.Trailer(&tr))
	if err != nil && ctx.Err() != nil {
		done(nil) // we are stopping; says nothing of the peer
		return false
	}
	if err != nil {
		done(errPeerFailed)
		return p.br.State() == gobreaker.StateClosed
	}
	p.notServ.Store(r.GetStatus() != healthpb.HealthCheckResponse_SERVING)
	p.heard(tr)
	done(nil)
	return false
}

func (p *peerConn) close() {
	p.cancel()
	_ = p.conn.Close()
}

// sentTracker is the client stats handler that tells whether a call's
// request message was handed to a transport. A call whose request never
// was provably did not start on the peer: its handler cannot run without
// the message. One that was may have started, whatever error follows
// (docs/forwarding.md).
type sentTracker struct{}

type sentKey struct{}

type sentFlag struct{ sent atomic.Bool }

// withSentFlag returns a context whose calls record into f.
func withSentFlag(ctx context.Context, f *sentFlag) context.Context {
	return context.WithValue(ctx, sentKey{}, f)
}

func (sentTracker) TagRPC(ctx context.Context, _ *stats.RPCTagInfo) context.Context { return ctx }

func (sentTracker) HandleRPC(ctx context.Context, s stats.RPCStats) {
	if _, ok := s.(*stats.OutPayload); !ok {
		return
	}
	if f, ok := ctx.Value(sentKey{}).(*sentFlag); ok {
		f.sent.Store(true)
	}
}

func (sentTracker) TagConn(ctx context.Context, _ *stats.ConnTagInfo) context.Context { return ctx }
func (sentTracker) HandleConn(context.Context, stats.ConnStats)                       {}
