package policy_test

import (
	"maps"
	"reflect"
	"testing"

	"github.com/snakepit/snakepit/pkg/agent/call"
	"github.com/snakepit/snakepit/pkg/agent/policy"
	"github.com/snakepit/snakepit/pkg/router"
)

// key is the config key of the test pool's policies block.
const key = "pools[p].policies"

// env is where the test policies run: pool p on a node in zone a.
func env() policy.Env {
	return policy.Env{Pool: "p", Key: key, Labels: map[string]string{"zone": "a", "rack": "r1"}}
}

// defaults names the shipped default of every kind.
func defaults() policy.Config {
	return policy.Config{
		Node:        policy.Ref{Name: policy.TwoChoices},
		SessionNode: policy.Ref{Name: policy.Rendezvous},
		Worker:      policy.Ref{Name: policy.SessionSticky},
		Queue:       policy.Ref{Name: policy.Queue},
		Affinity:    policy.Ref{Name: policy.Hint},
	}
}

// mustBuild builds c with the shipped policies, failing the test on error.
func mustBuild(t testing.TB, c policy.Config) *policy.Set {
	t.Helper()
	s, err := policy.Builtin().Build(env(), c)
	if err != nil {
		t.Fatalf("Build(%+v): %v", c, err)
	}
	return s
}

// buildErr builds c with the shipped policies and returns the error,
// failing the test when there is none.
func buildErr(t testing.TB, c policy.Config) error {
	t.Helper()
	s, err := policy.Builtin().Build(env(), c)
	if err == nil {
		t.Fatalf("Build(%+v) = %+v, nil; want an error", c, s)
	}
	if s != nil {
		t.Errorf("Build(%+v) returned a Set beside its error", c)
	}
	return err
}

func workerSelector(t testing.TB, name string, opts policy.Options) policy.WorkerSelector {
	t.Helper()
	c := defaults()
	c.Worker = policy.Ref{Name: name, Options: opts}
	return mustBuild(t, c).Worker
}

func queuePolicy(t testing.TB, name string, opts policy.Options) policy.QueuePolicy {
	t.Helper()
	c := defaults()
	c.Queue = policy.Ref{Name: name, Options: opts}
	return mustBuild(t, c).Queue
}

func nodeSelector(t testing.TB, name string, opts policy.Options) policy.NodeSelector {
	t.Helper()
	c := defaults()
	c.Node = policy.Ref{Name: name, Options: opts}
	return mustBuild(t, c).Node
}

func TestWorkerFree(t *testing.T) {
	for _, tc := range []struct {
		name          string
		w             policy.Worker
		free, hasRoom bool
	}{
		{"idle", policy.Worker{Busy: 0, Capacity: 1}, true, true},
		{"room left", policy.Worker{Busy: 3, Capacity: 4}, true, true},
		{"full", policy.Worker{Busy: 4, Capacity: 4}, false, false},
		{"over full", policy.Worker{Busy: 5, Capacity: 4}, false, false},
		{"no capacity", policy.Worker{}, false, false},
		{"recycling", policy.Worker{Busy: 0, Capacity: 4, Recycling: true}, false, true},
		{"recycling full", policy.Worker{Busy: 4, Capacity: 4, Recycling: true}, false, false},
		{"no session room", policy.Worker{Busy: 0, Capacity: 4, SessionRoom: false}, true, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := tc.w.Free(); got != tc.free {
				t.Errorf("%+v.Free() = %v, want %v", tc.w, got, tc.free)
			}
			if got := tc.w.HasRoom(); got != tc.hasRoom {
				t.Errorf("%+v.HasRoom() = %v, want %v", tc.w, got, tc.hasRoom)
			}
		})
	}
}

func TestDefault(t *testing.T) {
	s := policy.Default()
	if s.Node == nil || s.SessionNode == nil || s.Worker == nil || s.Queue == nil || s.Affinity == nil {
		t.Fatalf("Default() = %+v, want every policy set", s)
	}
	if !reflect.DeepEqual(s.Need, router.Constraints{}) || s.FilterKey != "" {
		t.Errorf("Default() Need, FilterKey = %+v, %q; want none", s.Need, s.FilterKey)
	}
	if s.Affinity != policy.HintPolicy {
		t.Errorf("Default().Affinity = %v, want HintPolicy", s.Affinity.Mode())
	}
	// The defaults behave as the shipped defaults of Build.
	built := mustBuild(t, defaults())
	if got, want := reflect.TypeOf(s.Node), reflect.TypeOf(built.Node); got != want {
		t.Errorf("Default().Node is a %v, want %v (two_choices)", got, want)
	}
	if got, want := reflect.TypeOf(s.SessionNode), reflect.TypeOf(built.SessionNode); got != want {
		t.Errorf("Default().SessionNode is a %v, want %v (rendezvous)", got, want)
	}
	if got, want := reflect.TypeOf(s.Worker), reflect.TypeOf(built.Worker); got != want {
		t.Errorf("Default().Worker is a %v, want %v (session_sticky)", got, want)
	}
	if got, want := reflect.TypeOf(s.Queue), reflect.TypeOf(built.Queue); got != want {
		t.Errorf("Default().Queue is a %v, want %v (queue)", got, want)
	}
	if got := s.Queue.Admit(policy.QueueState{Queued: 0, Depth: 1}); got != policy.Wait {
		t.Errorf("Default().Queue.Admit(below depth) = %d, want Wait", got)
	}
	if got := s.Queue.Admit(policy.QueueState{Queued: 1, Depth: 1, Movable: true}); got != policy.Refuse {
		t.Errorf("Default().Queue.Admit(at depth) = %d, want Refuse", got)
	}
}

func TestSetAffinityFor(t *testing.T) {
	for _, pool := range []string{policy.Hint, policy.StrictQueue, policy.StrictFailFast} {
		t.Run("pool="+pool, func(t *testing.T) {
			c := defaults()
			c.Affinity.Name = pool
			s := mustBuild(t, c)
			for _, tc := range []struct {
				a    call.Affinity
				want policy.AffinityPolicy
			}{
				{call.AffinityDefault, s.Affinity},
				{call.AffinityHint, policy.HintPolicy},
				{call.AffinityStrictQueue, policy.StrictQueuePolicy},
				{call.AffinityStrictFailFast, policy.StrictFailFastPolicy},
				{call.Affinity(99), s.Affinity}, // unknown modes: the pool's
			} {
				if got := s.AffinityFor(tc.a); got != tc.want {
					t.Errorf("AffinityFor(%v) = %v, want %v", tc.a, got.Mode(), tc.want.Mode())
				}
			}
			if got, want := s.AffinityFor(call.AffinityDefault).Mode().String(), pool; got != want {
				t.Errorf("AffinityFor(default).Mode() = %s, want the pool's %s", got, want)
			}
		})
	}
	if got := policy.Default().AffinityFor(call.AffinityDefault); got != policy.HintPolicy {
		t.Errorf("Default().AffinityFor(default) = %v, want hint", got.Mode())
	}
}

func TestSetConstraints(t *testing.T) {
	for _, tc := range []struct {
		name       string
		pool, call router.Constraints
		want       router.Constraints
	}{
		{
			name: "pool has none",
			call: router.Constraints{GPU: true, MinGPUMemoryMiB: 10, GPUModel: "A100", Labels: map[string]string{"zone": "a"}},
			want: router.Constraints{GPU: true, MinGPUMemoryMiB: 10, GPUModel: "A100", Labels: map[string]string{"zone": "a"}},
		},
		{
			name: "neither has any",
		},
		{
			name: "pool labels only",
			pool: router.Constraints{Labels: map[string]string{"zone": "a"}},
			want: router.Constraints{Labels: map[string]string{"zone": "a"}},
		},
		{
			name: "labels merged",
			pool: router.Constraints{Labels: map[string]string{"zone": "a"}},
			call: router.Constraints{Labels: map[string]string{"rack": "r1"}},
			want: router.Constraints{Labels: map[string]string{"zone": "a", "rack": "r1"}},
		},
		{
			name: "pool label wins",
			pool: router.Constraints{Labels: map[string]string{"zone": "a"}},
			call: router.Constraints{Labels: map[string]string{"zone": "b", "rack": "r1"}},
			want: router.Constraints{Labels: map[string]string{"zone": "a", "rack": "r1"}},
		},
		{
			name: "pool gpu added",
			pool: router.Constraints{GPU: true, MinGPUMemoryMiB: 40000, GPUModel: "H100"},
			call: router.Constraints{Labels: map[string]string{"zone": "b"}},
			want: router.Constraints{GPU: true, MinGPUMemoryMiB: 40000, GPUModel: "H100", Labels: map[string]string{"zone": "b"}},
		},
		{
			name: "larger memory kept",
			pool: router.Constraints{GPU: true, MinGPUMemoryMiB: 16000},
			call: router.Constraints{MinGPUMemoryMiB: 80000},
			want: router.Constraints{GPU: true, MinGPUMemoryMiB: 80000},
		},
		{
			name: "call gpu kept",
			pool: router.Constraints{Labels: map[string]string{"zone": "a"}},
			call: router.Constraints{GPU: true, GPUModel: "L4"},
			want: router.Constraints{GPU: true, GPUModel: "L4", Labels: map[string]string{"zone": "a"}},
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := &policy.Set{Need: tc.pool}
			callLabels, poolLabels := maps.Clone(tc.call.Labels), maps.Clone(tc.pool.Labels)
			got := s.Constraints(tc.call)
			if !reflect.DeepEqual(got, tc.want) && !(len(got.Labels) == 0 && len(tc.want.Labels) == 0 &&
				reflect.DeepEqual(withoutLabels(got), withoutLabels(tc.want))) {
				t.Errorf("Constraints(%+v) with pool %+v = %+v, want %+v", tc.call, tc.pool, got, tc.want)
			}
			if !maps.Equal(tc.call.Labels, callLabels) {
				t.Errorf("Constraints modified the call's labels: %v, was %v", tc.call.Labels, callLabels)
			}
			if !maps.Equal(tc.pool.Labels, poolLabels) || !maps.Equal(s.Need.Labels, poolLabels) {
				t.Errorf("Constraints modified the pool's labels: %v, was %v", s.Need.Labels, poolLabels)
			}
		})
	}
}

func withoutLabels(c router.Constraints) router.Constraints {
	c.Labels = nil
	return c
}

func TestSetConstraintsDoesNotAllocate(t *testing.T) {
	callLabels := router.Constraints{GPU: true, Labels: map[string]string{"rack": "r1"}}
	for _, tc := range []struct {
		name string
		pool router.Constraints
		call router.Constraints
	}{
		{"pool has none, call has labels", router.Constraints{}, callLabels},
		{"pool has none, call has none", router.Constraints{}, router.Constraints{}},
		{"pool labels, call has none", router.Constraints{Labels: map[string]string{"zone": "a"}}, router.Constraints{GPU: true}},
		{"pool gpu, call labels", router.Constraints{GPU: true, MinGPUMemoryMiB: 100, GPUModel: "H100"}, callLabels},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := &policy.Set{Need: tc.pool}
			var sink router.Constraints
			if n := testing.AllocsPerRun(100, func() { sink = s.Constraints(tc.call) }); n != 0 {
				t.Errorf("Constraints allocates %v times per call, want 0", n)
			}
			_ = sink
		})
	}
	t.Run("both have labels", func(t *testing.T) {
		// The documented exception: a merged map.
		s := &policy.Set{Need: router.Constraints{Labels: map[string]string{"zone": "a"}}}
		if n := testing.AllocsPerRun(100, func() { _ = s.Constraints(callLabels) }); n == 0 {
			t.Errorf("Constraints(both with labels) allocates nothing; want a merged map")
		}
	})
}

// TestSetConstraintsRouting checks that the pool's filters reach the router
// through Set.Constraints: every candidate of every call meets them.
func TestSetConstraintsRouting(t *testing.T) {
	s := mustBuild(t, withFilters(
		policy.Ref{Name: policy.FilterLabels, Options: policy.Options{"zone": "a"}},
		policy.Ref{Name: policy.FilterGPU, Options: policy.Options{"min_memory_mib": 40000}},
	))
	peers := []router.Peer{
		{ID: "n0", Healthy: true, Pools: map[string]int{"p": 1}, Labels: map[string]string{"zone": "a"}},
		{ID: "n1", Healthy: true, Pools: map[string]int{"p": 1}, Labels: map[string]string{"zone": "a"}, GPUCount: 1, GPUMemoryMiB: 80000},
		{ID: "n2", Healthy: true, Pools: map[string]int{"p": 1}, Labels: map[string]string{"zone": "a"}, GPUCount: 1, GPUMemoryMiB: 24000},
		{ID: "n3", Healthy: true, Pools: map[string]int{"p": 1}, Labels: map[string]string{"zone": "b"}, GPUCount: 2, GPUMemoryMiB: 80000},
		{ID: "n4", Healthy: true, Pools: map[string]int{"p": 1}, Labels: map[string]string{"zone": "a"}, GPUCount: 4, GPUMemoryMiB: 40000},
	}
	tb := mustTable(t, peers, "n0")
	want := map[router.NodeID]bool{"n1": true, "n4": true}
	for r := range uint64(50) {
		for _, sel := range []policy.NodeSelector{s.Node, s.SessionNode} {
			req := &router.Request{Pool: "p", Need: s.Constraints(router.Constraints{}), Rand: r}
			if sel == s.SessionNode {
				req.SessionID = sessionID(int(r))
			}
			got, err := sel.Select(tb, req, nil, nil)
			if err != nil {
				t.Fatalf("Select(%+v): %v", req, err)
			}
			if len(got) != len(want) {
				t.Errorf("Select(%+v) = %v, want the %d peers that meet the filters", req, ids(got), len(want))
			}
			for _, c := range got {
				if !want[c.ID] {
					t.Errorf("Select(%+v) = %v: %s does not meet the pool's filters", req, ids(got), c.ID)
				}
			}
		}
	}
}
