package engine

import (
	"context"
	"encoding/json"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/NVIDIA/go-nvml/pkg/nvml"
	"github.com/NVIDIA/go-nvml/pkg/nvml/mock/dgxa100"

	"github.com/snakepit/snakepit/pkg/agent/call"
	"github.com/snakepit/snakepit/pkg/hw"
)

// mockInventory is the inventory of go-nvml's DGX A100 mock (eight
// A100-SXM4-40GB), read through the mock's NVML calls as hw.Detect reads
// a real host.
func mockInventory(t testing.TB) hw.Inventory {
	t.Helper()
	srv := dgxa100.New()
	var inv hw.Inventory
	for i, d := range srv.Devices {
		dev := d.(*dgxa100.Device)
		uuid, r1 := dev.GetUUID()
		name, r2 := dev.GetName()
		mem, r3 := dev.GetMemoryInfo()
		if r1 != nvml.SUCCESS || r2 != nvml.SUCCESS || r3 != nvml.SUCCESS {
			t.Fatalf("mock device %d: %v %v %v", i, r1, r2, r3)
		}
		inv.GPUs = append(inv.GPUs, hw.GPU{Index: i, UUID: uuid, Name: name, MemoryTotal: mem.Total, MemoryFree: mem.Free})
	}
	return inv
}

func uuids(inv hw.Inventory, idx ...int) []string {
	var out []string
	for _, i := range idx {
		out = append(out, inv.GPUs[i].UUID)
	}
	return out
}

func TestPlanGPUs(t *testing.T) {
	inv := mockInventory(t)
	pool := func(name string, size, per int, excl bool, pinned ...string) PoolConfig {
		return PoolConfig{Name: name, Size: size, GPUs: GPUConfig{PerWorker: per, Exclusive: excl, Pinned: pinned}}
	}
	tests := []struct {
		name  string
		pools []PoolConfig
		inv   hw.Inventory
		want  map[string][][]string // first Size slots of each pool
		err   string
	}{
		{
			name:  "no pool asks",
			pools: []PoolConfig{pool("a", 2, 0, false)},
			inv:   inv,
			want:  map[string][][]string{},
		},
		{
			name:  "exclusive pool takes its GPUs from the shared one",
			pools: []PoolConfig{pool("shared", 3, 1, false), pool("train", 2, 2, true)},
			inv:   inv,
			want: map[string][][]string{
				"train":  {uuids(inv, 0, 1), uuids(inv, 2, 3)},
				"shared": {uuids(inv, 4), uuids(inv, 5), uuids(inv, 6)},
			},
		},
		{
			name:  "pinned, in the order given",
			pools: []PoolConfig{pool("p", 2, 1, true, uuids(inv, 7, 3)...)},
			inv:   inv,
			want:  map[string][][]string{"p": {uuids(inv, 7), uuids(inv, 3)}},
		},
		{
			name:  "exclusive pools need more GPUs than there are",
			pools: []PoolConfig{pool("a", 3, 2, true), pool("b", 2, 2, true)},
			inv:   inv,
			err:   "pools[b].gpus.exclusive with 2 workers × gpus.per_worker=2 needs 4 GPUs but only 2 GPUs available",
		},
		{
			name:  "pinning a GPU an exclusive pool holds",
			pools: []PoolConfig{pool("a", 1, 1, true), pool("b", 1, 1, false, uuids(inv, 0)...)},
			inv:   inv,
			err:   "pools[b].gpus.pinned[0]: \"" + inv.GPUs[0].UUID + "\" is not an available GPU",
		},
		{
			name:  "host without GPUs",
			pools: []PoolConfig{pool("a", 1, 0, false), pool("gpu", 1, 1, false)},
			inv:   hw.Inventory{GPUErr: hw.ErrNoNVML},
			err:   "pools[gpu].gpus.per_worker=1 but this host has no GPU (NVML library not found)",
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := planGPUs(tt.pools, tt.inv)
			if tt.err != "" {
				if err == nil || !strings.Contains(err.Error(), tt.err) {
					t.Fatalf("planGPUs = %v, want an error containing %q", err, tt.err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if len(got) != len(tt.want) {
				t.Fatalf("planGPUs assigned pools %v, want %v", got, tt.want)
			}
			for _, p := range tt.pools {
				w, ok := tt.want[p.Name]
				if !ok {
					continue
				}
				if g := got[p.Name]; len(g) < p.Size || !equalSlots(g[:p.Size], w) {
					t.Errorf("pool %s: slots %v, want %v", p.Name, g[:min(len(g), p.Size)], w)
				}
			}
		})
	}
}

func equalSlots(a, b [][]string) bool {
	return slices.EqualFunc(a, b, func(x, y []string) bool { return slices.Equal(x, y) })
}

// No GPU of an exclusive pool is given to another worker, of any pool,
// including slots a resize would add to a shared pool.
func TestPlanGPUsExclusiveNeverShared(t *testing.T) {
	inv := mockInventory(t)
	pools := []PoolConfig{
		{Name: "a", Size: 2, GPUs: GPUConfig{PerWorker: 1, Exclusive: true}},
		{Name: "b", Size: 5, GPUs: GPUConfig{PerWorker: 2}},
		{Name: "c", Size: 1, GPUs: GPUConfig{PerWorker: 3, Exclusive: true}},
	}
	plan, err := planGPUs(pools, inv)
	if err != nil {
		t.Fatal(err)
	}
	owner := map[string]string{}
	for _, p := range []string{"a", "c"} {
		for i, ids := range plan[p] {
			for _, id := range ids {
				if o, dup := owner[id]; dup {
					t.Fatalf("GPU %s given to %s and to %s worker %d", id, o, p, i)
				}
				owner[id] = p
			}
		}
	}
	if len(plan["b"]) < sharedSlotsAhead {
		t.Errorf("shared pool b has %d slots assigned, want at least %d", len(plan["b"]), sharedSlotsAhead)
	}
	for i, ids := range plan["b"] {
		for _, id := range ids {
			if o, taken := owner[id]; taken {
				t.Fatalf("pool b slot %d got GPU %s, held exclusively by pool %s", i, id, o)
			}
		}
		if len(ids) != 2 || ids[0] == ids[1] {
			t.Fatalf("pool b slot %d got %v, want 2 distinct GPUs", i, ids)
		}
	}
}

// visibleAdapter reports what its process sees: pid and
// CUDA_VISIBLE_DEVICES (None when unset), after holding its worker for a
// while, so that concurrent calls land on distinct workers.
const visibleAdapter = `import os, time
from snakepit import tool

@tool
def visible(hold: float = 0.0) -> dict:
    time.sleep(hold)
    return {"pid": os.getpid(), "cuda": os.environ.get("CUDA_VISIBLE_DEVICES")}
`

// Real Python workers see the GPUs the node assigned them, by UUID, and the
// assignment shows in Status; a pool without GPUs sees none on a GPU host.
func TestGPUAssignmentReachesWorkers(t *testing.T) {
	if testing.Short() {
		t.Skip("starts Python workers")
	}
	inv := mockInventory(t)
	adapter := writeAdapter(t, "visible.py", visibleAdapter)
	cfg := testConfig(t,
		PoolConfig{Name: "train", Adapter: adapter, Size: 2, GPUs: GPUConfig{PerWorker: 2, Exclusive: true}},
		PoolConfig{Name: "serve", Adapter: adapter, Size: 2, GPUs: GPUConfig{PerWorker: 1}},
		PoolConfig{Name: "cpu", Adapter: adapter, Size: 1},
	)
	n, ctx := runGPUNode(t, cfg, inv)

	// What each worker process sees, by pid.
	seen := func(pool string, workers int) map[int]*string {
		t.Helper()
		type answer struct {
			PID  int     `json:"pid"`
			CUDA *string `json:"cuda"`
		}
		var mu sync.Mutex
		out := map[int]*string{}
		var wg sync.WaitGroup
		errs := make(chan error, workers)
		for range workers {
			wg.Add(1)
			go func() {
				defer wg.Done()
				cctx, ccancel := context.WithTimeout(ctx, 30*time.Second)
				defer ccancel()
				res, err := n.Execute(cctx, &call.Request{Pool: pool, Tool: "visible", Args: []byte(`{"hold": 0.5}`)}, nil)
				if err != nil {
					errs <- err
					return
				}
				var a answer
				if err := json.Unmarshal(res.Payload, &a); err != nil {
					errs <- err
					return
				}
				mu.Lock()
				out[a.PID] = a.CUDA
				mu.Unlock()
			}()
		}
		wg.Wait()
		close(errs)
		for err := range errs {
			t.Fatalf("pool %s: %v", pool, err)
		}
		if len(out) != workers {
			t.Fatalf("pool %s: %d concurrent calls reached %d workers, want %d", pool, workers, len(out), workers)
		}
		return out
	}

	status := map[string]PoolStatus{}
	for _, p := range n.Status().Pools {
		status[p.Name] = p
	}
	held := map[string]string{} // GPU -> pool, for exclusive pools
	for _, pool := range []string{"train", "serve"} {
		got := seen(pool, 2)
		for _, w := range status[pool].Workers {
			env, ok := got[w.PID]
			if !ok {
				t.Fatalf("pool %s worker %d (pid %d) not reached; reached %v", pool, w.ID, w.PID, got)
			}
			if env == nil || *env != strings.Join(w.GPUs, ",") || len(w.GPUs) == 0 {
				t.Errorf("pool %s worker %d sees CUDA_VISIBLE_DEVICES=%v, status says GPUs %v", pool, w.ID, deref(env), w.GPUs)
			}
			for _, id := range w.GPUs {
				if _, known := inv.GPU(id); !known {
					t.Errorf("pool %s worker %d: %q is not a GPU of the host", pool, w.ID, id)
				}
				if o, dup := held[id]; dup {
					t.Errorf("GPU %s of exclusive pool %s also given to pool %s worker %d", id, o, pool, w.ID)
				}
				if pool == "train" {
					held[id] = pool
				}
			}
		}
	}
	if n := len(held); n != 4 {
		t.Errorf("exclusive pool train holds %d GPUs, want 4 (2 workers × 2)", n)
	}
	for pid, env := range seen("cpu", 1) {
		if env == nil || *env != "" {
			t.Errorf("cpu pool worker (pid %d) sees CUDA_VISIBLE_DEVICES=%v, want it set empty (no GPU)", pid, deref(env))
		}
	}
	if w := status["cpu"].Workers[0]; len(w.GPUs) != 0 {
		t.Errorf("cpu pool worker status GPUs = %v, want none", w.GPUs)
	}
}

func deref(s *string) string {
	if s == nil {
		return "<unset>"
	}
	return *s
}
