package policy_test

import (
	"reflect"
	"strings"
	"testing"

	"github.com/snakepit/snakepit/pkg/agent/policy"
	"github.com/snakepit/snakepit/pkg/router"
)

// withFilters is the default config with node filters.
func withFilters(refs ...policy.Ref) policy.Config {
	c := defaults()
	c.NodeFilters = refs
	return c
}

func labels(kv ...string) policy.Ref {
	opts := policy.Options{}
	for i := 0; i < len(kv); i += 2 {
		opts[kv[i]] = kv[i+1]
	}
	return policy.Ref{Name: policy.FilterLabels, Options: opts}
}

func gpu(opts policy.Options) policy.Ref { return policy.Ref{Name: policy.FilterGPU, Options: opts} }

func TestNodeFilters(t *testing.T) {
	for _, tc := range []struct {
		name    string
		filters []policy.Ref
		want    router.Constraints
	}{
		{"none", nil, router.Constraints{}},
		{"labels", []policy.Ref{labels("zone", "a", "rack", "r1")}, router.Constraints{Labels: map[string]string{"zone": "a", "rack": "r1"}}},
		{"gpu, no options", []policy.Ref{gpu(nil)}, router.Constraints{GPU: true}},
		{"gpu memory and model", []policy.Ref{gpu(policy.Options{"min_memory_mib": 40000, "model": " H100 "})},
			router.Constraints{GPU: true, MinGPUMemoryMiB: 40000, GPUModel: "H100"}},
		{"labels and gpu", []policy.Ref{labels("zone", "a"), gpu(policy.Options{"min_memory_mib": 16000, "model": "H100"})},
			router.Constraints{GPU: true, MinGPUMemoryMiB: 16000, GPUModel: "H100", Labels: map[string]string{"zone": "a"}}},
		{"two labels filters", []policy.Ref{labels("zone", "a"), labels("rack", "r1", "zone", "a")},
			router.Constraints{Labels: map[string]string{"zone": "a", "rack": "r1"}}},
		{"two gpu filters: the larger memory", []policy.Ref{gpu(policy.Options{"min_memory_mib": 80000}), gpu(policy.Options{"min_memory_mib": 16000, "model": "H100"})},
			router.Constraints{GPU: true, MinGPUMemoryMiB: 80000, GPUModel: "H100"}},
		{"two gpu filters: model in any case", []policy.Ref{gpu(policy.Options{"model": "H100"}), gpu(policy.Options{"model": "h100"})},
			router.Constraints{GPU: true, GPUModel: "h100"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := mustBuild(t, withFilters(tc.filters...))
			if !reflect.DeepEqual(s.Need, tc.want) {
				t.Errorf("Build(node_filters %+v).Need = %+v, want %+v", tc.filters, s.Need, tc.want)
			}
			wantKey := ""
			if len(tc.filters) > 0 {
				wantKey = key + ".node_filters"
			}
			if s.FilterKey != wantKey {
				t.Errorf("Build(node_filters %+v).FilterKey = %q, want %q", tc.filters, s.FilterKey, wantKey)
			}
		})
	}
}

func TestNodeFiltersDoNotShareMaps(t *testing.T) {
	opts := policy.Options{"zone": "a"}
	c := withFilters(policy.Ref{Name: policy.FilterLabels, Options: opts})
	r := policy.Builtin()
	s1, err1 := r.Build(env(), c)
	s2, err2 := r.Build(env(), c)
	if err1 != nil || err2 != nil {
		t.Fatalf("Build: %v, %v", err1, err2)
	}
	s1.Need.Labels["zone"] = "changed"
	if s2.Need.Labels["zone"] != "a" || opts["zone"] != "a" {
		t.Errorf("two Sets built from one config share their labels: %v, options %v", s2.Need.Labels, opts)
	}
}

func TestNodeFilterErrors(t *testing.T) {
	for _, tc := range []struct {
		name    string
		filters []policy.Ref
		want    []string // substrings of the error
	}{
		{"conflicting labels", []policy.Ref{labels("zone", "a"), labels("zone", "b")},
			[]string{key + ".node_filters[1]: ", "zone", `"a"`, `"b"`}},
		{"conflicting gpu models", []policy.Ref{gpu(policy.Options{"model": "H100"}), gpu(policy.Options{"model": "A100"})},
			[]string{key + ".node_filters[1]: ", "H100", "A100"}},
		{"conflict after a good one", []policy.Ref{gpu(nil), labels("zone", "a"), labels("zone", "b")},
			[]string{key + ".node_filters[2]: "}},
		{"labels without labels", []policy.Ref{{Name: policy.FilterLabels}},
			[]string{key + ".node_filters[0].options must list at least one label"}},
		{"label not a string", []policy.Ref{{Name: policy.FilterLabels, Options: policy.Options{"zone": 3}}},
			[]string{key + ".node_filters[0].options.zone must be a string", "the number 3"}},
		{"gpu memory negative", []policy.Ref{gpu(policy.Options{"min_memory_mib": -1})},
			[]string{key + ".node_filters[0].options.min_memory_mib must not be negative"}},
		{"gpu memory not a number", []policy.Ref{gpu(policy.Options{"min_memory_mib": "80GiB"})},
			[]string{key + ".node_filters[0].options.min_memory_mib must be an integer", `the string "80GiB"`}},
		{"gpu model not a string", []policy.Ref{gpu(policy.Options{"model": true})},
			[]string{key + ".node_filters[0].options.model must be a string", "the boolean true"}},
		{"gpu unknown option", []policy.Ref{gpu(policy.Options{"count": 2})},
			[]string{key + ".node_filters[0].options.count is not an option of this policy", "min_memory_mib", "model"}},
		{"unknown filter", []policy.Ref{labels("zone", "a"), {Name: "ssd"}},
			[]string{key + `.node_filters[1].name: unknown node_filter policy "ssd"`, "known: gpu, labels"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := buildErr(t, withFilters(tc.filters...))
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("Build(node_filters %+v) error = %q, want it to contain %q", tc.filters, err, w)
				}
			}
		})
	}
}
