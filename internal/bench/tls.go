package bench

import (
	"context"
	"fmt"
	"os"
	"time"

	"github.com/snakepit/snakepit/internal/testpki"
	"github.com/snakepit/snakepit/pkg/client"
	snakepitv1 "github.com/snakepit/snakepit/proto/snakepit/v1"
)

// benchTLS: the cost of TLS on the Execute path, against the same daemon
// configuration in plaintext, in the same run.
func benchTLS(ctx context.Context, o options, r *report) error {
	dir, err := os.MkdirTemp("", "spbench-tls-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	ca, err := testpki.New(dir, "spbench CA")
	if err != nil {
		return err
	}
	caFile := ca.PEM
	certFile, keyFile, err := ca.Write("spbench-node")
	if err != nil {
		return err
	}
	measure := func(config string, tls bool) (time.Duration, float64, error) {
		var d *daemon
		var err error
		if tls {
			opt, derr := client.TLS(caFile, "", "")
			if derr != nil {
				return 0, 0, derr
			}
			d, err = startDaemon(ctx, o, config, opt)
		} else {
			d, err = startDaemon(ctx, o, config)
		}
		if err != nil {
			return 0, 0, err
		}
		defer d.stop()
		req := &snakepitv1.ExecuteRequest{Tool: "noop"}
		call := func() error { _, err := d.conn.Snakepit.Execute(ctx, req); return err }
		for i := 0; i < 300; i++ {
			if err := call(); err != nil {
				return 0, 0, err
			}
		}
		lat, err := latencies(3000, call)
		if err != nil {
			return 0, 0, err
		}
		tput, err := throughput(32, o.duration, func(int) error { return call() })
		return pct(lat, 0.5), tput, err
	}
	base := poolConfig(2, 1)
	plainP50, plainTput, err := measure(base, false)
	if err != nil {
		return err
	}
	tlsP50, tlsTput, err := measure(base+fmt.Sprintf("tls:\n  cert_file: %s\n  key_file: %s\n", certFile, keyFile), true)
	if err != nil {
		return err
	}
	r.table("TLS on the Execute path (floor: the same daemon in plaintext)", []row{
		{"p50, concurrency 1", us(tlsP50), us(plainP50), fmt.Sprintf("+%s", us(tlsP50-plainP50))},
		{"throughput, concurrency 32", fmt.Sprintf("%.0f calls/s", tlsTput), fmt.Sprintf("%.0f calls/s", plainTput), fmt.Sprintf("ratio %.2f", tlsTput/plainTput)},
	})
	return nil
}
