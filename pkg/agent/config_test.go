package agent

import (
	"github.com/snakepit/snakepit/pkg/agent/policy"
	"strings"
	"testing"
	"time"
)

func TestRouterConfigErrorsNameTheKey(t *testing.T) {
	cfg := testConfig(t)
	cfg.Router.RetryBudgetRatio = 2
	cfg.Router.BreakGlassLease = -time.Second
	err := cfg.Validate()
	for _, want := range []string{"router.retry_budget_ratio", "router.break_glass_lease"} {
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("Validate() = %v, want it to name %s", err, want)
		}
	}
}

// Bad policy config is an error naming the key: an unknown policy, options
// of the wrong type, a policy that needs a label this node lacks.
func TestPolicyConfigErrorsNameTheKey(t *testing.T) {
	cfg := testConfig(t)
	cfg.Pools[0].Policies.Queue = policy.Ref{Name: "fifo"}
	cfg.Pools[0].Policies.Node = policy.Ref{Name: "locality", Options: map[string]any{"label": "zone"}}
	cfg.Pools[0].Policies.Worker = policy.Ref{Name: "least_loaded", Options: map[string]any{"warm": true}}
	cfg.Pools = append(cfg.Pools, PoolConfig{Name: "spill", Adapter: "x.py",
		Policies: policy.Config{Queue: policy.Ref{Name: "spillover", Options: map[string]any{"threshold": "four"}}}})
	err := cfg.Validate()
	for _, want := range []string{
		`pools[test].policies.queue.name: unknown queue policy "fifo" (known: queue, reject, spillover)`,
		`pools[test].policies.node.options.label: this node has no label "zone" (set discovery.labels.zone)`,
		`pools[test].policies.worker.options.warm is not an option of this policy`,
		`pools[spill].policies.queue.options.threshold must be an integer (got the string "four")`,
	} {
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("Validate() = %v\nwant it to say %s", err, want)
		}
	}
	// With the label, locality is accepted.
	cfg = testConfig(t)
	cfg.Discovery.Labels = map[string]string{"zone": "a"}
	cfg.Pools[0].Policies.Node = policy.Ref{Name: "locality", Options: map[string]any{"label": "zone"}}
	if err := cfg.Validate(); err != nil {
		t.Errorf("Validate() with discovery.labels.zone = %v, want nil", err)
	}
}
