// Package bench measures snakepit's speed and memory, each figure beside a
// floor measured in the same run on the same machine: the daemon's figures
// mean something only next to what the parts underneath cost.
package bench

import (
	"context"
	"flag"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/rs/zerolog"
	"google.golang.org/grpc"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	"github.com/snakepit/snakepit/pkg/client"
	"github.com/snakepit/snakepit/pkg/pyruntime"
	"github.com/snakepit/snakepit/pkg/worker"
	snakepitv1 "github.com/snakepit/snakepit/proto/snakepit/v1"
)

type options struct {
	daemon   string
	python   string
	duration time.Duration
	only     string
	env      string
}

// Main runs the benchmarks and prints a table; it returns the exit code.
func Main(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	if len(args) > 0 && args[0] == relayServeCmd {
		return relayServe(args[1:], stdout, stderr)
	}
	var o options
	fs := flag.NewFlagSet("spbench", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.StringVar(&o.daemon, "daemon", "bin/snakepitd", "snakepitd binary to measure")
	fs.StringVar(&o.python, "python", "python3", "Python interpreter")
	fs.DurationVar(&o.duration, "duration", 3*time.Second, "length of each throughput run")
	fs.StringVar(&o.env, "daemon-env", "", "extra KEY=VALUE for the daemon's environment (comma-separated), e.g. GOMAXPROCS=1")
	fs.StringVar(&o.only, "only", "", "comma-separated sections to run (call,startup,stream,cluster,tls,drain,router); empty runs all")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	r := &report{w: stdout}
	sections := []struct {
		name string
		fn   func(context.Context, options, *report) error
	}{
		{"call", benchCall},
		{"startup", benchStartup},
		{"stream", benchStream},
		{"cluster", benchCluster},
		{"tls", benchTLS},
		{"drain", benchDrain},
		{"router", benchRouter},
	}
	for _, s := range sections {
		if o.only != "" && !slices.Contains(strings.Split(o.only, ","), s.name) {
			continue
		}
		if err := s.fn(ctx, o, r); err != nil {
			fmt.Fprintf(stderr, "spbench: %s: %v\n", s.name, err)
			return 1
		}
	}
	return 0
}

// report prints rows of figure and floor.
type report struct {
	w io.Writer
}

type row struct {
	what, figure, floor, note string
}

func (r *report) table(title string, rows []row) {
	fmt.Fprintf(r.w, "\n== %s\n", title)
	tw := tabwriter.NewWriter(r.w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "MEASURE\tSNAKEPIT\tFLOOR\tNOTE")
	for _, x := range rows {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\n", x.what, x.figure, x.floor, x.note)
	}
	tw.Flush()
}

// latencies runs fn n times sequentially and returns the sorted durations.
func latencies(n int, fn func() error) ([]time.Duration, error) {
	out := make([]time.Duration, 0, n)
	for i := 0; i < n; i++ {
		t0 := time.Now()
		if err := fn(); err != nil {
			return nil, err
		}
		out = append(out, time.Since(t0))
	}
	slices.Sort(out)
	return out, nil
}

func pct(d []time.Duration, q float64) time.Duration {
	if len(d) == 0 {
		return 0
	}
	return d[min(len(d)-1, int(q*float64(len(d))))]
}

func us(d time.Duration) string {
	return fmt.Sprintf("%.0f us", float64(d)/float64(time.Microsecond))
}

// throughput runs fn from conc goroutines for d and returns calls/s.
func throughput(conc int, d time.Duration, fn func(i int) error) (float64, error) {
	var n atomic.Int64
	var firstErr atomic.Value
	stop := time.Now().Add(d)
	var wg sync.WaitGroup
	t0 := time.Now()
	for g := 0; g < conc; g++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for time.Now().Before(stop) {
				if err := fn(g); err != nil {
					firstErr.CompareAndSwap(nil, err)
					return
				}
				n.Add(1)
			}
		}()
	}
	wg.Wait()
	if e, ok := firstErr.Load().(error); ok {
		return 0, e
	}
	return float64(n.Load()) / time.Since(t0).Seconds(), nil
}

// startWorkers starts n workers of the example adapter directly, without
// the daemon.
func startWorkers(ctx context.Context, o options, n int) ([]*worker.Worker, func(), error) {
	dir, err := os.MkdirTemp("", "spbench-rt-")
	if err != nil {
		return nil, nil, err
	}
	rt, err := pyruntime.Install(dir)
	if err != nil {
		return nil, nil, err
	}
	var ws []*worker.Worker
	stop := func() {
		for _, w := range ws {
			w.Stop(2 * time.Second)
		}
		os.RemoveAll(dir)
	}
	for i := 0; i < n; i++ {
		w, err := worker.Start(ctx, worker.Spec{
			Pool: "bench", ID: worker.ID(i), Generation: worker.Generation(i + 1), Python: o.python,
			Adapter: pyruntime.ExampleAdapter, Capacity: 1,
			Env:          append(os.Environ(), "PYTHONPATH="+rt),
			StartTimeout: 30 * time.Second, Logger: zerolog.Nop(),
		})
		if err != nil {
			stop()
			return nil, nil, err
		}
		ws = append(ws, w)
	}
	return ws, stop, nil
}

// daemon is a snakepitd process started for a measurement.
type daemon struct {
	cmd  *exec.Cmd
	addr string
	conn *client.Conn
	dir  string
}

func startDaemon(ctx context.Context, o options, config string, dialOpts ...grpc.DialOption) (*daemon, error) {
	dir, err := os.MkdirTemp("", "spbench-node-")
	if err != nil {
		return nil, err
	}
	cfgPath := filepath.Join(dir, "snakepitd.yaml")
	if err := os.WriteFile(cfgPath, []byte(config), 0o644); err != nil {
		return nil, err
	}
	listenFile := filepath.Join(dir, "addr")
	cmd := exec.CommandContext(ctx, o.daemon, "--config", cfgPath, "--listen", "127.0.0.1:0",
		"--state-dir", filepath.Join(dir, "state"), "--listen-file", listenFile, "--log-level", "warn", "--log-format", "json")
	cmd.Stderr = os.Stderr
	if o.env != "" {
		cmd.Env = append(os.Environ(), strings.Split(o.env, ",")...)
	}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start %s: %w (run make build first)", o.daemon, err)
	}
	d := &daemon{cmd: cmd, dir: dir}
	deadline := time.Now().Add(60 * time.Second)
	for {
		b, err := os.ReadFile(listenFile)
		if err == nil && strings.HasSuffix(string(b), "\n") {
			d.addr = strings.TrimSpace(string(b))
			break
		}
		if time.Now().After(deadline) {
			d.stop()
			return nil, fmt.Errorf("snakepitd did not listen within 60s")
		}
		time.Sleep(5 * time.Millisecond)
	}
	c, err := client.Dial(d.addr, dialOpts...)
	if err != nil {
		d.stop()
		return nil, err
	}
	d.conn = c
	hc := healthpb.NewHealthClient(c)
	for {
		r, err := hc.Check(ctx, &healthpb.HealthCheckRequest{})
		if err == nil && r.GetStatus() == healthpb.HealthCheckResponse_SERVING {
			return d, nil
		}
		if time.Now().After(deadline) {
			d.stop()
			return nil, fmt.Errorf("snakepitd not SERVING within 60s")
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func (d *daemon) stop() {
	if d.conn != nil {
		d.conn.Close()
	}
	_ = d.cmd.Process.Signal(syscall.SIGTERM)
	_ = d.cmd.Wait()
	os.RemoveAll(d.dir)
}

// rssKB returns a process's resident set size in KiB.
func rssKB(pid int) (int, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, err
	}
	for _, l := range strings.Split(string(b), "\n") {
		if strings.HasPrefix(l, "VmRSS:") {
			f := strings.Fields(l)
			return strconv.Atoi(f[1])
		}
	}
	return 0, fmt.Errorf("no VmRSS for pid %d", pid)
}

func poolConfig(size, capacity int) string {
	return fmt.Sprintf("pools:\n  - name: default\n    adapter: %s\n    size: %d\n    capacity: %d\n", pyruntime.ExampleAdapter, size, capacity)
}

// benchCall: the path of every call, against the framed-protocol floor and
// a bare gRPC unary call to the same daemon.
func benchCall(ctx context.Context, o options, r *report) error {
	const n = 5000
	ws, stopWorkers, err := startWorkers(ctx, o, 2)
	if err != nil {
		return err
	}
	noop := &worker.Call{Tool: "noop", Args: []byte("{}")}
	floorLat, err := latencies(n, func() error { _, err := ws[0].Call(ctx, noop); return err })
	if err != nil {
		return err
	}
	floorTput, err := throughput(2, o.duration, func(i int) error { _, err := ws[i].Call(ctx, noop); return err })
	stopWorkers()
	if err != nil {
		return err
	}

	d, err := startDaemon(ctx, o, poolConfig(2, 1))
	if err != nil {
		return err
	}
	defer d.stop()
	req := &snakepitv1.ExecuteRequest{Tool: "noop", Args: []byte("{}")}
	exec1 := func() error { _, err := d.conn.Snakepit.Execute(ctx, req); return err }
	for i := 0; i < 500; i++ { // warm up connections and pools
		if err := exec1(); err != nil {
			return err
		}
	}
	lat, err := latencies(n, exec1)
	if err != nil {
		return err
	}
	hc := healthpb.NewHealthClient(d.conn)
	grpcLat, err := latencies(n, func() error { _, err := hc.Check(ctx, &healthpb.HealthCheckRequest{}); return err })
	if err != nil {
		return err
	}
	tput, err := throughput(32, o.duration, func(int) error { return exec1() })
	if err != nil {
		return err
	}
	grpcTput, err := throughput(32, o.duration, func(int) error {
		_, err := hc.Check(ctx, &healthpb.HealthCheckRequest{})
		return err
	})
	if err != nil {
		return err
	}
	rss, err := rssKB(d.cmd.Process.Pid)
	if err != nil {
		return err
	}
	d.stop()

	d16, err := startDaemon(ctx, o, poolConfig(16, 1))
	if err != nil {
		return err
	}
	rss16, err := rssKB(d16.cmd.Process.Pid)
	d16.stop()
	if err != nil {
		return err
	}
	r.table("call path: no-op tool (floor: Go<->Python round trip over the framed protocol, no daemon; and a bare gRPC unary call to the same daemon)", []row{
		{"p50, concurrency 1", us(pct(lat, 0.5)), us(pct(floorLat, 0.5)) + " protocol, " + us(pct(grpcLat, 0.5)) + " bare gRPC", "target < 200 us"},
		{"p99, concurrency 1", us(pct(lat, 0.99)), us(pct(floorLat, 0.99)) + " protocol, " + us(pct(grpcLat, 0.99)) + " bare gRPC", ""},
		{"throughput, concurrency 32, 2 workers", fmt.Sprintf("%.0f calls/s", tput), fmt.Sprintf("%.0f calls/s protocol, %.0f calls/s bare gRPC", floorTput, grpcTput), "protocol floor: 2 callers, one per worker; target >= 12,000"},
		{"daemon RSS, 2 workers", fmt.Sprintf("%.1f MB", float64(rss)/1024), "", "after the throughput run"},
		{"daemon RSS, 16 idle workers", fmt.Sprintf("%.1f MB", float64(rss16)/1024), "", "Python processes not counted"},
	})
	return nil
}

func slicesSort(d []time.Duration) { slices.Sort(d) }
