package agent

import (
	"context"
	"testing"

	"github.com/snakepit/snakepit/pkg/pyruntime"
	snakepitv1 "github.com/snakepit/snakepit/proto/snakepit/v1"
)

// BenchmarkExecute measures a no-op call through gRPC, the node and a
// worker, client and server in one process (make bench runs the daemon as
// its own process and prints the floors beside it).
func BenchmarkExecute(b *testing.B) {
	tn := startNode(b, testConfig(b, PoolConfig{Name: "test", Adapter: pyruntime.ExampleAdapter, Size: 2}))
	req := &snakepitv1.ExecuteRequest{Tool: "noop", Pool: "test", Args: []byte("{}")}
	ctx := context.Background()
	b.ReportAllocs()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		if _, err := tn.sp.Execute(ctx, req); err != nil {
			b.Fatal(err)
		}
	}
}
