package bench

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log"
	"math/rand/v2"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/snakepit/snakepit/internal/consultest"
	"github.com/snakepit/snakepit/internal/freeport"
	"github.com/snakepit/snakepit/pkg/pyruntime"
	snakepitv1 "github.com/snakepit/snakepit/proto/snakepit/v1"
)

// benchCluster: how fast a killed node leaves every peer's view, against
// its TTL (the floor: Consul cannot notice a silent node sooner), and how
// many requests a node sends Consul in steady state, idle and under load
// (it must not grow with load: no per-request Consul traffic).
func benchCluster(ctx context.Context, o options, r *report) error {
	agent, err := startConsul(ctx)
	if err != nil {
		return err
	}
	defer agent.stop()

	// Two observers, each talking to Consul through a counting proxy.
	const requestTTL = 3 * time.Second
	var observers []*daemon
	var proxies []*countingProxy
	for _, id := range []string{"obs-a", "obs-b"} {
		p, err := newCountingProxy(agent.addr)
		if err != nil {
			return err
		}
		defer p.close()
		d, err := startDaemon(ctx, o, clusterNodeConfig(id, p.addr, requestTTL))
		if err != nil {
			return err
		}
		defer d.stop()
		observers = append(observers, d)
		proxies = append(proxies, p)
	}
	if err := waitPeers(ctx, observers, []string{"obs-a", "obs-b"}, 30*time.Second); err != nil {
		return err
	}

	var rows []row
	for _, ttl := range []time.Duration{time.Second, 2 * time.Second, 5 * time.Second} {
		const reps = 3
		var took []time.Duration
		for i := range reps {
			d, err := removalAfterKill(ctx, o, agent.addr, observers, fmt.Sprintf("victim-%d", i), ttl)
			if err != nil {
				return fmt.Errorf("ttl %s: %w", ttl, err)
			}
			took = append(took, d)
		}
		slices.Sort(took)
		rows = append(rows, row{
			what:   fmt.Sprintf("SIGKILL to removal from every peer, ttl %s (median of %d)", ttl, reps),
			figure: ms(took[len(took)/2]),
			floor:  ms(ttl) + " (the TTL)",
			note:   fmt.Sprintf("min %s, max %s; expect 2/3 TTL to TTL (the last refresh was up to TTL/3 before the kill)", ms(took[0]), ms(took[len(took)-1])),
		})
	}

	// Requests per node per minute: idle, then under call load.
	const window = 20 * time.Second
	idle, err := requestsPerMinute(ctx, proxies[0], window, nil)
	if err != nil {
		return err
	}
	var calls atomic.Int64
	loaded, err := requestsPerMinute(ctx, proxies[0], window, func(ctx context.Context) {
		req := &snakepitv1.ExecuteRequest{Tool: "noop", Args: []byte("{}")}
		for ctx.Err() == nil {
			if _, err := observers[0].conn.Snakepit.Execute(ctx, req); err == nil {
				calls.Add(1)
			}
		}
	})
	if err != nil {
		return err
	}
	floor := 60/(requestTTL/3).Seconds() + 60/time.Minute.Seconds()
	rate := float64(calls.Load()) / window.Seconds()
	rows = append(rows,
		row{"consul requests per node per minute, idle", fmt.Sprintf("%.1f", idle), fmt.Sprintf("%.0f", floor), fmt.Sprintf("ttl %s: one check refresh per TTL/3, one blocking query per watch_wait (1m); counted at a proxy in front of Consul", requestTTL)},
		row{"consul requests per node per minute, under load", fmt.Sprintf("%.1f", loaded), fmt.Sprintf("%.0f", floor), fmt.Sprintf("while serving %.0f calls/s (8 callers)", rate)},
	)
	r.table("cluster: Consul discovery (3 daemons, Consul dev agent on loopback; floor: the TTL, and the registrar's and watcher's own schedule)", rows)
	return nil
}

func clusterNodeConfig(id, consulAddr string, ttl time.Duration) string {
	return fmt.Sprintf(`node_id: %s
metrics_listen: "off"
discovery:
  kind: consul
  consul:
    address: %s
    ttl: %s
pools:
  - name: default
    adapter: %s
    size: 2
`, id, consulAddr, ttl, pyruntime.ExampleAdapter)
}

// removalAfterKill starts a node with the given TTL, waits until every
// observer sees it, kills it with SIGKILL and returns how long until no
// observer sees it any more.
func removalAfterKill(ctx context.Context, o options, consulAddr string, observers []*daemon, id string, ttl time.Duration) (time.Duration, error) {
	v, err := startDaemon(ctx, o, clusterNodeConfig(id, consulAddr, ttl))
	if err != nil {
		return 0, err
	}
	defer func() {
		v.conn.Close()
		_ = v.cmd.Wait()
		os.RemoveAll(v.dir)
	}()
	if err := waitSeen(ctx, observers, id, true, 30*time.Second); err != nil {
		_ = v.cmd.Process.Kill()
		return 0, err
	}
	// Kill at a random phase of the refresh cycle (a refresh happens every
	// TTL/3; registering was one), as a crash would.
	time.Sleep(ttl + time.Duration(rand.Float64()*float64(ttl/3)))
	if err := v.cmd.Process.Signal(syscall.SIGKILL); err != nil {
		return 0, err
	}
	t0 := time.Now()
	if err := waitSeen(ctx, observers, id, false, ttl+30*time.Second); err != nil {
		return 0, err
	}
	return time.Since(t0), nil
}

// waitSeen polls the observers' ListNodes every 5 ms until each sees id
// healthy (seen) or none does (!seen).
func waitSeen(ctx context.Context, observers []*daemon, id string, seen bool, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for {
		ok := true
		for _, d := range observers {
			ids, err := healthyNodes(ctx, d)
			if err != nil {
				return err
			}
			if slices.Contains(ids, id) != seen {
				ok = false
				break
			}
		}
		if ok {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s: seen=%v not reached within %s", id, seen, timeout)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func waitPeers(ctx context.Context, ds []*daemon, ids []string, timeout time.Duration) error {
	for _, id := range ids {
		if err := waitSeen(ctx, ds, id, true, timeout); err != nil {
			return err
		}
	}
	return nil
}

func healthyNodes(ctx context.Context, d *daemon) ([]string, error) {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	resp, err := d.conn.Snakepit.ListNodes(ctx, &snakepitv1.ListNodesRequest{})
	if err != nil {
		return nil, err
	}
	var ids []string
	for _, n := range resp.GetNodes() {
		if n.GetHealthy() {
			ids = append(ids, n.GetNodeId())
		}
	}
	return ids, nil
}

// requestsPerMinute counts the requests passing p during window, with load
// running meanwhile (8 goroutines) when not nil.
func requestsPerMinute(ctx context.Context, p *countingProxy, window time.Duration, load func(context.Context)) (float64, error) {
	lctx, stop := context.WithCancel(ctx)
	done := make(chan struct{})
	const callers = 8
	if load != nil {
		for range callers {
			go func() { load(lctx); done <- struct{}{} }()
		}
	}
	start := p.requests.Load()
	t0 := time.Now()
	select {
	case <-time.After(window):
	case <-ctx.Done():
	}
	n := p.requests.Load() - start
	el := time.Since(t0)
	stop()
	if load != nil {
		for range callers {
			<-done
		}
	}
	if ctx.Err() != nil {
		return 0, ctx.Err()
	}
	return float64(n) / el.Minutes(), nil
}

// countingProxy is a reverse proxy in front of Consul's HTTP API that
// counts the requests a node sends: the daemon is measured as it is, with
// nothing added to it for the benchmark.
type countingProxy struct {
	addr     string
	requests atomic.Int64
	srv      *http.Server
}

func newCountingProxy(target string) (*countingProxy, error) {
	u, err := url.Parse("http://" + target)
	if err != nil {
		return nil, err
	}
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	p := &countingProxy{addr: lis.Addr().String()}
	rp := httputil.NewSingleHostReverseProxy(u)
	rp.ErrorLog = log.New(io.Discard, "", 0) // blocking queries cancelled at the end
	p.srv = &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		p.requests.Add(1)
		rp.ServeHTTP(w, req)
	}), ReadHeaderTimeout: 10 * time.Second}
	go func() { _ = p.srv.Serve(lis) }()
	return p, nil
}

func (p *countingProxy) close() { _ = p.srv.Close() }

// consulAgent is a Consul dev agent started for the benchmark.
type consulAgent struct {
	cmd  *exec.Cmd
	addr string
	dir  string
}

func startConsul(ctx context.Context) (*consulAgent, error) {
	bin, err := consultest.Binary()
	if err != nil {
		return nil, err
	}
	ports, err := freeport.Get(4, freeport.TCPAndUDP)
	if err != nil {
		return nil, err
	}
	dir, err := os.MkdirTemp("", "spbench-consul-")
	if err != nil {
		return nil, err
	}
	a := &consulAgent{addr: net.JoinHostPort("127.0.0.1", strconv.Itoa(ports[0])), dir: dir}
	logf, err := os.Create(filepath.Join(dir, "consul.log"))
	if err != nil {
		return nil, err
	}
	defer logf.Close()
	a.cmd = exec.CommandContext(ctx, bin, "agent", "-dev", "-node", "spbench",
		"-bind", "127.0.0.1", "-client", "127.0.0.1",
		"-http-port", strconv.Itoa(ports[0]), "-server-port", strconv.Itoa(ports[1]),
		"-serf-lan-port", strconv.Itoa(ports[2]), "-serf-wan-port", strconv.Itoa(ports[3]),
		"-dns-port", "-1", "-grpc-port", "-1", "-grpc-tls-port", "-1",
		"-hcl", "disable_update_check = true")
	a.cmd.Stdout, a.cmd.Stderr = logf, logf
	a.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := a.cmd.Start(); err != nil {
		return nil, err
	}
	deadline := time.Now().Add(consultest.StartTimeout)
	for {
		resp, err := http.Get("http://" + a.addr + "/v1/catalog/node/spbench")
		if err == nil {
			ok := resp.StatusCode == http.StatusOK
			var b [8]byte
			n, _ := resp.Body.Read(b[:])
			resp.Body.Close()
			if ok && string(b[:n]) != "null" {
				return a, nil
			}
		}
		if time.Now().After(deadline) {
			a.stop()
			return nil, errors.New("consul agent not ready within 60s; log in " + dir)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func (a *consulAgent) stop() {
	_ = syscall.Kill(-a.cmd.Process.Pid, syscall.SIGKILL)
	_ = a.cmd.Wait()
	os.RemoveAll(a.dir)
}
