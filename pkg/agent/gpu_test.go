package agent

import (
	"context"
	"net"
	"strings"
	"testing"

	"github.com/rs/zerolog"

	"github.com/snakepit/snakepit/pkg/hw"
)

// On a host without GPUs, a pool that asks for them stops the node before
// it starts anything, with an error that names the key.
func TestGPUPoolOnCPUHostFailsStart(t *testing.T) {
	if inv := hw.Detect(zerolog.Nop()); len(inv.GPUs) > 0 {
		t.Skipf("this host has %d GPUs", len(inv.GPUs))
	}
	cfg := testConfig(t, PoolConfig{Name: "gpu", Adapter: testAdapter(t, "tools.py"), Size: 1, GPUs: GPUConfig{PerWorker: 1}})
	listened := false
	err := Serve(context.Background(), cfg, zerolog.Nop(), Hooks{Listening: func(net.Addr) { listened = true }})
	if err == nil || !strings.Contains(err.Error(), "pools[gpu].gpus.per_worker=1 but this host has no GPU") {
		t.Fatalf("Serve = %v, want an error naming pools[gpu].gpus.per_worker", err)
	}
	if listened {
		t.Error("Serve bound its port before refusing the GPU pool")
	}
}
