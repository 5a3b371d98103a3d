package engine

import (
	"github.com/snakepit/snakepit/pkg/agent/call"

	"errors"
	"os"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"
)

// The book hands an exclusive pool its start-time groups first, in order,
// then spare GPUs (pinned ones only, when the pool pins), and takes them
// back; it never hands out a GPU twice.
func TestGPUBookTakeGive(t *testing.T) {
	inv := mockInventory(t) // 8 GPUs
	train := PoolConfig{Name: "train", Size: 2, GPUs: GPUConfig{PerWorker: 2, Exclusive: true}}
	serve := PoolConfig{Name: "serve", Size: 1, GPUs: GPUConfig{PerWorker: 1, Pinned: uuids(inv, 7)}}
	pools := []PoolConfig{train, serve}
	plan, err := planGPUs(pools, inv)
	if err != nil {
		t.Fatal(err)
	}
	b := newGPUBook(pools, plan, inv)
	// train owns GPUs 0-3 (two groups); serve uses 7; 4, 5 and 6 are spare.
	if got := b.available(train); got != 3 {
		t.Fatalf("available = %d, want 3 (2 own groups + 3 spares / 2 per worker)", got)
	}
	held := map[string]bool{}
	var groups [][]string
	for i := range 3 {
		g, err := b.take(train)
		if err != nil {
			t.Fatalf("take %d: %v", i, err)
		}
		for _, id := range g {
			if held[id] {
				t.Fatalf("GPU %s handed out twice", id)
			}
			held[id] = true
		}
		groups = append(groups, g)
	}
	if !slices.Equal(groups[0], plan["train"][0]) || !slices.Equal(groups[1], plan["train"][1]) {
		t.Errorf("first groups %v, want the plan's %v", groups[:2], plan["train"])
	}
	if want := uuids(inv, 4, 5); !slices.Equal(groups[2], want) {
		t.Errorf("spare group %v, want GPUs 4 and 5 %v", groups[2], want)
	}
	_, err = b.take(train)
	var iae *call.InvalidArgumentError
	if !errors.As(err, &iae) || iae.Field != "size" || !strings.Contains(err.Error(), `pool "train" is exclusive with gpus.per_worker=2`) {
		t.Fatalf("take with one spare left = %v, want an error naming the pool and per_worker", err)
	}
	b.give("train", groups[0])
	b.give("train", groups[2])
	if got := b.available(train); got != 2 {
		t.Fatalf("available after giving two groups back = %d, want 2", got)
	}
	if g, _ := b.take(train); !slices.Equal(g, plan["train"][0]) {
		t.Errorf("take after give = %v, want the pool's own group first %v", g, plan["train"][0])
	}
	pinned := PoolConfig{Name: "pin", Size: 1, GPUs: GPUConfig{PerWorker: 1, Exclusive: true, Pinned: uuids(inv, 6)}}
	if got := b.available(pinned); got != 1 {
		t.Errorf("a pool pinned to spare GPU 6 can take %d, want 1", got)
	}
}

// An exclusive GPU pool grows and shrinks at runtime: new workers get GPUs
// no other worker holds (spares once the pool's own are used), a shrink
// gives them back for the next grow, and a grow past the free GPUs is
// refused without changing anything.
func TestExclusiveGPUPoolResize(t *testing.T) {
	if testing.Short() {
		t.Skip("starts Python workers")
	}
	inv := mockInventory(t)
	adapter := writeAdapter(t, "visible.py", visibleAdapter)
	cfg := testConfig(t,
		PoolConfig{Name: "train", Adapter: adapter, Size: 2, GPUs: GPUConfig{PerWorker: 1, Exclusive: true}},
		PoolConfig{Name: "serve", Adapter: adapter, Size: 1, GPUs: GPUConfig{PerWorker: 1, Pinned: uuids(inv, 7)}},
	)
	n, _ := runGPUNode(t, cfg, inv)
	// check waits until pool train has size ready workers, then checks
	// that every worker of the node sees exactly its GPUs (as the kernel
	// has its environment) and that no GPU of train is seen twice.
	check := func(size int) {
		t.Helper()
		deadline := time.Now().Add(60 * time.Second)
		for {
			st := n.Status()
			ok := true
			for _, p := range st.Pools {
				for _, w := range p.Workers {
					ok = ok && w.State == "ready"
				}
				if p.Name == "train" {
					ok = ok && len(p.Workers) == size
				}
			}
			if ok {
				held := map[string]int{}
				for _, p := range st.Pools {
					for _, w := range p.Workers {
						env := procEnv(t, w.PID)["CUDA_VISIBLE_DEVICES"]
						if env != strings.Join(w.GPUs, ",") || len(w.GPUs) != 1 {
							t.Errorf("pool %s worker %d (pid %d): CUDA_VISIBLE_DEVICES=%q, status GPUs %v; want one GPU, the same", p.Name, w.ID, w.PID, env, w.GPUs)
						}
						for _, id := range w.GPUs {
							held[id]++
							if held[id] > 1 {
								t.Errorf("GPU %s given to two workers (size %d)", id, size)
							}
						}
					}
				}
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("pool train not at %d ready workers within 60s: %+v", size, st.Pools)
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	check(2)
	// Own groups: GPUs 0 and 1; spares: 2 to 6 (7 is serve's).
	if _, err := n.Resize("train", 7, time.Second); err != nil {
		t.Fatalf("grow to 7 (2 own + 5 spare GPUs): %v", err)
	}
	check(7)
	_, err := n.Resize("train", 8, time.Second)
	var iae *call.InvalidArgumentError
	if !errors.As(err, &iae) || !strings.Contains(err.Error(), "GPUs are free for 0 more worker(s), not 1") {
		t.Fatalf("grow to 8 with every GPU held = %v, want an error saying none is free", err)
	}
	if _, err := n.Resize("train", 1, time.Second); err != nil {
		t.Fatal(err)
	}
	check(1)
	// The retired workers' GPUs come back once their workers stopped.
	deadline := time.Now().Add(30 * time.Second)
	for n.gpuBook.available(n.pools["train"].cfg) != 6 {
		if time.Now().After(deadline) {
			t.Fatalf("after shrinking to 1, %d GPUs free for train, want 6", n.gpuBook.available(n.pools["train"].cfg))
		}
		time.Sleep(10 * time.Millisecond)
	}
	if _, err := n.Resize("train", 4, time.Second); err != nil {
		t.Fatalf("grow back to 4: %v", err)
	}
	check(4)
}

// procEnv reads a process's environment from /proc.
func procEnv(t *testing.T, pid int) map[string]string {
	t.Helper()
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/environ")
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]string{}
	for kv := range strings.SplitSeq(string(b), "\x00") {
		if k, v, ok := strings.Cut(kv, "="); ok {
			out[k] = v
		}
	}
	return out
}
