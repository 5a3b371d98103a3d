package main

import (
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	"github.com/spf13/pflag"

	"github.com/snakepit/snakepit/pkg/agent"
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
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("configs/snakepitd.yaml loads as\n%+v\nwant the defaults\n%+v", got, want)
	}
	// And it names every key the code knows.
	text, err := os.ReadFile("../../configs/snakepitd.yaml")
	if err != nil {
		t.Fatal(err)
	}
	for _, typ := range []reflect.Type{reflect.TypeOf(agent.Config{}), reflect.TypeOf(agent.PoolConfig{})} {
		for i := 0; i < typ.NumField(); i++ {
			key := typ.Field(i).Tag.Get("mapstructure")
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
