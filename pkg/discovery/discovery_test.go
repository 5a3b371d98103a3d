package discovery

import (
	"context"
	"errors"
	"reflect"
	"strings"
	"testing"
	"testing/synctest"
	"time"
)

func TestNodeValidate(t *testing.T) {
	long := strings.Repeat("x", 300)
	manyPools := map[string]PoolOffer{}
	for i := range 60 {
		manyPools["pool-with-a-long-name-"+itoaPad(i)] = PoolOffer{Slots: 1000}
	}
	manyLabels := map[string]string{}
	for i := range MaxLabels + 1 {
		manyLabels["k"+itoaPad(i)] = "v"
	}
	tests := []struct {
		name   string
		mutate func(*Node)
		want   string // substring of the error; "" = valid
	}{
		{"valid", func(*Node) {}, ""},
		{"empty id", func(n *Node) { n.ID = "" }, "node id"},
		{"id with slash", func(n *Node) { n.ID = "a/b" }, "node id"},
		{"id too long", func(n *Node) { n.ID = NodeID(long) }, "node id"},
		{"no port", func(n *Node) { n.Addr = "127.0.0.1" }, "node addr"},
		{"empty host", func(n *Node) { n.Addr = ":7000" }, "host is empty"},
		{"wildcard v4", func(n *Node) { n.Addr = "0.0.0.0:7000" }, "wildcard"},
		{"wildcard v6", func(n *Node) { n.Addr = "[::]:7000" }, "wildcard"},
		{"port 0", func(n *Node) { n.Addr = "h:0" }, "port must be"},
		{"port too big", func(n *Node) { n.Addr = "h:70000" }, "port must be"},
		{"hostname ok", func(n *Node) { n.Addr = "gpu-7.example.com:7000" }, ""},
		{"ipv6 ok", func(n *Node) { n.Addr = "[fd00::1]:7000" }, ""},
		{"version control char", func(n *Node) { n.Version = "1\n2" }, "node version"},
		{"version too long", func(n *Node) { n.Version = long }, "node version"},
		{"proto inverted", func(n *Node) { n.ProtoMin, n.ProtoMax = 3, 2 }, "protocol range"},
		{"proto negative", func(n *Node) { n.ProtoMin = -1 }, "protocol range"},
		{"pool bad name", func(n *Node) { n.Pools = map[string]PoolOffer{"a,b": {1}} }, `pool name "a,b"`},
		{"pool negative slots", func(n *Node) { n.Pools = map[string]PoolOffer{"a": {-1}} }, "slots must be >= 0"},
		{"pools too long for meta", func(n *Node) { n.Pools = manyPools }, "over the 512"},
		{"gpu negative", func(n *Node) { n.GPUs.Count = -1 }, "gpu count"},
		{"gpu model empty", func(n *Node) { n.GPUs.Models = []string{""} }, "gpu model"},
		{"gpu model with comma ok", func(n *Node) { n.GPUs.Models = []string{"A, rev 2"} }, ""},
		{"label key dot", func(n *Node) { n.Labels = map[string]string{"topology.zone": "a"} }, `labels["topology.zone"]`},
		{"label key empty", func(n *Node) { n.Labels = map[string]string{"": "a"} }, `labels[""]`},
		{"label value control", func(n *Node) { n.Labels = map[string]string{"zone": "a\x00"} }, `labels["zone"]: value`},
		{"label value too long", func(n *Node) { n.Labels = map[string]string{"zone": long} }, `labels["zone"]: value`},
		{"too many labels", func(n *Node) { n.Labels = manyLabels }, "at most 32"},
		{"digest with space", func(n *Node) { n.ToolsDigest = "a b" }, "tools digest"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			n := testNode("node-a", 7000)
			tt.mutate(&n)
			err := n.Validate()
			if tt.want == "" {
				if err != nil {
					t.Fatalf("Validate() = %v, want nil", err)
				}
				return
			}
			wantErr(t, err, ErrInvalidNode, tt.want)
		})
	}
}

func itoaPad(i int) string { return string(rune('a'+i/26)) + string(rune('a'+i%26)) }

func TestConfigValidate(t *testing.T) {
	tests := []struct {
		name   string
		mutate func(*Config)
		want   []string // substrings of the error; nil = valid
	}{
		{"default", func(*Config) {}, nil},
		{"consul defaults", func(c *Config) { c.Kind = KindConsul }, nil},
		{"unknown kind", func(c *Config) { c.Kind = "etcd" }, []string{"discovery.kind", `"etcd"`}},
		{"empty kind", func(c *Config) { c.Kind = "" }, []string{"discovery.kind"}},
		{"bad label", func(c *Config) { c.Labels = map[string]string{"a b": "x"} }, []string{`discovery.labels["a b"]`}},
		{"bad label value", func(c *Config) { c.Labels = map[string]string{"zone": "\t"} }, []string{`discovery.labels["zone"]`}},
		{"address no port", func(c *Config) { c.Kind = KindConsul; c.Consul.Address = "consul.local" }, []string{"discovery.consul.address"}},
		{"address bad scheme", func(c *Config) { c.Kind = KindConsul; c.Consul.Address = "ftp://h:1" }, []string{"discovery.consul.address", "scheme"}},
		{"address empty", func(c *Config) { c.Kind = KindConsul; c.Consul.Address = "" }, []string{"discovery.consul.address"}},
		{"address https ok", func(c *Config) { c.Kind = KindConsul; c.Consul.Address = "https://consul:8501" }, nil},
		{"address unix ok", func(c *Config) { c.Kind = KindConsul; c.Consul.Address = "unix:///run/consul.sock" }, nil},
		{"ttl too short", func(c *Config) { c.Kind = KindConsul; c.Consul.TTL = 100 * time.Millisecond }, []string{"discovery.consul.ttl", "100ms"}},
		{"dereg too short", func(c *Config) { c.Kind = KindConsul; c.Consul.DeregisterCriticalAfter = 10 * time.Second }, []string{"discovery.consul.deregister_critical_after"}},
		{"watch wait too long", func(c *Config) { c.Kind = KindConsul; c.Consul.WatchWait = time.Hour }, []string{"discovery.consul.watch_wait"}},
		{"update interval negative", func(c *Config) { c.Kind = KindConsul; c.Consul.UpdateInterval = -1 }, []string{"discovery.consul.update_interval"}},
		{"token and file", func(c *Config) { c.Kind = KindConsul; c.Consul.Token = "t"; c.Consul.TokenFile = "/f" }, []string{"discovery.consul.token and discovery.consul.token_file"}},
		{"service name", func(c *Config) { c.Kind = KindConsul; c.Consul.Service = "a.b" }, []string{"discovery.consul.service"}},
		{"cert without key", func(c *Config) { c.Kind = KindConsul; c.Consul.TLS.CertFile = "c.pem" }, []string{"discovery.consul.tls.cert_file"}},
		{"consul keys ignored for static", func(c *Config) { c.Consul.TTL = 0 }, nil},
		{"static peer bad addr", func(c *Config) { c.Static.Peers = []StaticPeer{{ID: "b", Addr: "nope"}} }, []string{"discovery.static.peers[0].addr"}},
		{"static peer dup", func(c *Config) {
			c.Static.Peers = []StaticPeer{{ID: "b", Addr: "h:1"}, {ID: "b", Addr: "h:2"}}
		}, []string{"discovery.static.peers[1].id", "twice"}},
		{"static peer bad label", func(c *Config) {
			c.Static.Peers = []StaticPeer{{ID: "b", Addr: "h:1", Labels: map[string]string{"x.y": "z"}}}
		}, []string{"discovery.static.peers[0]", `labels["x.y"]`}},
		{"several errors at once", func(c *Config) {
			c.Kind = KindConsul
			c.Consul.TTL = 0
			c.Consul.Address = "x"
		}, []string{"discovery.consul.ttl", "discovery.consul.address"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := DefaultConfig()
			tt.mutate(&c)
			err := c.Validate()
			if tt.want == nil {
				if err != nil {
					t.Fatalf("Validate() = %v, want nil", err)
				}
				return
			}
			wantErr(t, err, ErrBadConfig, tt.want...)
			_, _, nerr := New(c, testLoggerNop())
			if nerr == nil {
				t.Errorf("New accepted a config that Validate rejects")
			}
		})
	}
}

func TestMetaRoundTrip(t *testing.T) {
	n := testNode("node-a", 7001)
	n.GPUs.Models = []string{"A, rev 2", "B%C", "NVIDIA H100 80GB HBM3"}
	n.Cordoned, n.Draining = true, true
	n.Labels = map[string]string{"zone": "eu-west-1a", "rack": "r 7, row 2"}
	meta := encodeMeta(n)
	if len(meta) > 64 {
		t.Errorf("%d meta keys, Consul allows 64", len(meta))
	}
	for k, v := range meta {
		if len(v) > 512 || len(k) > 128 {
			t.Errorf("meta %s too long", k)
		}
	}
	if got, want := meta["pools"], "default:4,gpu:2"; got != want {
		t.Errorf("meta pools = %q, want %q", got, want)
	}
	got, err := decodeNode("node-a", "127.0.0.1", 7001, meta)
	if err != nil {
		t.Fatalf("decodeNode: %v", err)
	}
	if !reflect.DeepEqual(got, n) {
		t.Errorf("round trip:\n got %+v\nwant %+v", got, n)
	}
}

func TestMetaDecodeRejects(t *testing.T) {
	good := encodeMeta(testNode("node-a", 7001))
	tests := []struct {
		name string
		set  map[string]string
		del  string
		host string
		port int
		want string
	}{
		{name: "no meta_v", del: "meta_v", want: "no meta_v"},
		{name: "future meta_v", set: map[string]string{"meta_v": "2"}, want: `meta_v="2"`},
		{name: "bad proto", set: map[string]string{"proto": "3"}, want: "proto"},
		{name: "inverted proto", set: map[string]string{"proto": "3-1"}, want: "proto"},
		{name: "bad pools", set: map[string]string{"pools": "a:1,b"}, want: "pools"},
		{name: "negative slots", set: map[string]string{"pools": "a:-1"}, want: "pools"},
		{name: "duplicate pool", set: map[string]string{"pools": "a:1,a:2"}, want: "twice"},
		{name: "bad gpus", set: map[string]string{"gpus": "eight"}, want: "gpus"},
		{name: "bad gpu_mem", set: map[string]string{"gpu_mem": "-1"}, want: "gpu_mem"},
		{name: "bad gpu model escape", set: map[string]string{"gpu_models": "a%zz"}, want: "gpu_models"},
		{name: "bad bool", set: map[string]string{"cordoned": "maybe"}, want: "cordoned"},
		{name: "no address", host: "-", want: "not dialable"},
		{name: "no port", port: -1, want: "not dialable"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			meta := make(map[string]string)
			for k, v := range good {
				meta[k] = v
			}
			for k, v := range tt.set {
				meta[k] = v
			}
			delete(meta, tt.del)
			host, port := "10.0.0.1", 7001
			if tt.host == "-" {
				host = ""
			}
			if tt.port == -1 {
				port = 0
			}
			_, err := decodeNode("node-a", host, port, meta)
			wantErr(t, err, nil, tt.want)
		})
	}
	// Unknown keys from newer versions are ignored.
	meta := map[string]string{"meta_v": "1", "new_thing": "x"}
	if _, err := decodeNode("n", "h", 1, meta); err != nil {
		t.Errorf("unknown key: %v", err)
	}
}

func TestBackoff(t *testing.T) {
	lo, hi := 200*time.Millisecond, 10*time.Second
	for _, r := range []float64{0, 0.5, 0.999} {
		prev := time.Duration(0)
		for f := 1; f <= 20; f++ {
			d := backoff(f, lo, hi, func() float64 { return r })
			if d < lo/2 || d > hi {
				t.Errorf("backoff(%d, r=%v) = %v, want within [%v, %v]", f, r, d, lo/2, hi)
			}
			if d < prev {
				t.Errorf("backoff(%d, r=%v) = %v < backoff(%d) = %v", f, r, d, f-1, prev)
			}
			prev = d
		}
		if d := backoff(20, lo, hi, func() float64 { return r }); d < hi/2 {
			t.Errorf("backoff(20) = %v, want >= %v (capped at max)", d, hi/2)
		}
	}
}

func TestRegistrarPlan(t *testing.T) {
	t0 := time.Unix(1_000_000, 0)
	ttl, interval := 15*time.Second, 10*time.Second
	node := &Node{ID: "n"}
	registered := func() regState {
		return regState{node: node, gen: 1, pubGen: 1, healthy: true, healthGen: 1, pubHealthGen: 1,
			registered: true, lastPublish: t0, lastRefresh: t0}
	}
	tests := []struct {
		name     string
		st       func() regState
		at       time.Duration // since t0
		wantAct  regAction
		wantWait time.Duration
	}{
		{"nothing registered", func() regState { return regState{} }, 0, actNone, time.Hour},
		{"deregistered", func() regState { s := registered(); s.deregistered = true; return s }, 0, actNone, time.Hour},
		{"not yet registered", func() regState { s := registered(); s.registered = false; return s }, 0, actRegister, 0},
		{"backing off", func() regState {
			s := registered()
			s.registered = false
			s.retryAt = t0.Add(3 * time.Second)
			return s
		}, time.Second, actNone, 2 * time.Second},
		{"refresh not due", registered, 2 * time.Second, actNone, 3 * time.Second},
		{"refresh due at ttl/3", registered, 5 * time.Second, actSetCheck, 0},
		{"unhealthy: no refresh", func() regState { s := registered(); s.healthy = false; return s }, time.Minute, actNone, time.Hour},
		{"health changed", func() regState { s := registered(); s.healthGen = 2; return s }, time.Second, actSetCheck, 0},
		{"update rate-limited", func() regState { s := registered(); s.gen = 2; return s }, 4 * time.Second, actNone, time.Second},
		{"update rate-limited, waits past refresh", func() regState { s := registered(); s.gen = 2; s.lastRefresh = t0.Add(4 * time.Second); return s }, 4 * time.Second, actNone, 5 * time.Second},
		{"update due", func() regState { s := registered(); s.gen = 2; return s }, interval, actRegister, 0},
		{"urgent update", func() regState { s := registered(); s.gen = 2; s.urgent = true; return s }, time.Second, actRegister, 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			st := tt.st()
			act, wait := st.plan(t0.Add(tt.at), ttl, interval)
			if act != tt.wantAct || wait != tt.wantWait {
				t.Errorf("plan(t0+%v) = %v, %v, want %v, %v", tt.at, act, wait, tt.wantAct, tt.wantWait)
			}
		})
	}
}

func TestSnapshotPublisher(t *testing.T) {
	p := newPublisher()
	s0 := p.current()
	if s0.Seq() != 0 || s0.Len() != 0 {
		t.Fatalf("initial snapshot seq=%d len=%d, want 0, 0", s0.Seq(), s0.Len())
	}
	now := time.Unix(1, 0)
	peers := []Peer{{Node: Node{ID: "b"}}, {Node: Node{ID: "a"}}, {Node: Node{ID: "c"}}}
	if !p.publish(peers, false, nil, now) {
		t.Fatal("first publish did nothing")
	}
	select {
	case <-s0.Changed():
	default:
		t.Fatal("Changed of the replaced snapshot is not closed")
	}
	s1 := p.current()
	if got := peerIDs(s1); !reflect.DeepEqual(got, []NodeID{"a", "b", "c"}) {
		t.Errorf("peers = %v, want sorted [a b c]", got)
	}
	if _, ok := s1.Lookup("b"); !ok {
		t.Errorf("Lookup(b) found nothing")
	}
	if _, ok := s1.Lookup("z"); ok {
		t.Errorf("Lookup(z) found a peer")
	}
	// Peers returns a copy: sorting it must not change the snapshot.
	cp := s1.Peers()
	cp[0], cp[2] = cp[2], cp[0]
	if got := peerIDs(s1); got[0] != "a" {
		t.Errorf("snapshot changed through Peers(): %v", got)
	}
	// Same content: no new snapshot.
	if p.publish([]Peer{{Node: Node{ID: "c"}}, {Node: Node{ID: "a"}}, {Node: Node{ID: "b"}}}, false, nil, now) {
		t.Errorf("publishing equal peers made a new snapshot")
	}
	select {
	case <-s1.Changed():
		t.Fatal("Changed closed without a change")
	default:
	}
	err := errors.New("boom")
	if !p.markStale(err, now) {
		t.Fatal("markStale did nothing")
	}
	s2 := p.current()
	if !s2.Stale() || s2.Err() != err || s2.Len() != 3 || s2.Seq() != 2 {
		t.Errorf("stale snapshot: stale=%v err=%v len=%d seq=%d", s2.Stale(), s2.Err(), s2.Len(), s2.Seq())
	}
}

func TestStatic(t *testing.T) {
	cfg := DefaultConfig()
	cfg.Labels = map[string]string{"zone": "a"}
	cfg.Static.Peers = []StaticPeer{
		{ID: "node-b", Addr: "10.0.0.2:7000", Pools: map[string]int{"default": 4}},
		{ID: "node-a", Addr: "stale-config:1"},
	}
	r, d, err := NewStatic(cfg)
	if err != nil {
		t.Fatal(err)
	}
	s := d.Current()
	if s.Seq() != 1 || !reflect.DeepEqual(peerIDs(s), []NodeID{"node-a", "node-b"}) {
		t.Fatalf("initial snapshot seq=%d peers=%v, want 1 [node-a node-b]", s.Seq(), peerIDs(s))
	}
	if b, _ := s.Lookup("node-b"); b.Pools["default"].Slots != 4 || !b.Healthy || b.Source != SourceStatic {
		t.Errorf("node-b = %+v", b)
	}
	if err := r.Update(testNode("node-a", 7001)); !errors.Is(err, ErrNotRegistered) {
		t.Errorf("Update before Register = %v, want ErrNotRegistered", err)
	}
	n := testNode("node-a", 7001)
	n.Labels = nil
	if err := r.Register(context.Background(), n); err != nil {
		t.Fatal(err)
	}
	// Registered but not healthy yet: the config entry for our own ID is
	// replaced, and we are not listed.
	if got := peerIDs(d.Current()); !reflect.DeepEqual(got, []NodeID{"node-b"}) {
		t.Errorf("registered, unhealthy: peers = %v, want [node-b]", got)
	}
	r.SetHealthy(true)
	self, ok := d.Current().Lookup("node-a")
	if !ok || self.Addr != "127.0.0.1:7001" || self.Labels["zone"] != "a" {
		t.Errorf("self = %+v, %v; want our Node with the configured labels", self, ok)
	}
	n.Cordoned = true
	if err := r.Update(n); err != nil {
		t.Fatal(err)
	}
	if self, _ := d.Current().Lookup("node-a"); !self.Cordoned {
		t.Errorf("Update not visible: %+v", self)
	}
	if err := r.Update(testNode("other", 1)); !errors.Is(err, ErrInvalidNode) {
		t.Errorf("Update with another ID = %v, want ErrInvalidNode", err)
	}
	if err := r.Deregister(context.Background()); err != nil {
		t.Fatal(err)
	}
	if got := peerIDs(d.Current()); !reflect.DeepEqual(got, []NodeID{"node-b"}) {
		t.Errorf("after Deregister: peers = %v, want [node-b]", got)
	}
}

func TestStandaloneIsClusterOfOne(t *testing.T) {
	reg, dir, err := New(DefaultConfig(), testLoggerNop())
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := reg.(RequestCounter); ok {
		t.Errorf("static registrar claims to count requests")
	}
	synctest.Test(t, func(t *testing.T) {
		ctx, cancel := context.WithCancel(t.Context())
		done := make(chan error, 2)
		go func() { done <- reg.Run(ctx) }()
		go func() { done <- dir.Run(ctx) }()
		s := dir.Current()
		if err := reg.Register(ctx, testNode("solo", 7000)); err != nil {
			t.Fatal(err)
		}
		reg.SetHealthy(true)
		select {
		case <-s.Changed():
		default:
			t.Fatal("no new snapshot after Register+SetHealthy")
		}
		if got := peerIDs(dir.Current()); !reflect.DeepEqual(got, []NodeID{"solo"}) {
			t.Errorf("peers = %v, want [solo]", got)
		}
		cancel()
		for range 2 {
			if err := <-done; err != nil {
				t.Errorf("Run = %v, want nil on cancellation", err)
			}
		}
	})
}

func TestRegisterRejectsInvalidNode(t *testing.T) {
	cfg := DefaultConfig()
	cfg.Kind = KindConsul
	cfg.Consul.Address = "127.0.0.1:1" // never contacted: validation fails first
	r, err := NewConsulRegistrar(cfg, testLoggerNop())
	if err != nil {
		t.Fatal(err)
	}
	n := testNode("node-a", 7001)
	n.Addr = "0.0.0.0:7001"
	wantErr(t, r.Register(context.Background(), n), ErrInvalidNode, "wildcard")
	if r.Requests() != 0 {
		t.Errorf("%d requests for an invalid node, want 0", r.Requests())
	}
	if err := r.Update(testNode("node-a", 7001)); !errors.Is(err, ErrNotRegistered) {
		t.Errorf("Update before Register = %v, want ErrNotRegistered", err)
	}
}

func TestBadTokenFileFailsRun(t *testing.T) {
	cfg := DefaultConfig()
	cfg.Kind = KindConsul
	cfg.Consul.TokenFile = t.TempDir() + "/missing"
	d, err := NewConsulDirectory(cfg, testLoggerNop())
	if err != nil {
		t.Fatal(err)
	}
	err = d.Run(context.Background())
	wantErr(t, err, ErrBadConfig, "discovery.consul.token_file")
}
