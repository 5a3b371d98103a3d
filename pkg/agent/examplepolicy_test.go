package agent_test

import (
	"context"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"github.com/snakepit/snakepit/pkg/agent"
	"github.com/snakepit/snakepit/pkg/agent/policy"
	"github.com/snakepit/snakepit/pkg/client"
	snakepitv1 "github.com/snakepit/snakepit/proto/snakepit/v1"
)

// example:begin

// firstFree is a worker selector: the first worker with a free slot, in
// the pool's order. It counts its picks, so that a test can see it chosen.
type firstFree struct{ picks *atomic.Int64 }

func (f firstFree) Pick(ws policy.Workers, p policy.Purpose) int {
	if p.Bound >= 0 && ws.At(p.Bound).HasRoom() {
		return p.Bound // a session's own worker, while it has room
	}
	for i := range ws.Len() {
		if w := ws.At(i); w.Free() && (!p.NewSession || w.SessionRoom) {
			f.picks.Add(1)
			return i
		}
	}
	return -1 // none free: the pool's queue policy decides
}

// registry returns the shipped policies plus first_free.
func registry(picks *atomic.Int64) *policy.Registry {
	reg := policy.Builtin()
	err := reg.RegisterWorker("first_free", func(env policy.Env, opts policy.Options) (policy.WorkerSelector, error) {
		// No options: Err reports any given, naming its key.
		return firstFree{picks: picks}, env.Options(opts).Err()
	})
	if err != nil {
		panic(err)
	}
	return reg
}

// example:end

// A policy registered from outside the packages is selected by name in a
// pool's config and used by the node.
func TestCustomPolicySelectedByConfig(t *testing.T) {
	if testing.Short() {
		t.Skip("starts Python workers")
	}
	var picks atomic.Int64
	adapter, err := filepath.Abs("testdata/tools.py")
	if err != nil {
		t.Fatal(err)
	}
	cfg := agent.Config{
		NodeID: "node-a", Listen: "127.0.0.1:0", MetricsListen: "off", AdminSocket: "off", StateDir: t.TempDir(),
		Pools: []agent.PoolConfig{{Name: "test", Adapter: adapter, Size: 2,
			Policies: policy.Config{Worker: policy.Ref{Name: "first_free"}}}},
		Policies: registry(&picks),
	}
	ctx, cancel := context.WithCancel(context.Background())
	addr := make(chan string, 1)
	ready := make(chan struct{})
	done := make(chan error, 1)
	go func() {
		done <- agent.Serve(ctx, cfg, zerolog.Nop(), agent.Hooks{
			Listening: func(a net.Addr) { addr <- a.String() },
			Ready:     func() { close(ready) },
		})
	}()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Serve = %v", err)
		}
	})
	select {
	case <-ready:
	case err := <-done:
		t.Fatalf("Serve: %v", err)
	case <-time.After(60 * time.Second):
		t.Fatal("node not ready within 60s")
	}
	c, err := client.Dial(<-addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	cctx, ccancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer ccancel()
	for range 3 {
		if _, err := c.Snakepit.Execute(cctx, &snakepitv1.ExecuteRequest{Pool: "test", Tool: "noop"}); err != nil {
			t.Fatal(err)
		}
	}
	if n := picks.Load(); n != 3 {
		t.Fatalf("first_free picked %d times for 3 calls, want 3", n)
	}

	// Unknown to the shipped registry: a config error naming the key and
	// the known names.
	cfg.Policies = nil
	err = cfg.Validate()
	if err == nil || !strings.Contains(err.Error(), `pools[test].policies.worker.name: unknown worker policy "first_free" (known: least_loaded, most_recently_used, session_sticky)`) {
		t.Fatalf("Validate without the registry = %v", err)
	}
}

// docs/policies.md shows the example as it is here.
func TestPoliciesDocShowsTheExample(t *testing.T) {
	src, err := os.ReadFile("examplepolicy_test.go")
	if err != nil {
		t.Fatal(err)
	}
	doc, err := os.ReadFile("../../docs/policies.md")
	if err != nil {
		t.Fatal(err)
	}
	_, code, _ := strings.Cut(string(src), "// example:begin\n")
	code, _, _ = strings.Cut(code, "// example:end")
	_, shown, _ := strings.Cut(string(doc), "<!-- example:begin -->\n```go\n")
	shown, _, _ = strings.Cut(shown, "```\n<!-- example:end -->")
	if strings.TrimSpace(code) != strings.TrimSpace(shown) {
		t.Fatalf("docs/policies.md shows\n%s\nwant the example of examplepolicy_test.go\n%s", shown, code)
	}
}
