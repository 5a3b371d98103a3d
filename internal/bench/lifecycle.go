package bench

import (
	"context"
	"fmt"
	"os/exec"
	"sync"
	"syscall"
	"time"

	snakepitv1 "github.com/snakepit/snakepit/proto/snakepit/v1"
)

// benchStartup: time from start to all workers ready, against a floor of
// bare interpreters started with the same parallelism; the time from a
// worker's SIGKILL to its replacement being ready; daemon RSS with 64
// workers.
func benchStartup(ctx context.Context, o options, r *report) error {
	var rows []row
	for _, n := range []int{16, 64, 100} {
		t0 := time.Now()
		d, err := startDaemon(ctx, o, poolConfig(n, 1))
		if err != nil {
			return err
		}
		took := time.Since(t0)
		var rss int
		if n == 64 {
			rss, err = rssKB(d.cmd.Process.Pid)
			if err != nil {
				d.stop()
				return err
			}
		}
		d.stop()
		floor, err := bareInterpreters(ctx, o, n, 16)
		if err != nil {
			return err
		}
		rows = append(rows, row{fmt.Sprintf("start to all ready, %d workers", n), ms(took), ms(floor) + fmt.Sprintf(" %d bare interpreters", n), "target < 2 s for 100"})
		if n == 64 {
			rows = append(rows, row{"daemon RSS, 64 workers", fmt.Sprintf("%.1f MB", float64(rss)/1024), "", "target < 60 MB; Python processes not counted"})
		}
	}
	// Kill each of 10 workers once: the default config, first crash of
	// each slot (repeated crashes of one slot back off exponentially).
	d, err := startDaemon(ctx, o, poolConfig(10, 1))
	if err != nil {
		return err
	}
	defer d.stop()
	var lat []time.Duration
	for i := 0; i < 10; i++ {
		st, err := d.conn.Snakepit.Status(ctx, &snakepitv1.StatusRequest{})
		if err != nil {
			return err
		}
		w := st.GetPools()[0].GetWorkers()[i]
		t0 := time.Now()
		if err := syscall.Kill(int(w.GetPid()), syscall.SIGKILL); err != nil {
			return err
		}
		for {
			st, err := d.conn.Snakepit.Status(ctx, &snakepitv1.StatusRequest{})
			if err != nil {
				return err
			}
			nw := st.GetPools()[0].GetWorkers()[i]
			if nw.GetGeneration() != w.GetGeneration() && nw.GetState() == "ready" {
				break
			}
			if time.Since(t0) > 30*time.Second {
				return fmt.Errorf("worker not replaced within 30s")
			}
			time.Sleep(time.Millisecond)
		}
		lat = append(lat, time.Since(t0))
	}
	slicesSort(lat)
	one, err := bareInterpreters(ctx, o, 1, 1)
	if err != nil {
		return err
	}
	rows = append(rows, row{"SIGKILL to replacement ready (p50 of 10)", ms(pct(lat, 0.5)), ms(one) + " one bare interpreter", "includes restart_backoff_min (20ms default)"})
	r.table("worker lifecycle", rows)
	return nil
}

func ms(d time.Duration) string { return fmt.Sprintf("%.0f ms", float64(d)/float64(time.Millisecond)) }

// bareInterpreters starts n `python -c pass` (the interpreter's real path,
// as the daemon resolves it), conc at a time, and returns the wall time.
func bareInterpreters(ctx context.Context, o options, n, conc int) (time.Duration, error) {
	out, err := exec.CommandContext(ctx, o.python, "-c", "import sys; sys.stdout.write(sys.executable)").Output()
	if err != nil {
		return 0, err
	}
	python := string(out)
	sem := make(chan struct{}, conc)
	var wg sync.WaitGroup
	var firstErr error
	var mu sync.Mutex
	t0 := time.Now()
	for i := 0; i < n; i++ {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			if err := exec.CommandContext(ctx, python, "-c", "pass").Run(); err != nil {
				mu.Lock()
				firstErr = err
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	return time.Since(t0), firstErr
}
