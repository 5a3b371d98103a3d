package main

import (
	"github.com/snakepit/snakepit/pkg/agent/policy"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	"github.com/spf13/pflag"

	"github.com/snakepit/snakepit/pkg/agent"
	"github.com/snakepit/snakepit/pkg/discovery"
)

func flags(t *testing.T, args ...string) *pflag.FlagSet {
	t.Helper()
	cmd := newRootCmd(t.Context(), os.Stdout, os.Stderr)
	if err := cmd.Flags().Parse(args); err != nil {
		t.Fatal(err)
	}
	return cmd.Flags()
}

// The example config documents every key with its default value: loading
// it must give exactly the defaults of pkg/agent, so the two cannot drift.
func TestExampleConfigMatchesDefaults(t *testing.T) {
	got, err := loadConfig(flags(t), "../../configs/snakepitd.yaml")
	if err != nil {
		t.Fatal(err)
	}
	want := agent.DefaultConfig()
	pool := agent.DefaultPool(agent.DefaultPoolName, agent.DefaultAdapter)
	pool.PythonPath = []string{}
	pool.Env = map[string]string{}
	want.Pools = []agent.PoolConfig{pool}
	want.AdminIdentities = []string{}
	pool.GPUs.Pinned = []string{}
	pool.Policies.NodeFilters = []policy.Ref{}
	want.Pools = []agent.PoolConfig{pool}
	want.Discovery.Static.Peers = []discovery.StaticPeer{}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("configs/snakepitd.yaml loads as\n%+v\nwant the defaults\n%+v", got, want)
	}
	// And it names every key the code knows.
	text, err := os.ReadFile("../../configs/snakepitd.yaml")
	if err != nil {
		t.Fatal(err)
	}
	for _, typ := range []reflect.Type{reflect.TypeOf(agent.Config{}), reflect.TypeOf(agent.PoolConfig{}),
		reflect.TypeOf(agent.GPUConfig{}), reflect.TypeOf(discovery.Config{}), reflect.TypeOf(discovery.ConsulConfig{}),
		reflect.TypeOf(discovery.TLSConfig{}), reflect.TypeOf(discovery.StaticConfig{}),
		reflect.TypeOf(policy.Config{}), reflect.TypeOf(policy.Ref{})} {
		for i := 0; i < typ.NumField(); i++ {
			key := typ.Field(i).Tag.Get("mapstructure")
			if key == "-" {
				continue // not a config-file key
			}
			if !strings.Contains(string(text), "\n"+key+":") && !strings.Contains(string(text), " "+key+":") {
				t.Errorf("configs/snakepitd.yaml does not document key %q", key)
			}
		}
	}
}

func TestConfigPrecedence(t *testing.T) {
	dir := t.TempDir()
	file := filepath.Join(dir, "c.yaml")
	if err := os.WriteFile(file, []byte("listen: 127.0.0.1:1111\nnode_id: from-file\nshutdown_grace: 7s\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	t.Setenv("SNAKEPIT_NODE_ID", "from-env")
	t.Setenv("SNAKEPIT_SHUTDOWN_GRACE", "9s")
	cfg, err := loadConfig(flags(t, "--listen", "127.0.0.1:2222"), file)
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Listen != "127.0.0.1:2222" || cfg.NodeID != "from-env" || cfg.ShutdownGrace.String() != "9s" {
		t.Fatalf("config = listen %s node_id %s grace %s; want the flag's listen, the env's node_id and grace", cfg.Listen, cfg.NodeID, cfg.ShutdownGrace)
	}
}

func TestBadConfigNamesTheKey(t *testing.T) {
	tests := []struct{ name, yaml, want string }{
		{"unknown key", "listn: 1.2.3.4:5\n", "listn"},
		{"bad size", "pools:\n  - name: p\n    adapter: m\n    size: -1\n", "pools[p].size must be >0 (got -1)"},
		{"no adapter", "pools:\n  - name: p\n", "pools[p].adapter"},
		{"duplicate pool", "pools:\n  - name: p\n    adapter: m\n  - name: p\n    adapter: m\n", "used by another pool"},
		{"bad duration", "shutdown_grace: soon\n", "shutdown_grace"},
		{"bad listen", "listen: nowhere\n", "listen must be host:port"},
		{"not yaml", "pools: [\n", "read config file"},
		{"unknown discovery kind", "discovery:\n  kind: etcd\n", `discovery.kind must be "static" or "consul" (got "etcd")`},
		{"malformed label", "discovery:\n  labels:\n    \"zone/eu\": a\n", `discovery.labels["zone/eu"]: key must be 1-63 of [A-Za-z0-9_-]`},
		{"dotted label", "discovery:\n  labels:\n    \"topology.zone\": a\n", `discovery.labels[topology]`},
		{"bad consul address", "discovery:\n  kind: consul\n  consul:\n    address: ftp://x:1\n", "discovery.consul.address"},
		{"ttl too short", "discovery:\n  kind: consul\n  consul:\n    ttl: 10ms\n", "discovery.consul.ttl must be between"},
		{"unknown discovery key", "discovery:\n  consul:\n    adress: x:1\n", "adress"},
		{"wildcard listen without advertise", "listen: 0.0.0.0:7420\ndiscovery:\n  kind: consul\n", "advertise must be set"},
		{"wildcard advertise", "advertise: 0.0.0.0:7420\n", "advertise must not be a wildcard"},
		{"advertise without port", "advertise: host\n", "advertise must be host:port"},
		{"negative gpus", "pools:\n  - name: p\n    adapter: m\n    gpus:\n      per_worker: -1\n", "pools[p].gpus.per_worker must not be negative"},
		{"pinned without per_worker", "pools:\n  - name: p\n    adapter: m\n    gpus:\n      pinned: [GPU-1]\n", "pools[p].gpus.pinned needs gpus.per_worker"},
		{"gpus and CUDA_VISIBLE_DEVICES", "pools:\n  - name: p\n    adapter: m\n    env:\n      CUDA_VISIBLE_DEVICES: \"0\"\n    gpus:\n      per_worker: 1\n", "pools[p].env.CUDA_VISIBLE_DEVICES conflicts"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			file := filepath.Join(t.TempDir(), "c.yaml")
			if err := os.WriteFile(file, []byte(tt.yaml), 0o644); err != nil {
				t.Fatal(err)
			}
			_, err := loadConfig(flags(t), file)
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("loadConfig(%q) = %v, want an error mentioning %q", tt.yaml, err, tt.want)
			}
		})
	}
}

func TestMissingConfigFile(t *testing.T) {
	_, err := loadConfig(flags(t), "/nonexistent/snakepitd.yaml")
	if err == nil || !strings.Contains(err.Error(), "/nonexistent/snakepitd.yaml") {
		t.Fatalf("loadConfig(missing) = %v, want an error naming the file", err)
	}
}

// Keys of env maps are case-sensitive: the configuration library
// lowercases keys, and loadConfig must undo that for them.
func TestEnvKeysKeepTheirCase(t *testing.T) {
	for _, tc := range []struct{ ext, body string }{
		{".yaml", "pools:\n  - name: p\n    adapter: m\n    env: {OMP_NUM_THREADS: \"7\", MixedCase: x}\n"},
		{".json", `{"pools": [{"name": "p", "adapter": "m", "env": {"OMP_NUM_THREADS": "7", "MixedCase": "x"}}]}`},
		{".toml", "[[pools]]\nname = \"p\"\nadapter = \"m\"\n[pools.env]\nOMP_NUM_THREADS = \"7\"\nMixedCase = \"x\"\n"},
	} {
		file := filepath.Join(t.TempDir(), "c"+tc.ext)
		if err := os.WriteFile(file, []byte(tc.body), 0o644); err != nil {
			t.Fatal(err)
		}
		cfg, err := loadConfig(flags(t), file)
		if err != nil {
			t.Fatalf("%s: %v", tc.ext, err)
		}
		if got := cfg.Pools[0].Env; got["OMP_NUM_THREADS"] != "7" || got["MixedCase"] != "x" {
			t.Errorf("%s: env = %v, want the keys as written", tc.ext, got)
		}
	}
}

// Every scalar key can come from the environment, nested ones too.
func TestEnvironmentOverridesNestedKeys(t *testing.T) {
	t.Setenv("SNAKEPIT_DISCOVERY_KIND", "nosuchkind")
	_, err := loadConfig(flags(t), "")
	if err == nil || !strings.Contains(err.Error(), "discovery.kind") {
		t.Fatalf("SNAKEPIT_DISCOVERY_KIND=nosuchkind: %v, want an error naming discovery.kind", err)
	}
	t.Setenv("SNAKEPIT_DISCOVERY_KIND", "static")
	t.Setenv("SNAKEPIT_MAX_SESSIONS", "17")
	cfg, err := loadConfig(flags(t), "")
	if err != nil || cfg.MaxSessions != 17 {
		t.Fatalf("SNAKEPIT_MAX_SESSIONS=17: %d, %v", cfg.MaxSessions, err)
	}
}
