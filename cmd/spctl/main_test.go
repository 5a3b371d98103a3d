package main

import (
	"bytes"
	"context"
	"encoding/json"
	"net"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/rs/zerolog"
	"go.uber.org/goleak"

	"github.com/snakepit/snakepit/internal/freeport"
	"github.com/snakepit/snakepit/pkg/agent"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// startNode serves the default config (the example adapter) in-process and
// returns its address and admin socket.
func startNodeAdmin(t *testing.T) (string, string) {
	t.Helper()
	dir := t.TempDir()
	return startNodeIn(t, dir), filepath.Join(dir, "admin.sock")
}

// startNode serves the default config (the example adapter) in-process.
func startNode(t *testing.T) string { return startNodeIn(t, t.TempDir()) }

func startNodeIn(t *testing.T, stateDir string) string {
	t.Helper()
	cfg := agent.DefaultConfig()
	cfg.NodeID = "node-t"
	cfg.Listen = "127.0.0.1:0"
	cfg.MetricsListen = "127.0.0.1:0"
	cfg.StateDir = stateDir
	ctx, cancel := context.WithCancel(context.Background())
	addr := make(chan string, 1)
	ready := make(chan struct{})
	errc := make(chan error, 1)
	go func() {
		errc <- agent.Serve(ctx, cfg, zerolog.Nop(), agent.Hooks{
			Listening: func(a net.Addr) { addr <- a.String() },
			Ready:     func() { close(ready) },
		})
	}()
	a := <-addr
	select {
	case <-ready:
	case err := <-errc:
		t.Fatal(err)
	case <-time.After(60 * time.Second):
		t.Fatal("node not ready")
	}
	t.Cleanup(func() {
		cancel()
		if err := <-errc; err != nil {
			t.Error(err)
		}
	})
	return a
}

func spctl(t *testing.T, args ...string) (code int, stdout, stderr string) {
	t.Helper()
	var o, e bytes.Buffer
	code = run(context.Background(), args, &o, &e)
	return code, o.String(), e.String()
}

func TestSpctl(t *testing.T) {
	addr := startNode(t)
	tests := []struct {
		name     string
		args     []string
		code     int
		stdout   []string // substrings
		stderr   []string
		jsonKeys []string // with -o json: top-level keys that must be present
	}{
		{name: "exec", args: []string{"exec", "add", "--args", `{"a": 1, "b": 2}`}, stdout: []string{"3\n"}, stderr: []string{"ran on node node-t, pool default, worker"}},
		{name: "exec json", args: []string{"exec", "echo", "--args", `{"x": [1]}`, "-o", "json"}, stdout: []string{`"x": [`}, jsonKeys: []string{"result", "node_id", "pool", "worker_id", "worker_generation", "queued", "ran", "request_id"}},
		{name: "exec session", args: []string{"exec", "note", "--args", `{"text": "hi"}`, "--session", "s1"}, stdout: []string{`"hi"`}, stderr: []string{"session new"}},
		{name: "exec stream", args: []string{"exec", "count", "--args", `{"n": 3}`, "--stream"}, stdout: []string{"0\n1\n2\n"}, stderr: []string{"ran on node"}},
		{name: "tools", args: []string{"tools"}, stdout: []string{"POOL", "TOOL", "add", "(a: float, b: float)", "count (stream)"}},
		{name: "tools json", args: []string{"tools", "-o", "json"}, jsonKeys: []string{"tools"}},
		{name: "status", args: []string{"status"}, stdout: []string{"node node-t", "POOL", "default", "ready", "WORKER", "GENERATION"}},
		{name: "status json", args: []string{"status", "-o", "json"}, jsonKeys: []string{"node_id", "version", "pools"}},
		{name: "sessions", args: []string{"sessions"}, stdout: []string{"SESSION", "s1", "default"}},
		{name: "unknown tool", args: []string{"exec", "nope"}, code: 1, stderr: []string{"NotFound", `no tool "nope"`, "add"}},
		{name: "tool raises", args: []string{"exec", "fail", "--args", `{"message": "kaput"}`}, code: 1, stderr: []string{"ValueError: kaput", "Python traceback", "example.py"}},
		{name: "bad json", args: []string{"exec", "add", "--args", `{oops`}, code: 2, stderr: []string{"--args is not valid JSON"}},
		{name: "no tool", args: []string{"exec"}, code: 2, stderr: []string{"exactly one TOOL", "spctl tools"}},
		{name: "bad output", args: []string{"status", "-o", "yaml"}, code: 2, stderr: []string{"-o must be table or json"}},
		{name: "bad affinity", args: []string{"exec", "add", "--affinity", "sticky"}, code: 2, stderr: []string{"--affinity must be"}},
		{name: "close session", args: []string{"sessions", "--close", "s1"}, stdout: []string{"closed session s1"}},
		{name: "close unknown session", args: []string{"sessions", "--close", "nope"}, code: 1, stderr: []string{`no session "nope"`}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			code, out, errOut := spctl(t, append([]string{"--addr", addr}, tt.args...)...)
			if code != tt.code {
				t.Fatalf("spctl %v exit %d, want %d\nstdout: %s\nstderr: %s", tt.args, code, tt.code, out, errOut)
			}
			for _, s := range tt.stdout {
				if !strings.Contains(out, s) {
					t.Errorf("stdout does not contain %q:\n%s", s, out)
				}
			}
			for _, s := range tt.stderr {
				if !strings.Contains(errOut, s) {
					t.Errorf("stderr does not contain %q:\n%s", s, errOut)
				}
			}
			if len(tt.jsonKeys) > 0 {
				var m map[string]any
				if err := json.Unmarshal([]byte(out), &m); err != nil {
					t.Fatalf("-o json output is not one JSON object: %v\n%s", err, out)
				}
				for _, k := range tt.jsonKeys {
					if _, ok := m[k]; !ok {
						t.Errorf("JSON output lacks %q: %s", k, out)
					}
				}
			}
		})
	}
}

func TestSpctlNoNode(t *testing.T) {
	addr := freeport.MustAddr(t) // nothing listens there
	code, _, errOut := spctl(t, "--addr", addr, "--timeout", "2s", "status")
	if code != 1 || !strings.Contains(errOut, "make run") {
		t.Fatalf("spctl against no node: exit %d, stderr %q; want 1 and a hint to start one", code, errOut)
	}
}

func TestSpctlAddressFromEnvironment(t *testing.T) {
	addr := startNode(t)
	t.Setenv("SNAKEPIT_ADDR", addr)
	if code, out, errOut := spctl(t, "exec", "upper", "--args", `{"text": "env"}`); code != 0 || !strings.Contains(out, `"ENV"`) {
		t.Fatalf("spctl with $SNAKEPIT_ADDR: %d %q %q", code, out, errOut)
	}
}

func TestSpctlAdmin(t *testing.T) {
	addr, sock := startNodeAdmin(t)
	t.Setenv("SNAKEPIT_ADMIN_SOCKET", sock)
	steps := []struct {
		args   []string
		code   int
		stdout string
		stderr string
	}{
		{[]string{"cordon"}, 0, "cordoned: true", ""},
		{[]string{"uncordon"}, 0, "cordoned: false", ""},
		{[]string{"resize", "default", "3"}, 0, "pool default: 2 -> 3 workers", ""},
		{[]string{"workers"}, 0, "GENERATION", ""},
		{[]string{"workers", "-o", "json"}, 0, `"workers"`, ""},
		{[]string{"resize", "default", "zero"}, 2, "", "SIZE must be a positive whole number"},
		{[]string{"resize", "default"}, 2, "", "resize takes POOL and SIZE"},
		{[]string{"resize", "nope", "2"}, 1, "", `no pool "nope"`},
		{[]string{"version", "--addr", addr}, 0, "snakepitd", ""},
		{[]string{"status", "--cluster"}, 0, "TOTAL (1/1 nodes)", ""},
		{[]string{"status", "--cluster", "-o", "json"}, 0, `"totals"`, ""},
		{[]string{"drain", "--dry-run"}, 0, "SESSION", ""},
		{[]string{"drain", "--wait", "--deadline", "10s"}, 0, "drained (0 calls cancelled", ""},
		{[]string{"exec", "noop", "--addr", addr}, 1, "", "node is draining"},
		{[]string{"uncordon"}, 0, "draining: false", ""},
		{[]string{"exec", "noop", "--addr", addr}, 0, "null", ""},
	}
	for _, s := range steps {
		code, out, errOut := spctl(t, s.args...)
		if code != s.code || !strings.Contains(out, s.stdout) || !strings.Contains(errOut, s.stderr) {
			t.Errorf("spctl %v = %d\nstdout: %s\nstderr: %s\nwant %d, stdout containing %q, stderr containing %q", s.args, code, out, errOut, s.code, s.stdout, s.stderr)
		}
	}
	// Over TCP without a token the node refuses, and spctl says what to do.
	code, _, errOut := spctl(t, "--addr", addr, "cordon")
	if code != 1 || !strings.Contains(errOut, "PermissionDenied") || !strings.Contains(errOut, "admin socket") {
		t.Errorf("cordon over TCP without a token: %d %q", code, errOut)
	}
	// No socket where spctl looks: a clear error.
	t.Setenv("SNAKEPIT_ADMIN_SOCKET", filepath.Join(t.TempDir(), "none.sock"))
	if code, _, errOut := spctl(t, "cordon"); code != 1 || !strings.Contains(errOut, "no admin socket at") {
		t.Errorf("cordon without a socket: %d %q", code, errOut)
	}
}
