package bench

import (
	"context"
	"errors"
	"fmt"
	"io"
	"time"

	"google.golang.org/grpc"

	"github.com/snakepit/snakepit/pkg/client"
	"github.com/snakepit/snakepit/pkg/worker"
	snakepitv1 "github.com/snakepit/snakepit/proto/snakepit/v1"
)

// benchStream: streaming throughput and time to first chunk against the
// framed protocol alone; a session call's p50 against a sessionless one;
// daemon memory while a slow client reads 100,000 chunks; how soon a
// cancelled stream stops its generator.
func benchStream(ctx context.Context, o options, r *report) error {
	const chunks = 100000
	ws, stopWorkers, err := startWorkers(ctx, o, 1)
	if err != nil {
		return err
	}
	call := &worker.Call{Tool: "count", Args: []byte(fmt.Sprintf(`{"n": %d}`, chunks))}
	t0 := time.Now()
	n := 0
	if _, err := ws[0].Stream(ctx, call, 32, func([]byte) error {
		n++
		return nil
	}); err != nil {
		stopWorkers()
		return err
	}
	floorRate := float64(n) / time.Since(t0).Seconds()
	var floorFirst []time.Duration
	for i := 0; i < 200; i++ {
		t1 := time.Now()
		got := false
		if _, err := ws[0].Stream(ctx, &worker.Call{Tool: "count", Args: []byte(`{"n": 1}`)}, 32, func([]byte) error {
			if !got {
				floorFirst = append(floorFirst, time.Since(t1))
				got = true
			}
			return nil
		}); err != nil {
			stopWorkers()
			return err
		}
	}
	stopWorkers()
	slicesSort(floorFirst)

	d, err := startDaemon(ctx, o, poolConfig(2, 1))
	if err != nil {
		return err
	}
	defer d.stop()
	stream := func(c snakepitv1.SnakepitClient, req *snakepitv1.ExecuteRequest, each func(int)) error {
		st, err := c.ExecuteStream(ctx, req)
		if err != nil {
			return err
		}
		i := 0
		for {
			m, err := st.Recv()
			if err != nil {
				if errors.Is(err, io.EOF) {
					return errors.New("stream ended without outcome")
				}
				return err
			}
			if m.GetDone() != nil {
				return nil
			}
			each(i)
			i++
		}
	}
	t0 = time.Now()
	got := 0
	if err := stream(d.conn.Snakepit, &snakepitv1.ExecuteRequest{Tool: "count", Args: []byte(fmt.Sprintf(`{"n": %d}`, chunks))}, func(int) { got++ }); err != nil {
		return err
	}
	rate := float64(got) / time.Since(t0).Seconds()
	var firsts []time.Duration
	for i := 0; i < 200; i++ {
		t1 := time.Now()
		seen := false
		if err := stream(d.conn.Snakepit, &snakepitv1.ExecuteRequest{Tool: "count", Args: []byte(`{"n": 1}`)}, func(int) {
			if !seen {
				firsts = append(firsts, time.Since(t1))
				seen = true
			}
		}); err != nil {
			return err
		}
	}
	slicesSort(firsts)

	// Session calls against sessionless ones, interleaved so drift hits both.
	var plain, sess []time.Duration
	for i := 0; i < 3000; i++ {
		t1 := time.Now()
		if _, err := d.conn.Snakepit.Execute(ctx, &snakepitv1.ExecuteRequest{Tool: "noop"}); err != nil {
			return err
		}
		plain = append(plain, time.Since(t1))
		t1 = time.Now()
		if _, err := d.conn.Snakepit.Execute(ctx, &snakepitv1.ExecuteRequest{Tool: "noop", SessionId: "bench-session"}); err != nil {
			return err
		}
		sess = append(sess, time.Since(t1))
	}
	slicesSort(plain)
	slicesSort(sess)

	// A slow reader of 100,000 chunks of 100 bytes: daemon RSS before,
	// and its peak while the reader crawls.
	before, err := rssKB(d.cmd.Process.Pid)
	if err != nil {
		return err
	}
	slow, err := client.Dial(d.addr, grpc.WithInitialWindowSize(64<<10), grpc.WithInitialConnWindowSize(64<<10))
	if err != nil {
		return err
	}
	peak := before
	err = stream(slow.Snakepit, &snakepitv1.ExecuteRequest{Tool: "count", Args: []byte(fmt.Sprintf(`{"n": %d}`, chunks))}, func(i int) {
		if i%5000 == 0 {
			time.Sleep(20 * time.Millisecond)
			if kb, err := rssKB(d.cmd.Process.Pid); err == nil {
				peak = max(peak, kb)
			}
		}
	})
	slow.Close()
	if err != nil {
		return err
	}

	// Cancel to generator stop: the generator's worker is free again.
	var stops []time.Duration
	for i := 0; i < 20; i++ {
		cctx, cancel := context.WithCancel(ctx)
		st, err := d.conn.Snakepit.ExecuteStream(cctx, &snakepitv1.ExecuteRequest{Tool: "count", Args: []byte(`{"n": 100000000, "delay": 0.001}`)})
		if err != nil {
			cancel()
			return err
		}
		for j := 0; j < 5; j++ {
			if _, err := st.Recv(); err != nil {
				cancel()
				return err
			}
		}
		t1 := time.Now()
		cancel()
		for {
			s, err := d.conn.Snakepit.Status(ctx, &snakepitv1.StatusRequest{})
			if err != nil {
				return err
			}
			if s.GetPools()[0].GetBusy() == 0 {
				break
			}
			if time.Since(t1) > 10*time.Second {
				return errors.New("cancelled stream still running after 10s")
			}
		}
		stops = append(stops, time.Since(t1))
	}
	slicesSort(stops)

	r.table("streaming and sessions (floor: the framed protocol with no daemon)", []row{
		{"stream throughput, small chunks", fmt.Sprintf("%.0f chunks/s", rate), fmt.Sprintf("%.0f chunks/s", floorRate), "100,000 integers, one stream"},
		{"time to first chunk, p50", us(pct(firsts, 0.5)), us(pct(floorFirst, 0.5)), ""},
		{"session call p50 vs sessionless", us(pct(sess, 0.5)), us(pct(plain, 0.5)) + " sessionless", fmt.Sprintf("ratio %.2f (target within 10%%)", float64(pct(sess, 0.5))/float64(pct(plain, 0.5)))},
		{"daemon RSS during a slow 100,000-chunk stream", fmt.Sprintf("%.1f MB peak", float64(peak)/1024), fmt.Sprintf("%.1f MB before", float64(before)/1024), "64 KiB client window"},
		{"cancel to generator stopped and slot free, p50/max", us(pct(stops, 0.5)) + " / " + us(stops[len(stops)-1]), "", "target < 100 ms"},
	})
	return nil
}
