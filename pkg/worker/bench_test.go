package worker

import (
	"context"
	"testing"

	"github.com/snakepit/snakepit/pkg/pyruntime"
)

// BenchmarkRoundTrip measures one Go <-> Python call of a no-op tool over
// the framed protocol, the floor under every call the daemon serves.
func BenchmarkRoundTrip(b *testing.B) {
	w := startWorker(b, pyruntime.ExampleAdapter, 1)
	c := &Call{Tool: "noop", Args: []byte(`{}`), RequestID: "bench"}
	ctx := context.Background()
	b.ReportAllocs()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		if _, err := w.Call(ctx, c); err != nil {
			b.Fatal(err)
		}
	}
}
