package main

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"

	"github.com/snakepit/snakepit/internal/consultest"
	"github.com/snakepit/snakepit/pkg/client"
	snakepitv1 "github.com/snakepit/snakepit/proto/snakepit/v1"
)

// clusterTTL is the TTL of the test nodes' checks: short, so that the
// suite stays fast.
const clusterTTL = time.Second

// clusterNode is one snakepitd process of a test cluster.
type clusterNode struct {
	*daemonProc
	id   string
	conn *client.Conn
}

// clusterConfig is a node's config: consul discovery at consulAddr, one
// small pool, plus extra YAML for the pool.
func clusterConfig(id, consulAddr string, ttl time.Duration, pool string) string {
	if pool == "" {
		pool = "  - name: default\n    adapter: snakepit_examples.example\n    size: 1\n"
	}
	return fmt.Sprintf(`node_id: %s
shutdown_grace: 5s
discovery:
  kind: consul
  labels:
    role: test
  consul:
    address: %s
    ttl: %s
    update_interval: 100ms
pools:
%s`, id, consulAddr, ttl, pool)
}

// launchNode writes cfg into dir and starts snakepitd with it (and env, extra
// KEY=VALUE for its environment). It fails the test if the daemon exits
// before listening, and prints the daemon's last log lines if the test
// fails.
func launchNode(t *testing.T, bin, id, cfg, dir string, env ...string) (d *daemonProc, cfgPath string) {
	t.Helper()
	cfgPath = filepath.Join(dir, "snakepitd.yaml")
	if err := os.WriteFile(cfgPath, []byte(cfg), 0o644); err != nil {
		t.Fatal(err)
	}
	d = startDaemonEnv(t, bin, dir, env, "--config", cfgPath)
	if d.addr == "" {
		err := <-d.exited
		d.exited <- err // for the cleanup
		t.Fatalf("snakepitd %s exited (%v) before listening:\n%s", id, err, d.stderr.String())
	}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("snakepitd %s log, last lines:\n%s", id, lastLines(d.out.String(), 40))
		}
	})
	return d, cfgPath
}

// dialServing dials addr (plaintext unless opts say otherwise) and waits
// until the node serves.
func dialServing(t *testing.T, addr string, opts ...grpc.DialOption) *client.Conn {
	t.Helper()
	c, err := client.Dial(addr, opts...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	waitServing(t, c)
	return c
}

// startClusterNode starts snakepitd with cfg and waits until it serves.
func startClusterNode(t *testing.T, bin, id, cfg string) *clusterNode {
	t.Helper()
	d, _ := launchNode(t, bin, id, cfg, t.TempDir())
	return &clusterNode{daemonProc: d, id: id, conn: dialServing(t, d.addr)}
}

// view returns the ids of the healthy nodes n sees (itself included) and
// whether its view is stale.
func (n *clusterNode) view() (ids []string, stale bool, err error) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	resp, err := n.conn.Snakepit.ListNodes(ctx, &snakepitv1.ListNodesRequest{})
	if err != nil {
		return nil, false, err
	}
	for _, p := range resp.GetNodes() {
		if p.GetHealthy() {
			ids = append(ids, p.GetNodeId())
		}
	}
	slices.Sort(ids)
	return ids, resp.GetStale(), nil
}

// waitView waits until n sees exactly want (sorted ids), for at most
// timeout, and returns how long that took.
func waitView(t *testing.T, n *clusterNode, timeout time.Duration, want ...string) time.Duration {
	t.Helper()
	slices.Sort(want)
	t0 := time.Now()
	for {
		got, stale, err := n.view()
		if err == nil && !stale && slices.Equal(got, want) {
			return time.Since(t0)
		}
		if time.Since(t0) > timeout {
			t.Fatalf("node %s sees %v (stale %v, err %v), want %v within %s", n.id, got, stale, err, want, timeout)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// consulInstances returns the instances of the snakepit service the agent
// holds, by id, with their aggregated check status.
func consulInstances(t *testing.T, a *consultest.Agent) map[string]string {
	t.Helper()
	out, err := a.ServiceHealth("snakepit")
	if err != nil {
		t.Fatal(err)
	}
	return out
}

func sendSignal(t *testing.T, n *clusterNode, sig syscall.Signal) {
	t.Helper()
	if err := n.cmd.Process.Signal(sig); err != nil {
		t.Fatalf("signal %v to %s: %v", sig, n.id, err)
	}
	if sig == syscall.SIGSTOP {
		// kill(2) returns before every thread has stopped: a call can still
		// be answered meanwhile. Wait until all threads are stopped.
		waitStopped(t, n.cmd.Process.Pid)
	}
}

// waitStopped waits until every thread of pid is in the stopped state.
func waitStopped(t *testing.T, pid int) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		tasks, _ := filepath.Glob(fmt.Sprintf("/proc/%d/task/*/stat", pid))
		stopped := len(tasks) > 0
		for _, task := range tasks {
			b, err := os.ReadFile(task)
			i := strings.LastIndexByte(string(b), ')')
			if err != nil || i < 0 || i+2 >= len(b) || b[i+2] != 'T' {
				stopped = false
				break
			}
		}
		if stopped {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("process %d not stopped 10s after SIGSTOP", pid)
		}
		time.Sleep(time.Millisecond)
	}
}

func skipUnlessCluster(t *testing.T) (daemon, ctl string, agent *consultest.Agent) {
	t.Helper()
	if testing.Short() {
		t.Skip("starts consul and several daemons")
	}
	agent = consultest.Start(t)
	daemon, ctl = buildBinaries(t)
	return daemon, ctl, agent
}

// Three daemons find each other through Consul; then each way of leaving
// the cluster: frozen (SIGSTOP: critical, back after SIGCONT), killed
// (SIGKILL: gone when its TTL lapses) and stopped (SIGTERM: deregistered at
// once).
func TestClusterMembership(t *testing.T) {
	bin, ctl, agent := skipUnlessCluster(t)
	var nodes []*clusterNode
	for _, id := range []string{"node-a", "node-b", "node-c"} {
		nodes = append(nodes, startClusterNode(t, bin, id, clusterConfig(id, agent.Addr, clusterTTL, "")))
	}
	a, b, c := nodes[0], nodes[1], nodes[2]
	// Registered once ready: each sees the other two within 2s of the
	// last one serving.
	for _, n := range nodes {
		took := waitView(t, n, 2*time.Second, "node-a", "node-b", "node-c")
		t.Logf("%s sees all three after %s", n.id, took)
	}

	// spctl nodes, as an operator runs it.
	out, err := exec.Command(ctl, "--addr", a.addr, "nodes").CombinedOutput()
	if err != nil {
		t.Fatalf("spctl nodes: %v\n%s", err, out)
	}
	lines := strings.Split(strings.TrimSpace(string(out)), "\n")
	if len(lines) != 4 || !strings.Contains(string(out), "node-a *") || !strings.Contains(string(out), "role=test") ||
		!strings.Contains(string(out), b.addr) || !strings.Contains(string(out), "1 (default:1)") {
		t.Errorf("spctl nodes =\n%s\nwant a header and three nodes, node-a marked, with labels, addresses and slots", out)
	}

	// SIGSTOP: b stops refreshing, goes critical and leaves the others'
	// view; SIGCONT brings it back.
	sendSignal(t, b, syscall.SIGSTOP)
	took := waitView(t, a, 3*clusterTTL, "node-a", "node-c")
	t.Logf("frozen node-b left node-a's view after %s", took)
	if st := consulInstances(t, agent)["node-b"]; st != "critical" {
		t.Errorf("frozen node-b's check is %q, want critical", st)
	}
	sendSignal(t, b, syscall.SIGCONT)
	waitView(t, a, 3*clusterTTL, "node-a", "node-b", "node-c")
	waitView(t, c, 3*clusterTTL, "node-a", "node-b", "node-c")

	// SIGKILL: b cannot deregister; it leaves when its TTL lapses, and
	// Consul still holds it (critical) afterwards.
	killed := time.Now() // before the signal: a lower bound starts there
	sendSignal(t, b, syscall.SIGKILL)
	waitView(t, a, 3*clusterTTL, "node-a", "node-c")
	took = time.Since(killed)
	waitView(t, c, time.Second, "node-a", "node-c")
	t.Logf("killed node-b left the view %s after SIGKILL (TTL %s)", took, clusterTTL)
	if took < clusterTTL/2 {
		t.Errorf("killed node-b left after %s, before its TTL (%s) could lapse", took, clusterTTL)
	}
	if st := consulInstances(t, agent)["node-b"]; st != "critical" {
		t.Errorf("killed node-b is %q in consul, want critical (not deregistered)", st)
	}

	// SIGTERM: c deregisters first thing, so it leaves a's view at once
	// and Consul no longer holds it.
	sendSignal(t, c, syscall.SIGTERM)
	took = waitView(t, a, clusterTTL/2, "node-a")
	t.Logf("stopped node-c left node-a's view %s after SIGTERM", took)
	if _, held := consulInstances(t, agent)["node-c"]; held {
		t.Errorf("consul still holds node-c after its graceful stop")
	}
	select {
	case err := <-c.exited:
		c.exited <- err // for the cleanup
		if err != nil {
			t.Errorf("node-c exited with %v after SIGTERM, want status 0", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("node-c did not exit within 30s of SIGTERM")
	}
}

// Restarting the Consul agent loses nothing: nodes register again, and
// watchers pick up the new agent's state.
func TestClusterSurvivesConsulRestart(t *testing.T) {
	bin, _, agent := skipUnlessCluster(t)
	a := startClusterNode(t, bin, "node-a", clusterConfig("node-a", agent.Addr, clusterTTL, ""))
	b := startClusterNode(t, bin, "node-b", clusterConfig("node-b", agent.Addr, clusterTTL, ""))
	waitView(t, a, 2*time.Second, "node-a", "node-b")
	agent.Restart()
	if st := consulInstances(t, agent); len(st) == 2 {
		t.Logf("both nodes already back right after the restart: %v", st)
	}
	// A refresh fails within TTL/3, then registration is retried with
	// backoff (at most 10s).
	bound := clusterTTL + 10*time.Second
	for _, n := range []*clusterNode{a, b} {
		took := waitView(t, n, bound, "node-a", "node-b")
		t.Logf("%s sees both again %s after the agent came back", n.id, took)
	}
}

// A node started while Consul is down serves locally (its view stale) and
// joins once Consul comes up.
func TestClusterNodeStartedWhileConsulDown(t *testing.T) {
	bin, ctl, agent := skipUnlessCluster(t)
	agent.Stop()
	a := startClusterNode(t, bin, "node-a", clusterConfig("node-a", agent.Addr, clusterTTL, ""))
	out, err := exec.Command(ctl, "--addr", a.addr, "exec", "add", "--args", `{"a": 1, "b": 2}`).CombinedOutput()
	if err != nil || !strings.HasPrefix(string(out), "3\n") {
		t.Fatalf("spctl exec with consul down: %v\n%s", err, out)
	}
	out, err = exec.Command(ctl, "--addr", a.addr, "nodes").CombinedOutput()
	if err != nil || !strings.Contains(string(out), "stale: consul discovery is unreachable") {
		t.Errorf("spctl nodes with consul down: %v\n%s\nwant the view marked stale", err, out)
	}
	agent.Restart()
	took := waitView(t, a, 15*time.Second, "node-a")
	t.Logf("node-a joined %s after consul came up", took)
	b := startClusterNode(t, bin, "node-b", clusterConfig("node-b", agent.Addr, clusterTTL, ""))
	waitView(t, b, 2*time.Second, "node-a", "node-b")
}

// flakyAdapter fails to import while its marker file (%q) exists; die
// ends the worker process.
const flakyAdapter = `import os
from snakepit import tool

if os.path.exists(%q):
    raise RuntimeError("marker present: refusing to start")

@tool
def die():
    os._exit(3)
`

// A node whose pools cannot serve stops refreshing its TTL: it is critical
// and out of its peers' view for as long as that lasts, and back once its
// workers start again.
func TestClusterFailedPoolsStopRefreshing(t *testing.T) {
	bin, _, agent := skipUnlessCluster(t)
	dir := t.TempDir()
	adapter := filepath.Join(dir, "flaky.py")
	marker := filepath.Join(dir, "marker")
	if err := os.WriteFile(adapter, []byte(fmt.Sprintf(flakyAdapter, marker)), 0o644); err != nil {
		t.Fatal(err)
	}
	pool := fmt.Sprintf(`  - name: flaky
    adapter: %s
    size: 1
    restart_backoff_min: 10ms
    restart_backoff_max: 100ms
    restart_budget: 1000
`, adapter)
	a := startClusterNode(t, bin, "node-a", clusterConfig("node-a", agent.Addr, clusterTTL, ""))
	b := startClusterNode(t, bin, "node-b", clusterConfig("node-b", agent.Addr, clusterTTL, pool))
	waitView(t, a, 2*time.Second, "node-a", "node-b")

	if err := os.WriteFile(marker, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := b.conn.Snakepit.Execute(ctx, &snakepitv1.ExecuteRequest{Tool: "die", Pool: "flaky"}); !isReason(err, codes.Unavailable, "WORKER_EXITED") {
		t.Fatalf("die = %v, want UNAVAILABLE WORKER_EXITED (the worker killed)", err)
	}
	// Marked critical at once; the watcher's next answer drops it. Allow a
	// few TTLs: the whole suite may be running on 2 cores beside it.
	took := waitView(t, a, 5*clusterTTL, "node-a")
	t.Logf("node-b, its pool failing, left node-a's view after %s", took)
	// Not refreshed: still out of the view, and critical, after several TTLs.
	deadline := time.Now().Add(3 * clusterTTL)
	for time.Now().Before(deadline) {
		if ids, _, err := a.view(); err != nil || slices.Contains(ids, "node-b") {
			t.Fatalf("node-a sees %v (%v) while node-b's pool cannot serve", ids, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
	if st := consulInstances(t, agent)["node-b"]; st != "critical" {
		t.Errorf("node-b's check is %q while its pool cannot serve, want critical", st)
	}
	if err := os.Remove(marker); err != nil {
		t.Fatal(err)
	}
	took = waitView(t, a, 5*time.Second, "node-a", "node-b")
	t.Logf("node-b back in node-a's view %s after its workers could start again", took)
}

// Configuration that cannot work stops the daemon with an error naming the
// key; an unreachable agent or a refused token is logged, naming the key,
// and the node serves locally.
func TestClusterBadConfig(t *testing.T) {
	if testing.Short() {
		t.Skip("builds the binaries")
	}
	bin, _ := buildBinaries(t)
	for _, tt := range []struct{ name, yaml, want string }{
		{"unknown kind", "discovery:\n  kind: zookeeper\n", `discovery.kind must be "static" or "consul" (got "zookeeper")`},
		{"malformed label", "discovery:\n  labels:\n    \"bad key\": x\n", `discovery.labels["bad key"]`},
		{"unreadable token file", "discovery:\n  kind: consul\n  consul:\n    address: 127.0.0.1:1\n    token_file: /nonexistent/token\n", "discovery.consul.token_file"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			path := filepath.Join(dir, "c.yaml")
			if err := os.WriteFile(path, []byte(tt.yaml), 0o644); err != nil {
				t.Fatal(err)
			}
			cmd := exec.Command(bin, "--config", path, "--listen", "127.0.0.1:0", "--metrics-listen", "off",
				"--state-dir", filepath.Join(dir, "state"), "--log-format", "json")
			out, err := cmd.CombinedOutput()
			if err == nil || !strings.Contains(string(out), tt.want) {
				t.Fatalf("snakepitd = %v\n%s\nwant a failure naming %q", err, out, tt.want)
			}
		})
	}

	t.Run("unreachable address and refused token", func(t *testing.T) {
		agent := consultest.StartWith(t, consultest.Options{ACL: true})
		for _, c := range []struct{ name, consul, want string }{
			{"unreachable", "    address: 127.0.0.1:1\n", "discovery.consul.address=127.0.0.1:1"},
			{"refused", fmt.Sprintf("    address: %s\n    token: not-the-token\n", agent.Addr), "check discovery.consul.token"},
		} {
			cfg := fmt.Sprintf("node_id: node-%s\ndiscovery:\n  kind: consul\n  consul:\n%s    ttl: 1s\npools:\n  - name: default\n    adapter: snakepit_examples.example\n    size: 1\n", c.name, c.consul)
			n := startClusterNode(t, bin, "node-"+c.name, cfg)
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			_, err := n.conn.Snakepit.Execute(ctx, &snakepitv1.ExecuteRequest{Tool: "add", Args: []byte(`{"a": 1, "b": 1}`)})
			cancel()
			if err != nil {
				t.Errorf("%s: node does not serve locally: %v", c.name, err)
			}
			sendSignal(t, n, syscall.SIGTERM)
			if err := <-n.exited; err != nil {
				t.Errorf("%s: snakepitd exited with %v after SIGTERM", c.name, err)
			}
			n.exited <- nil
			if log := n.stderr.String(); !strings.Contains(log, c.want) {
				t.Errorf("%s: the log does not name %q:\n%s", c.name, c.want, log)
			}
		}
	})
}
