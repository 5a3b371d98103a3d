package hw

import (
	"errors"
	"fmt"
	"strings"
)

// ErrNotEnoughGPUs reports a GPU request that the available GPUs cannot meet.
var ErrNotEnoughGPUs = errors.New("not enough GPUs")

// ErrUnknownGPU reports a pinned GPU UUID that is not among the available GPUs.
var ErrUnknownGPU = errors.New("unknown GPU")

// Assign decides which GPUs each of a pool's workers sees. It returns one UUID
// list per worker, in worker order; VisibleDevices turns a list into the
// worker's CUDA_VISIBLE_DEVICES value.
//
//   - gpus are the GPUs this pool may use: the host's inventory minus the
//     GPUs other pools hold exclusively (see Without).
//   - workers is the pool size, perWorker the GPUs each worker gets (>= 1).
//   - exclusive: no GPU is given to two workers; otherwise workers share GPUs
//     round-robin, each worker's GPUs distinct, the load spread evenly.
//   - pinned, when not empty, restricts the pool to these UUIDs, used in the
//     order given.
//
// The result is deterministic: the same inputs give the same assignment.
// Errors wrap ErrNotEnoughGPUs or ErrUnknownGPU and name the pool setting at
// fault as gpus.per_worker, gpus.exclusive or gpus.pinned; callers prefix the
// pool's key.
func Assign(gpus []GPU, workers, perWorker int, exclusive bool, pinned []string) ([][]string, error) {
	if workers < 0 {
		return nil, fmt.Errorf("pool size must be >= 0 (got %d)", workers)
	}
	if perWorker < 1 {
		return nil, fmt.Errorf("gpus.per_worker must be >= 1 (got %d)", perWorker)
	}
	avail, err := candidates(gpus, pinned)
	if err != nil {
		return nil, err
	}
	if perWorker > len(avail) {
		return nil, fmt.Errorf("%w: gpus.per_worker=%d but only %s available", ErrNotEnoughGPUs, perWorker, countGPUs(len(avail)))
	}
	if exclusive && workers*perWorker > len(avail) {
		return nil, fmt.Errorf("%w: gpus.exclusive with %d workers × gpus.per_worker=%d needs %d GPUs but only %s available",
			ErrNotEnoughGPUs, workers, perWorker, workers*perWorker, countGPUs(len(avail)))
	}
	out := make([][]string, workers)
	for w := range workers {
		ids := make([]string, perWorker)
		for k := range perWorker {
			// Consecutive slots modulo len(avail): distinct within a worker
			// because perWorker <= len(avail); disjoint across workers when
			// exclusive because workers*perWorker <= len(avail).
			ids[k] = avail[(w*perWorker+k)%len(avail)].UUID
		}
		out[w] = ids
	}
	return out, nil
}

func countGPUs(n int) string {
	if n == 1 {
		return "1 GPU"
	}
	return fmt.Sprintf("%d GPUs", n)
}

// candidates returns the GPUs a pool may use, in the order it uses them.
func candidates(gpus []GPU, pinned []string) ([]GPU, error) {
	byUUID := make(map[string]GPU, len(gpus))
	for _, g := range gpus {
		if g.UUID == "" {
			return nil, fmt.Errorf("GPU at index %d has no UUID", g.Index)
		}
		if _, dup := byUUID[g.UUID]; dup {
			return nil, fmt.Errorf("GPU %s listed twice", g.UUID)
		}
		byUUID[g.UUID] = g
	}
	if len(pinned) == 0 {
		return gpus, nil
	}
	out := make([]GPU, 0, len(pinned))
	seen := make(map[string]bool, len(pinned))
	for i, id := range pinned {
		if seen[id] {
			return nil, fmt.Errorf("gpus.pinned[%d]: %s listed twice", i, id)
		}
		seen[id] = true
		g, ok := byUUID[id]
		if !ok {
			return nil, fmt.Errorf("%w: gpus.pinned[%d]: %q is not an available GPU (taken exclusively by another pool, or not on this host)", ErrUnknownGPU, i, id)
		}
		out = append(out, g)
	}
	return out, nil
}

// Without returns gpus minus those whose UUID appears in any of taken, in the
// original order. A daemon uses it to hide the GPUs that exclusive pools hold
// from the pools assigned after them.
func Without(gpus []GPU, taken ...[]string) []GPU {
	drop := make(map[string]bool)
	for _, ids := range taken {
		for _, id := range ids {
			drop[id] = true
		}
	}
	out := make([]GPU, 0, len(gpus))
	for _, g := range gpus {
		if !drop[g.UUID] {
			out = append(out, g)
		}
	}
	return out
}

// VisibleDevices returns the CUDA_VISIBLE_DEVICES value for a worker that may
// use the given GPUs. UUIDs, not indexes, are used so the value does not
// depend on CUDA_DEVICE_ORDER.
func VisibleDevices(uuids []string) string {
	return strings.Join(uuids, ",")
}
