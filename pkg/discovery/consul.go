package discovery

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/consul/api"
	"github.com/hashicorp/go-cleanhttp"
)

// consulClient builds the Consul API client on first use (constructors do no
// I/O) and counts the HTTP requests it sends.
type consulClient struct {
	cfg ConsulConfig

	requests atomic.Uint64
	byKind   [numRequestKinds]atomic.Uint64

	mu  sync.Mutex // guards the lazily built client below
	api *api.Client
	hc  *http.Client
	err error
}

// closeIdle closes idle keep-alive connections (and their goroutines); called
// when a lifecycle ends (Run returns, Deregister).
func (c *consulClient) closeIdle() {
	c.mu.Lock()
	hc := c.hc
	c.mu.Unlock()
	if hc != nil {
		hc.CloseIdleConnections()
	}
}

// Kinds of request, counted separately for tests and benchmarks.
type requestKind int

const (
	reqOther requestKind = iota
	reqRegister
	reqDeregister
	reqCheckUpdate
	reqHealth
	numRequestKinds
)

func classifyRequest(path string) requestKind {
	switch {
	case strings.HasPrefix(path, "/v1/agent/service/register"):
		return reqRegister
	case strings.HasPrefix(path, "/v1/agent/service/deregister/"):
		return reqDeregister
	case strings.HasPrefix(path, "/v1/agent/check/update/"):
		return reqCheckUpdate
	case strings.HasPrefix(path, "/v1/health/service/"):
		return reqHealth
	}
	return reqOther
}

type countingTransport struct {
	next http.RoundTripper
	c    *consulClient
}

// CloseIdleConnections lets http.Client.CloseIdleConnections reach the
// wrapped transport.
func (t countingTransport) CloseIdleConnections() {
	if ci, ok := t.next.(interface{ CloseIdleConnections() }); ok {
		ci.CloseIdleConnections()
	}
}

func (t countingTransport) RoundTrip(req *http.Request) (*http.Response, error) {
	t.c.requests.Add(1)
	t.c.byKind[classifyRequest(req.URL.Path)].Add(1)
	return t.next.RoundTrip(req)
}

func (c *consulClient) client() (*api.Client, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.api == nil && c.err == nil {
		c.api, c.hc, c.err = c.build()
	}
	return c.api, c.err
}

func (c *consulClient) build() (*api.Client, *http.Client, error) {
	scheme, target, err := parseConsulAddress(c.cfg.Address)
	if err != nil {
		return nil, nil, fmt.Errorf("%w: discovery.consul.address: %w", ErrBadConfig, err)
	}
	token, err := c.cfg.readToken()
	if err != nil {
		return nil, nil, err
	}
	tlsCfg := api.TLSConfig{
		Address:            c.cfg.TLS.ServerName,
		CAFile:             c.cfg.TLS.CAFile,
		CertFile:           c.cfg.TLS.CertFile,
		KeyFile:            c.cfg.TLS.KeyFile,
		InsecureSkipVerify: c.cfg.TLS.InsecureSkipVerify,
	}
	transport := cleanhttp.DefaultPooledTransport()
	if scheme == "unix" {
		path := target
		transport.DialContext = func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", path)
		}
		scheme, target = "http", "localhost"
	}
	hc, err := api.NewHttpClient(transport, tlsCfg)
	if err != nil {
		return nil, nil, fmt.Errorf("%w: discovery.consul.tls: %w", ErrBadConfig, err)
	}
	hc.Transport = countingTransport{next: hc.Transport, c: c}
	client, err := api.NewClient(&api.Config{
		Address:    target,
		Scheme:     scheme,
		Datacenter: c.cfg.Datacenter,
		Token:      token,
		TLSConfig:  tlsCfg,
		HttpClient: hc,
	})
	if err != nil {
		return nil, nil, fmt.Errorf("%w: discovery.consul: %w", ErrBadConfig, err)
	}
	return client, hc, nil
}

// wrapErr classifies an error from the Consul API: refused (ACL) requests
// wrap ErrPermission and point at discovery.consul.token; transport failures
// wrap ErrUnavailable and name the address.
func (c *consulClient) wrapErr(op string, err error) error {
	var (
		se  api.StatusError
		cve *tls.CertificateVerificationError
	)
	switch {
	case err == nil:
		return nil
	case errors.As(err, &cve):
		return fmt.Errorf("%s: %w: discovery.consul.address=%s: the agent's certificate was not accepted (check discovery.consul.tls.ca_file and discovery.consul.tls.server_name): %w",
			op, ErrUnavailable, c.cfg.Address, err)
	case errors.Is(err, ErrBadConfig):
		return err
	case errors.As(err, &se) && (se.Code == http.StatusForbidden || se.Code == http.StatusUnauthorized):
		return fmt.Errorf("%s: %w: consul answered %d (%s); check discovery.consul.token", op, ErrPermission, se.Code, se.Body)
	case errors.As(err, &se):
		return fmt.Errorf("%s: consul answered %d: %s", op, se.Code, se.Body)
	}
	return fmt.Errorf("%s: %w: discovery.consul.address=%s: %w", op, ErrUnavailable, c.cfg.Address, err)
}

// isNotFound reports a 404 from Consul.
func isNotFound(err error) bool {
	var se api.StatusError
	return errors.As(err, &se) && se.Code == http.StatusNotFound
}

// backoff returns the wait before retry number failures (1-based): doubling
// from lo, capped at hi, with jitter in [d/2, d) so that nodes that lost
// Consul together do not come back in step.
func backoff(failures int, lo, hi time.Duration, rnd func() float64) time.Duration {
	d := lo
	for i := 1; i < failures && d < hi; i++ {
		d *= 2
	}
	d = min(d, hi)
	return d/2 + time.Duration(rnd()*float64(d/2))
}

func jitter() float64 { return rand.Float64() }

// sleepCtx waits d or until ctx is done; it reports whether ctx is still live.
func sleepCtx(ctx context.Context, d time.Duration) bool {
	if d <= 0 {
		return ctx.Err() == nil
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-t.C:
		return true
	}
}
