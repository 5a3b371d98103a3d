package engine

import (
	"errors"
	"fmt"
	"maps"
	"strings"

	"github.com/snakepit/snakepit/pkg/hw"
)

// GPUConfig pins a pool's workers to GPUs (key pools[].gpus). Each worker
// sees only its GPUs, by UUID, through CUDA_VISIBLE_DEVICES; the assignment
// is made when the node starts (hw.Assign) and shows in status.
type GPUConfig struct {
	// PerWorker is how many GPUs each worker gets; 0 means none (on a host
	// with GPUs its workers then see none).
	PerWorker int `mapstructure:"per_worker"`
	// Exclusive gives no GPU of this pool to two workers, of this pool or
	// of any other: the pool needs size × per_worker GPUs of its own.
	// Otherwise workers share GPUs round-robin, load spread evenly.
	Exclusive bool `mapstructure:"exclusive"`
	// Pinned restricts the pool to these GPU UUIDs, used in the order
	// given; empty means any GPU of the host that no exclusive pool holds.
	Pinned []string `mapstructure:"pinned"`
}

// visibleDevicesVar is the variable through which CUDA (and so PyTorch,
// JAX, TensorFlow, CuPy) learns which GPUs a process may use.
const visibleDevicesVar = "CUDA_VISIBLE_DEVICES"

// sharedSlotsAhead is how many worker slots of a shared (not exclusive) GPU
// pool get an assignment: more than the configured size; slot i uses
// assignment i mod sharedSlotsAhead, so workers added by a resize get GPUs
// too. Round-robin does not depend on the pool's size, so the first size
// slots are assigned exactly as hw.Assign(size) would.
const sharedSlotsAhead = 1024

// Validate checks the gpus keys of the pool whose key is key ("pools[x]").
func (g GPUConfig) Validate(key string, p PoolConfig, bad func(string, ...any)) {
	if g.PerWorker < 0 {
		bad("%s.gpus.per_worker must not be negative (got %d)", key, g.PerWorker)
		return
	}
	if g.PerWorker == 0 {
		if g.Exclusive {
			bad("%s.gpus.exclusive needs gpus.per_worker >= 1 (got 0)", key)
		}
		if len(g.Pinned) > 0 {
			bad("%s.gpus.pinned needs gpus.per_worker >= 1 (got 0)", key)
		}
		return
	}
	seen := map[string]bool{}
	for i, id := range g.Pinned {
		switch {
		case id == "":
			bad("%s.gpus.pinned[%d] is empty; want a GPU UUID (nvidia-smi -L lists them)", key, i)
		case seen[id]:
			bad("%s.gpus.pinned[%d]: %q listed twice", key, i, id)
		}
		seen[id] = true
	}
	if len(g.Pinned) > 0 && g.PerWorker > len(g.Pinned) {
		bad("%s.gpus.per_worker=%d but gpus.pinned lists %d GPUs", key, g.PerWorker, len(g.Pinned))
	}
	for k := range p.Env {
		// Case-insensitively: config file loaders may lower-case map keys.
		if strings.EqualFold(k, visibleDevicesVar) {
			bad("%s.env.%s conflicts with gpus.per_worker; pin GPUs with gpus.pinned", key, visibleDevicesVar)
		}
	}
}

// planGPUs assigns GPUs to the worker slots of every pool that asks for
// them: exclusive pools first (in config order), each taking its GPUs away
// from the pools after it, then shared pools among the GPUs no exclusive
// pool holds. It returns, per pool, the UUIDs of each slot. Errors name the
// pool's key.
func planGPUs(pools []PoolConfig, inv hw.Inventory) (map[string][][]string, error) {
	out := map[string][][]string{}
	var taken [][]string
	var errs []error
	for _, exclusive := range []bool{true, false} {
		for _, p := range pools {
			g := p.GPUs
			if g.PerWorker == 0 || g.Exclusive != exclusive {
				continue
			}
			key := fmt.Sprintf("pools[%s]", p.Name)
			if len(inv.GPUs) == 0 {
				why := "NVML found none"
				if inv.GPUErr != nil {
					why = inv.GPUErr.Error()
				}
				errs = append(errs, fmt.Errorf("%s.gpus.per_worker=%d but this host has no GPU (%s)", key, g.PerWorker, why))
				continue
			}
			workers := p.Size
			if !exclusive {
				workers = max(p.Size, sharedSlotsAhead)
			}
			avail := hw.Without(inv.GPUs, taken...)
			slots, err := hw.Assign(avail, workers, g.PerWorker, g.Exclusive, g.Pinned)
			if err != nil {
				errs = append(errs, fmt.Errorf("%s.%w", key, trimSentinel(err)))
				continue
			}
			if exclusive {
				for _, ids := range slots {
					taken = append(taken, ids)
				}
			}
			out[p.Name] = slots
		}
	}
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	return out, nil
}

// gpuKeyError keeps hw's sentinel for errors.Is while the message starts
// with the key, so that "pools[x]." + message reads as one key.
type gpuKeyError struct {
	msg      string
	sentinel error
}

func (e *gpuKeyError) Error() string { return e.msg }
func (e *gpuKeyError) Unwrap() error { return e.sentinel }

// trimSentinel turns hw's "not enough GPUs: gpus.per_worker=…" into
// "gpus.per_worker=…: not enough GPUs", so the key comes first.
func trimSentinel(err error) error {
	for _, s := range []error{hw.ErrNotEnoughGPUs, hw.ErrUnknownGPU} {
		prefix := s.Error() + ": "
		if msg := err.Error(); errors.Is(err, s) && len(msg) > len(prefix) && msg[:len(prefix)] == prefix {
			return &gpuKeyError{msg: msg[len(prefix):], sentinel: s}
		}
	}
	return err
}

// applyGPUs assigns GPUs to the pools (see planGPUs) and sets each
// slot's GPUs, which become its workers' CUDA_VISIBLE_DEVICES and show in
// status. On a host with GPUs, workers of pools that ask for none, and
// workers added past a pool's assignment, get CUDA_VISIBLE_DEVICES empty:
// they see no GPU, so none can touch a GPU an exclusive pool holds. It must
// is called by New.
func (e *Engine) applyGPUs(inv hw.Inventory) error {
	pools := make([]PoolConfig, 0, len(e.order))
	for _, name := range e.order {
		pools = append(pools, e.pools[name].cfg)
	}
	plan, err := planGPUs(pools, inv)
	if err != nil {
		return err
	}
	if len(inv.GPUs) > 0 {
		e.gpuBook = newGPUBook(pools, plan, inv)
	}
	for _, name := range e.order {
		p := e.pools[name]
		p.gpus = plan[name]
		if p.exclusiveGPUs() {
			// The start-time slots take their groups in slot order, so
			// worker i gets group i, as logged.
			p.mu.Lock()
			for _, s := range p.slots {
				if s.gpus, err = e.gpuBook.take(p.cfg); err != nil {
					p.mu.Unlock()
					return err // planGPUs counted them: cannot happen
				}
			}
			p.mu.Unlock()
		}
		for i, ids := range p.gpus {
			if i < p.cfg.Size {
				for _, id := range ids {
					e.log.Info().Str("pool", name).Int("worker_id", i).Str("gpu_uuid", id).Msg("gpu assigned")
				}
			}
		}
		if len(inv.GPUs) == 0 {
			continue
		}
		if _, set := p.cfg.Env[visibleDevicesVar]; set {
			continue // the pool's own choice (only for pools without gpus)
		}
		env := maps.Clone(p.cfg.Env)
		if env == nil {
			env = map[string]string{}
		}
		env[visibleDevicesVar] = ""
		p.cfg.Env = env
	}
	return nil
}
