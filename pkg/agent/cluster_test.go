package agent

import (
	"github.com/snakepit/snakepit/pkg/agent/membership"

	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"github.com/snakepit/snakepit/internal/consultest"
	"github.com/snakepit/snakepit/pkg/discovery"
	snakepitv1 "github.com/snakepit/snakepit/proto/snakepit/v1"
)

// waitNodes polls ListNodes until cond holds, for at most timeout.
func waitNodes(t *testing.T, sp snakepitv1.SnakepitClient, timeout time.Duration, what string, cond func(*snakepitv1.ListNodesResponse) bool) *snakepitv1.ListNodesResponse {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		resp, err := sp.ListNodes(ctx, &snakepitv1.ListNodesRequest{})
		cancel()
		if err == nil && cond(resp) {
			return resp
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within %s; last ListNodes = %v, %v", what, timeout, resp, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func nodeByID(resp *snakepitv1.ListNodesResponse, id string) *snakepitv1.Node {
	for _, n := range resp.GetNodes() {
		if n.GetNodeId() == id {
			return n
		}
	}
	return nil
}

// With no discovery configured a node is a static cluster of one: it lists
// itself once ready, with what it publishes.
func TestListNodesStandalone(t *testing.T) {
	cfg := testConfig(t)
	cfg.Discovery.Labels = map[string]string{"zone": "eu-1a"}
	tn := startNode(t, cfg)
	resp := waitNodes(t, tn.sp, 10*time.Second, "self listed healthy", func(r *snakepitv1.ListNodesResponse) bool {
		n := nodeByID(r, "node-a")
		return n != nil && n.GetHealthy()
	})
	if len(resp.GetNodes()) != 1 {
		t.Fatalf("ListNodes = %v, want one node", resp.GetNodes())
	}
	n := resp.GetNodes()[0]
	if !n.GetSelf() || n.GetAddress() != tn.addr || n.GetVersion() != Version || n.GetPools()["test"] != 2 ||
		n.GetLabels()["zone"] != "eu-1a" || n.GetCordoned() {
		t.Errorf("self = %v; want self, address %s, version %s, pools test:2, label zone=eu-1a, not cordoned", n, tn.addr, Version)
	}
	if resp.GetDiscovery() != "static" || resp.GetStale() || resp.GetSnapshotAge() == nil {
		t.Errorf("ListNodes discovery %q stale %v age %v; want static, fresh, with an age", resp.GetDiscovery(), resp.GetStale(), resp.GetSnapshotAge())
	}
}

// Static peers from config are listed beside the node, and cordon (operator
// intent) is published at once.
func TestListNodesStaticPeersAndCordon(t *testing.T) {
	cfg := testConfig(t)
	cfg.Discovery.Static.Peers = []discovery.StaticPeer{{ID: "node-b", Addr: "10.0.0.2:7420", Pools: map[string]int{"test": 4}}}
	tn := startNode(t, cfg)
	waitNodes(t, tn.sp, 10*time.Second, "self and node-b", func(r *snakepitv1.ListNodesResponse) bool {
		a, b := nodeByID(r, "node-a"), nodeByID(r, "node-b")
		return a != nil && a.GetHealthy() && b != nil && !b.GetSelf() && b.GetAddress() == "10.0.0.2:7420" && b.GetPools()["test"] == 4
	})
	admin := adminOverSocket(t, cfg)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := admin.Cordon(ctx, &snakepitv1.CordonRequest{}); err != nil {
		t.Fatal(err)
	}
	waitNodes(t, tn.sp, 10*time.Second, "cordon published", func(r *snakepitv1.ListNodesResponse) bool {
		a := nodeByID(r, "node-a")
		return a != nil && a.GetCordoned()
	})
}

func TestPublishAddr(t *testing.T) {
	tests := []struct {
		advertise, bound, want string
	}{
		{"", "127.0.0.1:7420", "127.0.0.1:7420"},
		{"", "0.0.0.0:7420", "127.0.0.1:7420"},
		{"", "[::]:7420", "[::1]:7420"},
		{"gpu-7.example:7420", "0.0.0.0:7420", "gpu-7.example:7420"},
		{"10.1.2.3:9000", "127.0.0.1:7420", "10.1.2.3:9000"},
	}
	for _, tt := range tests {
		bound, err := net.ResolveTCPAddr("tcp", tt.bound)
		if err != nil {
			t.Fatal(err)
		}
		if got := membership.PublishAddr(tt.advertise, bound); got != tt.want {
			t.Errorf("PublishAddr(advertise %q, bound %s) = %s, want %s", tt.advertise, tt.bound, got, tt.want)
		}
	}
}

func TestClusterConfigErrorsNameTheKey(t *testing.T) {
	tests := []struct {
		name string
		edit func(*Config)
		want string
	}{
		{"unknown kind", func(c *Config) { c.Discovery.Kind = "etcd" }, `discovery.kind must be "static" or "consul" (got "etcd")`},
		{"bad label", func(c *Config) { c.Discovery.Labels = map[string]string{"a b": "x"} }, `discovery.labels["a b"]`},
		{"bad ttl", func(c *Config) { c.Discovery.Kind = "consul"; c.Discovery.Consul.TTL = time.Millisecond }, "discovery.consul.ttl"},
		{"bad address", func(c *Config) { c.Discovery.Kind = "consul"; c.Discovery.Consul.Address = "nowhere" }, "discovery.consul.address"},
		{"wildcard listen, consul", func(c *Config) { c.Discovery.Kind = "consul"; c.Listen = "0.0.0.0:7420" }, "advertise must be set"},
		{"empty host listen, consul", func(c *Config) { c.Discovery.Kind = "consul"; c.Listen = ":7420" }, "advertise must be set"},
		{"wildcard advertise", func(c *Config) { c.Advertise = "[::]:7420" }, "advertise must not be a wildcard"},
		{"advertise port 0", func(c *Config) { c.Advertise = "host:0" }, "advertise port must be 1-65535"},
		{"static peer", func(c *Config) { c.Discovery.Static.Peers = []discovery.StaticPeer{{ID: "b", Addr: "0.0.0.0:1"}} }, "discovery.static.peers[0].addr"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cfg := testConfig(t)
			tt.edit(&cfg)
			err := cfg.Validate()
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("Validate() = %v, want an error containing %q", err, tt.want)
			}
			if strings.Contains(err.Error(), discovery.ErrBadConfig.Error()) {
				t.Errorf("Validate() = %q: the message should start with the key", err)
			}
		})
	}
	// And the wildcard is fine for a static node, and with advertise.
	for _, edit := range []func(*Config){
		func(c *Config) { c.Listen = "0.0.0.0:7420" },
		func(c *Config) { c.Discovery.Kind = "consul"; c.Listen = "0.0.0.0:7420"; c.Advertise = "10.0.0.1:7420" },
	} {
		cfg := testConfig(t)
		edit(&cfg)
		if err := cfg.Validate(); err != nil {
			t.Errorf("Validate(listen %s, advertise %q, %s) = %v, want nil", cfg.Listen, cfg.Advertise, cfg.Discovery.Kind, err)
		}
	}
}

// consulService returns the instances of service that the agent holds, by
// ID, with their check status.
func consulService(t *testing.T, a *consultest.Agent, service string) map[string]string {
	t.Helper()
	out, err := a.ServiceHealth(service)
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// With consul, a node registers once ready, lists itself from Consul's
// view, and is gone from Consul as soon as it stops.
func TestConsulRegistrationLifecycle(t *testing.T) {
	a := consultest.Start(t)
	cfg := testConfig(t)
	cfg.Discovery.Kind = discovery.KindConsul
	cfg.Discovery.Consul.Address = a.Addr
	cfg.Discovery.Consul.TTL = time.Second
	cfg.Discovery.Labels = map[string]string{"rack": "r7"}
	tn := startNode(t, cfg)
	resp := waitNodes(t, tn.sp, 5*time.Second, "self listed from consul", func(r *snakepitv1.ListNodesResponse) bool {
		n := nodeByID(r, "node-a")
		return n != nil && n.GetHealthy()
	})
	n := nodeByID(resp, "node-a")
	if resp.GetDiscovery() != "consul" || !n.GetSelf() || n.GetAddress() != tn.addr || n.GetLabels()["rack"] != "r7" || n.GetPools()["test"] != 2 {
		t.Errorf("ListNodes = %v; want node-a from consul at %s with label rack=r7 and pools test:2", resp, tn.addr)
	}
	if st := consulService(t, a, discovery.DefaultConsulService); st["node-a"] != "passing" {
		t.Fatalf("consul holds %v, want node-a passing", st)
	}
	if got := scrapeCounter(t, tn.metricsAddr, "snakepit_discovery_requests_total"); got < 2 {
		t.Errorf("snakepit_discovery_requests_total = %v, want at least the registration and a watch", got)
	}
	t0 := time.Now()
	if err := tn.stop(); err != nil {
		t.Fatal(err)
	}
	if st := consulService(t, a, discovery.DefaultConsulService); len(st) != 0 {
		t.Fatalf("after a graceful stop (%s) consul still holds %v, want the node deregistered", time.Since(t0), st)
	}
}

// Consul down at start: the node serves anyway, lists itself as not
// healthy in a stale view, and joins once Consul is up.
func TestConsulDownAtStartServesLocally(t *testing.T) {
	a := consultest.Start(t)
	a.Stop()
	cfg := testConfig(t)
	cfg.Discovery.Kind = discovery.KindConsul
	cfg.Discovery.Consul.Address = a.Addr
	cfg.Discovery.Consul.TTL = time.Second
	tn := startNode(t, cfg)
	if _, err := tn.exec(t, &snakepitv1.ExecuteRequest{Tool: "add", Args: []byte(`{"a": 1, "b": 2}`)}); err != nil {
		t.Fatalf("Execute with consul down: %v", err)
	}
	waitNodes(t, tn.sp, 10*time.Second, "stale view, self not healthy", func(r *snakepitv1.ListNodesResponse) bool {
		n := nodeByID(r, "node-a")
		return r.GetStale() && n != nil && n.GetSelf() && !n.GetHealthy()
	})
	a.Restart()
	// Backoff after failures is at most discovery.DefaultRetryMax.
	waitNodes(t, tn.sp, discovery.DefaultRetryMax+5*time.Second, "joined once consul is up", func(r *snakepitv1.ListNodesResponse) bool {
		n := nodeByID(r, "node-a")
		return !r.GetStale() && n != nil && n.GetHealthy()
	})
}

// An unreadable token file is configuration that cannot work: the node
// stops with an error naming the key.
func TestConsulBadTokenFileStopsNode(t *testing.T) {
	if testing.Short() {
		t.Skip("starts Python workers")
	}
	cfg := testConfig(t)
	cfg.Discovery.Kind = discovery.KindConsul
	cfg.Discovery.Consul.Address = "127.0.0.1:1"
	cfg.Discovery.Consul.TokenFile = "/nonexistent/token"
	errc := make(chan error, 1)
	go func() { errc <- Serve(context.Background(), cfg, zerolog.Nop(), Hooks{}) }()
	select {
	case err := <-errc:
		if err == nil || !strings.Contains(err.Error(), "discovery.consul.token_file") {
			t.Fatalf("Serve = %v, want an error naming discovery.consul.token_file", err)
		}
	case <-time.After(60 * time.Second):
		t.Fatal("Serve did not stop on an unreadable token file")
	}
}

func ExampleConfig_discovery() {
	cfg := DefaultConfig()
	cfg.NodeID = "gpu-7"
	cfg.Discovery.Kind = discovery.KindConsul
	cfg.Listen = "0.0.0.0:7420"
	fmt.Println(cfg.Validate() != nil)
	cfg.Advertise = "10.0.0.7:7420"
	fmt.Println(cfg.Validate())
	// Output:
	// true
	// <nil>
}

// scrapeCounter reads one unlabelled metric from a node's /metrics.
func scrapeCounter(t *testing.T, addr, name string) float64 {
	t.Helper()
	resp, err := http.Get("http://" + addr + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(body), "\n") {
		if v, ok := strings.CutPrefix(line, name+" "); ok {
			f, err := strconv.ParseFloat(v, 64)
			if err != nil {
				t.Fatalf("%s: %v", line, err)
			}
			return f
		}
	}
	t.Fatalf("/metrics has no %s", name)
	return 0
}
