package policy_test

import (
	"testing"

	"github.com/snakepit/snakepit/pkg/agent/policy"
)

type admitCase struct {
	name string
	s    policy.QueueState
	want policy.QueueAction
}

func runAdmits(t *testing.T, q policy.QueuePolicy, cases []admitCase) {
	t.Helper()
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			if got := q.Admit(tc.s); got != tc.want {
				t.Errorf("Admit(%+v) = %d, want %d", tc.s, got, tc.want)
			}
		})
	}
}

func TestBoundedQueue(t *testing.T) {
	runAdmits(t, queuePolicy(t, policy.Queue, nil), []admitCase{
		{"empty queue", policy.QueueState{Queued: 0, Depth: 4}, policy.Wait},
		{"below depth", policy.QueueState{Queued: 3, Depth: 4}, policy.Wait},
		{"below depth, movable", policy.QueueState{Queued: 3, Depth: 4, Movable: true}, policy.Wait},
		{"at depth", policy.QueueState{Queued: 4, Depth: 4}, policy.Refuse},
		{"at depth, movable", policy.QueueState{Queued: 4, Depth: 4, Movable: true}, policy.Refuse},
		{"above depth", policy.QueueState{Queued: 9, Depth: 4}, policy.Refuse},
		{"no queue", policy.QueueState{Queued: 0, Depth: 0}, policy.Refuse},
	})
}

func TestReject(t *testing.T) {
	runAdmits(t, queuePolicy(t, policy.Reject, nil), []admitCase{
		{"empty queue", policy.QueueState{Queued: 0, Depth: 4}, policy.Refuse},
		{"empty queue, movable", policy.QueueState{Queued: 0, Depth: 4, Movable: true}, policy.Refuse},
		{"below depth", policy.QueueState{Queued: 3, Depth: 4}, policy.Refuse},
		{"at depth", policy.QueueState{Queued: 4, Depth: 4}, policy.Refuse},
		{"no queue", policy.QueueState{}, policy.Refuse},
	})
}

func TestSpillover(t *testing.T) {
	t.Run("threshold 4", func(t *testing.T) {
		runAdmits(t, queuePolicy(t, policy.Spillover, policy.Options{"threshold": 4}), []admitCase{
			{"below threshold, movable", policy.QueueState{Queued: 3, Depth: 10, Movable: true}, policy.Wait},
			{"at threshold, movable", policy.QueueState{Queued: 4, Depth: 10, Movable: true}, policy.Spill},
			{"above threshold, movable", policy.QueueState{Queued: 7, Depth: 10, Movable: true}, policy.Spill},
			{"at depth, movable", policy.QueueState{Queued: 10, Depth: 10, Movable: true}, policy.Spill},
			{"at threshold, not movable", policy.QueueState{Queued: 4, Depth: 10}, policy.Wait},
			{"below depth, not movable", policy.QueueState{Queued: 9, Depth: 10}, policy.Wait},
			{"at depth, not movable", policy.QueueState{Queued: 10, Depth: 10}, policy.Refuse},
		})
	})
	t.Run("default threshold 0", func(t *testing.T) {
		runAdmits(t, queuePolicy(t, policy.Spillover, nil), []admitCase{
			{"empty queue, movable", policy.QueueState{Queued: 0, Depth: 10, Movable: true}, policy.Spill},
			{"empty queue, not movable", policy.QueueState{Queued: 0, Depth: 10}, policy.Wait},
			{"at depth, not movable", policy.QueueState{Queued: 10, Depth: 10}, policy.Refuse},
		})
	})
	t.Run("threshold above depth", func(t *testing.T) {
		runAdmits(t, queuePolicy(t, policy.Spillover, policy.Options{"threshold": 20}), []admitCase{
			{"below depth, movable", policy.QueueState{Queued: 9, Depth: 10, Movable: true}, policy.Wait},
			{"at depth, movable", policy.QueueState{Queued: 10, Depth: 10, Movable: true}, policy.Refuse},
			{"at threshold, movable", policy.QueueState{Queued: 20, Depth: 10, Movable: true}, policy.Spill},
		})
	})
	// Config loaders give numbers as int, int64, uint64 or float64, and may
	// change the case of keys.
	for name, opts := range map[string]policy.Options{
		"int":         {"threshold": 2},
		"int64":       {"threshold": int64(2)},
		"int32":       {"threshold": int32(2)},
		"uint64":      {"threshold": uint64(2)},
		"float64":     {"threshold": 2.0},
		"upper case":  {"THRESHOLD": 2},
		"capitalized": {"Threshold": 2},
	} {
		t.Run("threshold as "+name, func(t *testing.T) {
			q := queuePolicy(t, policy.Spillover, opts)
			for _, tc := range []admitCase{
				{"below", policy.QueueState{Queued: 1, Depth: 10, Movable: true}, policy.Wait},
				{"at", policy.QueueState{Queued: 2, Depth: 10, Movable: true}, policy.Spill},
			} {
				if got := q.Admit(tc.s); got != tc.want {
					t.Errorf("%s: Admit(%+v) = %d, want %d", tc.name, tc.s, got, tc.want)
				}
			}
		})
	}
}

// TestAdmitDoesNotAllocate: Admit runs under the pool's lock.
func TestAdmitDoesNotAllocate(t *testing.T) {
	for _, ref := range []policy.Ref{{Name: policy.Queue}, {Name: policy.Reject}, {Name: policy.Spillover, Options: policy.Options{"threshold": 3}}} {
		q := queuePolicy(t, ref.Name, ref.Options)
		for _, s := range []policy.QueueState{{Queued: 0, Depth: 8}, {Queued: 5, Depth: 8, Movable: true}, {Queued: 8, Depth: 8}} {
			var got policy.QueueAction
			if n := testing.AllocsPerRun(100, func() { got = q.Admit(s) }); n != 0 {
				t.Errorf("%s: Admit(%+v) allocates %v times per call, want 0", ref.Name, s, n)
			}
			_ = got
		}
	}
}
