package hw

import (
	"errors"
	"reflect"
	"strings"
	"testing"

	"github.com/NVIDIA/go-nvml/pkg/nvml/mock/dgxa100"
	"github.com/rs/zerolog"
)

func gpus(n int) []GPU {
	out := make([]GPU, n)
	for i := range out {
		out[i] = GPU{Index: i, UUID: "GPU-" + string(rune('a'+i))}
	}
	return out
}

func TestAssign(t *testing.T) {
	tests := []struct {
		name      string
		gpus      int
		workers   int
		perWorker int
		exclusive bool
		pinned    []string
		want      [][]string
		wantErr   error
		errText   string
	}{
		{name: "one each, exclusive", gpus: 4, workers: 4, perWorker: 1, exclusive: true,
			want: [][]string{{"GPU-a"}, {"GPU-b"}, {"GPU-c"}, {"GPU-d"}}},
		{name: "two each, exclusive", gpus: 4, workers: 2, perWorker: 2, exclusive: true,
			want: [][]string{{"GPU-a", "GPU-b"}, {"GPU-c", "GPU-d"}}},
		{name: "shared round robin", gpus: 2, workers: 5, perWorker: 1,
			want: [][]string{{"GPU-a"}, {"GPU-b"}, {"GPU-a"}, {"GPU-b"}, {"GPU-a"}}},
		{name: "shared two each of three", gpus: 3, workers: 3, perWorker: 2,
			want: [][]string{{"GPU-a", "GPU-b"}, {"GPU-c", "GPU-a"}, {"GPU-b", "GPU-c"}}},
		{name: "pinned order", gpus: 4, workers: 2, perWorker: 1, exclusive: true, pinned: []string{"GPU-d", "GPU-b"},
			want: [][]string{{"GPU-d"}, {"GPU-b"}}},
		{name: "zero workers", gpus: 1, workers: 0, perWorker: 1, exclusive: true, want: [][]string{}},
		{name: "exclusive short", gpus: 3, workers: 2, perWorker: 2, exclusive: true,
			wantErr: ErrNotEnoughGPUs, errText: "gpus.exclusive with 2 workers × gpus.per_worker=2 needs 4 GPUs but only 3 GPUs available"},
		{name: "per worker over all", gpus: 1, workers: 1, perWorker: 2,
			wantErr: ErrNotEnoughGPUs, errText: "gpus.per_worker=2 but only 1 GPU available"},
		{name: "no gpus", gpus: 0, workers: 1, perWorker: 1,
			wantErr: ErrNotEnoughGPUs, errText: "only 0 GPUs available"},
		{name: "pinned unknown", gpus: 2, workers: 1, perWorker: 1, pinned: []string{"GPU-z"},
			wantErr: ErrUnknownGPU, errText: `gpus.pinned[0]: "GPU-z"`},
		{name: "pinned twice", gpus: 2, workers: 1, perWorker: 1, pinned: []string{"GPU-a", "GPU-a"},
			errText: "gpus.pinned[1]: GPU-a listed twice"},
		{name: "per worker zero", gpus: 2, workers: 1, perWorker: 0, errText: "gpus.per_worker must be >= 1 (got 0)"},
		{name: "negative workers", gpus: 2, workers: -1, perWorker: 1, errText: "pool size must be >= 0 (got -1)"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := Assign(gpus(tt.gpus), tt.workers, tt.perWorker, tt.exclusive, tt.pinned)
			if tt.errText != "" {
				if err == nil || !strings.Contains(err.Error(), tt.errText) {
					t.Fatalf("Assign() error = %v, want one containing %q", err, tt.errText)
				}
				if tt.wantErr != nil && !errors.Is(err, tt.wantErr) {
					t.Errorf("Assign() error %v does not wrap %v", err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatalf("Assign() error = %v", err)
			}
			if !reflect.DeepEqual(got, tt.want) {
				t.Errorf("Assign() = %v, want %v", got, tt.want)
			}
		})
	}
}

// TestAssignInvariants checks, over many shapes, that no worker sees a GPU
// twice, exclusive pools never share a GPU, and shared pools spread evenly.
func TestAssignInvariants(t *testing.T) {
	for n := 1; n <= 8; n++ {
		for workers := 0; workers <= 10; workers++ {
			for per := 1; per <= n; per++ {
				for _, excl := range []bool{false, true} {
					got, err := Assign(gpus(n), workers, per, excl, nil)
					if excl && workers*per > n {
						if !errors.Is(err, ErrNotEnoughGPUs) {
							t.Fatalf("n=%d w=%d per=%d excl: err = %v, want ErrNotEnoughGPUs", n, workers, per, err)
						}
						continue
					}
					if err != nil {
						t.Fatalf("n=%d w=%d per=%d excl=%v: %v", n, workers, per, excl, err)
					}
					use := map[string]int{}
					for w, ids := range got {
						if len(ids) != per {
							t.Fatalf("worker %d got %d GPUs, want %d", w, len(ids), per)
						}
						mine := map[string]bool{}
						for _, id := range ids {
							if mine[id] {
								t.Fatalf("n=%d w=%d per=%d: worker %d sees %s twice", n, workers, per, w, id)
							}
							mine[id] = true
							use[id]++
						}
					}
					lo, hi := workers*per, 0
					for _, g := range gpus(n) {
						lo, hi = min(lo, use[g.UUID]), max(hi, use[g.UUID])
						if excl && use[g.UUID] > 1 {
							t.Fatalf("n=%d w=%d per=%d: exclusive GPU %s used %d times", n, workers, per, g.UUID, use[g.UUID])
						}
					}
					if hi-lo > 1 {
						t.Fatalf("n=%d w=%d per=%d excl=%v: uneven spread %v", n, workers, per, excl, use)
					}
				}
			}
		}
	}
}

func TestAssignAcrossPools(t *testing.T) {
	inv := detect(dgxa100.New(), zerolog.Nop())
	train, err := Assign(inv.GPUs, 3, 2, true, nil)
	if err != nil {
		t.Fatal(err)
	}
	var taken []string
	for _, ids := range train {
		taken = append(taken, ids...)
	}
	rest := Without(inv.GPUs, taken)
	if len(rest) != 2 {
		t.Fatalf("Without left %d GPUs, want 2", len(rest))
	}
	if _, err := Assign(rest, 1, 4, false, nil); !errors.Is(err, ErrNotEnoughGPUs) {
		t.Errorf("second pool asking 4 of 2 remaining: err = %v, want ErrNotEnoughGPUs", err)
	}
	if _, err := Assign(rest, 1, 1, true, []string{taken[0]}); !errors.Is(err, ErrUnknownGPU) {
		t.Errorf("pinning a GPU another pool holds: err = %v, want ErrUnknownGPU", err)
	}
	infer, err := Assign(rest, 4, 1, false, nil)
	if err != nil {
		t.Fatal(err)
	}
	if got := VisibleDevices(infer[1]); got != inv.GPUs[7].UUID {
		t.Errorf("CUDA_VISIBLE_DEVICES of worker 1 = %q, want %q", got, inv.GPUs[7].UUID)
	}
	if got, want := VisibleDevices(train[0]), inv.GPUs[0].UUID+","+inv.GPUs[1].UUID; got != want {
		t.Errorf("VisibleDevices = %q, want %q", got, want)
	}
}
