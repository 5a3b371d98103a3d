package bench

import (
	"context"
	"fmt"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/snakepit/snakepit/pkg/client"
	snakepitv1 "github.com/snakepit/snakepit/proto/snakepit/v1"
)

// benchDrain: drain one of three nodes that holds its share of 200 live
// sessions while 16 clients call; time to drained and calls failed
// (target 0), beside the floor: the time of the calls it has to wait for.
func benchDrain(ctx context.Context, o options, r *report) error {
	agent, err := startConsul(ctx)
	if err != nil {
		return err
	}
	defer agent.stop()
	ids := []string{"drain-a", "drain-b", "drain-c"}
	var ds []*daemon
	for _, id := range ids {
		d, err := startDaemon(ctx, o, clusterNodeConfig(id, agent.addr, 2*time.Second))
		if err != nil {
			return err
		}
		defer d.stop()
		ds = append(ds, d)
	}
	if err := waitPeers(ctx, ds, ids, 30*time.Second); err != nil {
		return err
	}
	const sessions = 200
	const callTime = 20 * time.Millisecond
	onVictim := 0
	for i := 0; i < sessions; i++ {
		resp, err := ds[i%3].conn.Snakepit.Execute(ctx, &snakepitv1.ExecuteRequest{Tool: "note", Args: []byte(`{"text": "x"}`), SessionId: fmt.Sprintf("bench-%d", i)})
		if err != nil {
			return err
		}
		if resp.GetRanOn().GetNodeId() == ids[1] {
			onVictim++
		}
	}
	var calls, failed atomic.Int64
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for g := 0; g < 16; g++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				req := &snakepitv1.ExecuteRequest{Tool: "sleep", Args: []byte(fmt.Sprintf(`{"seconds": %g}`, callTime.Seconds()))}
				if g%2 == 0 {
					req = &snakepitv1.ExecuteRequest{Tool: "note", Args: []byte(`{"text": "y"}`), SessionId: fmt.Sprintf("bench-%d", (g*31+i)%sessions)}
				}
				if _, err := ds[(g+i)%3].conn.Snakepit.Execute(ctx, req); err != nil {
					failed.Add(1)
				}
				calls.Add(1)
			}
		}()
	}
	for calls.Load() < 200 {
		time.Sleep(5 * time.Millisecond)
	}
	ac, err := client.Dial("unix://" + filepath.Join(ds[1].dir, "state", "admin.sock"))
	if err != nil {
		return err
	}
	defer ac.Close()
	t0 := time.Now()
	st, err := ac.Admin.Drain(ctx, &snakepitv1.DrainRequest{Deadline: durationpb.New(time.Minute)})
	if err != nil {
		return err
	}
	var last *snakepitv1.DrainProgress
	for {
		p, err := st.Recv()
		if err != nil {
			break
		}
		last = p
	}
	took := time.Since(t0)
	before := calls.Load()
	for calls.Load() < before+200 {
		time.Sleep(5 * time.Millisecond)
	}
	close(stop)
	wg.Wait()
	if last == nil || !last.GetDrained() {
		return fmt.Errorf("drain did not report drained: %v", last)
	}
	r.table("drain (3 daemons, Consul; floor: one call's run time)", []row{
		{fmt.Sprintf("time to drained, %d of %d sessions on the node, 16 clients", onVictim, sessions), ms(took), ms(callTime), "reports every 100 ms"},
		{"calls failed during the drain", fmt.Sprintf("%d of %d", failed.Load(), calls.Load()), "0", "none idempotent"},
	})
	return nil
}
