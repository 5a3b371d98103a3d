package policy_test

import (
	"errors"
	"fmt"
	"math"
	"slices"
	"strings"
	"sync"
	"testing"

	"github.com/snakepit/snakepit/pkg/agent/policy"
	"github.com/snakepit/snakepit/pkg/router"
)

func TestBuiltinNames(t *testing.T) {
	r := policy.Builtin()
	for _, tc := range []struct {
		kind policy.Kind
		want []string
	}{
		{policy.KindNode, []string{policy.Locality, policy.Rendezvous, policy.TwoChoices}},
		{policy.KindNodeFilter, []string{policy.FilterGPU, policy.FilterLabels}},
		{policy.KindWorker, []string{policy.LeastLoaded, policy.MostRecentlyUsed, policy.SessionSticky}},
		{policy.KindQueue, []string{policy.Queue, policy.Reject, policy.Spillover}},
		{policy.KindAffinity, []string{policy.Hint, policy.StrictFailFast, policy.StrictQueue}},
		{policy.Kind("nope"), nil},
	} {
		t.Run(string(tc.kind), func(t *testing.T) {
			if got := r.Names(tc.kind); !slices.Equal(got, tc.want) {
				t.Errorf("Names(%s) = %v, want %v", tc.kind, got, tc.want)
			}
			if got := policy.NewRegistry().Names(tc.kind); len(got) != 0 {
				t.Errorf("NewRegistry().Names(%s) = %v, want none", tc.kind, got)
			}
		})
	}
}

func TestBuildDefaults(t *testing.T) {
	s := mustBuild(t, defaults())
	if s.Node == nil || s.SessionNode == nil || s.Worker == nil || s.Queue == nil || s.Affinity == nil {
		t.Fatalf("Build(defaults) = %+v, want every policy set", s)
	}
	if s.FilterKey != "" || s.Need.GPU || s.Need.Labels != nil {
		t.Errorf("Build(defaults) Need, FilterKey = %+v, %q; want none", s.Need, s.FilterKey)
	}
	// Builtin returns independent registries.
	r1, r2 := policy.Builtin(), policy.Builtin()
	if err := r1.RegisterQueue("extra", nil); err != nil {
		t.Fatalf("RegisterQueue(extra): %v", err)
	}
	if slices.Contains(r2.Names(policy.KindQueue), "extra") {
		t.Errorf("a policy registered in one Builtin registry shows in another")
	}
}

// firstFree is a custom worker selector: the first free worker.
type firstFree struct{ skip int }

func (f firstFree) Pick(ws policy.Workers, p policy.Purpose) int {
	for i := f.skip; i < ws.Len(); i++ {
		if w := ws.At(i); w.Free() && (!p.NewSession || w.SessionRoom) {
			return i
		}
	}
	return -1
}

func TestRegisterCustom(t *testing.T) {
	r := policy.Builtin()
	var gotEnv policy.Env
	err := r.RegisterWorker("first_free", func(env policy.Env, opts policy.Options) (policy.WorkerSelector, error) {
		gotEnv = env
		d := env.Options(opts)
		skip := d.Int("skip", 0)
		return firstFree{skip: skip}, d.Err()
	})
	if err != nil {
		t.Fatalf("RegisterWorker(first_free): %v", err)
	}
	if got, want := r.Names(policy.KindWorker), []string{"first_free", policy.LeastLoaded, policy.MostRecentlyUsed, policy.SessionSticky}; !slices.Equal(got, want) {
		t.Errorf("Names(worker) = %v, want %v", got, want)
	}

	c := defaults()
	c.Worker = policy.Ref{Name: "first_free", Options: policy.Options{"skip": 1}}
	s, err := r.Build(env(), c)
	if err != nil {
		t.Fatalf("Build(worker first_free): %v", err)
	}
	if got, want := s.Worker, (firstFree{skip: 1}); got != want {
		t.Errorf("Build(worker first_free).Worker = %#v, want %#v", got, want)
	}
	if gotEnv.Pool != "p" || gotEnv.Key != key+".worker" || gotEnv.Labels["zone"] != "a" {
		t.Errorf("the factory got %+v, want pool p, key %s.worker and the node's labels", gotEnv, key)
	}
	ws := workers{idle(1), idle(1)}
	if got := s.Worker.Pick(&ws, sessionless); got != 1 {
		t.Errorf("Pick(%+v) = %d, want %d", ws, got, 1)
	}

	c.Worker.Options = policy.Options{"skip": "one"}
	if s, err = r.Build(env(), c); s != nil || err == nil {
		t.Fatalf("Build(first_free, skip: one) = %+v, %v; want an error", s, err)
	}
	if want := key + ".worker.options.skip must be an integer"; !strings.Contains(err.Error(), want) {
		t.Errorf("Build(first_free, skip: one) error = %q, want it to contain %q", err, want)
	}

	// The builtin registry does not know it.
	c.Worker.Options = nil
	if err := buildErr(t, c); !strings.Contains(err.Error(), "first_free") {
		t.Errorf("Builtin().Build(first_free) error = %q, want it to name first_free", err)
	}
}

func TestRegisterEveryKind(t *testing.T) {
	r := policy.NewRegistry()
	errFactory := errors.New("factory failed")
	for _, err := range []error{
		r.RegisterNode("n", func(policy.Env, policy.Options) (policy.NodeSelector, error) { return twoChoicesLike{}, nil }),
		r.RegisterNodeFilter("f", func(policy.Env, policy.Options) (policy.NodeFilter, error) { return nil, errFactory }),
		r.RegisterWorker("w", func(policy.Env, policy.Options) (policy.WorkerSelector, error) { return firstFree{}, nil }),
		r.RegisterQueue("q", func(policy.Env, policy.Options) (policy.QueuePolicy, error) { return nil, errFactory }),
		r.RegisterAffinity("a", func(policy.Env, policy.Options) (policy.AffinityPolicy, error) { return policy.StrictQueuePolicy, nil }),
	} {
		if err != nil {
			t.Fatalf("Register: %v", err)
		}
	}
	for kind, want := range map[policy.Kind]string{
		policy.KindNode: "n", policy.KindNodeFilter: "f", policy.KindWorker: "w", policy.KindQueue: "q", policy.KindAffinity: "a",
	} {
		if got := r.Names(kind); !slices.Equal(got, []string{want}) {
			t.Errorf("Names(%s) = %v, want [%s]", kind, got, want)
		}
	}
	c := policy.Config{
		Node: policy.Ref{Name: "n"}, SessionNode: policy.Ref{Name: "n"}, Worker: policy.Ref{Name: "w"},
		Queue: policy.Ref{Name: "q"}, Affinity: policy.Ref{Name: "a"}, NodeFilters: []policy.Ref{{Name: "f"}},
	}
	s, err := r.Build(env(), c)
	if s != nil || !errors.Is(err, errFactory) {
		t.Fatalf("Build with failing factories = %+v, %v; want nil and the factories' error", s, err)
	}
	if n := strings.Count(err.Error(), errFactory.Error()); n != 2 {
		t.Errorf("Build error = %q, want both factories' errors (got %d)", err, n)
	}
}

type twoChoicesLike struct{}

func (twoChoicesLike) Select(t *router.Table, req *router.Request, loads router.Loads, dst []router.Candidate) ([]router.Candidate, error) {
	return t.TwoChoices(req, loads, dst)
}

func TestRegisterErrors(t *testing.T) {
	r := policy.Builtin()
	nodeF := func(policy.Env, policy.Options) (policy.NodeSelector, error) { return twoChoicesLike{}, nil }
	for _, tc := range []struct {
		name       string
		err        error
		registered bool
	}{
		{"node twice", r.RegisterNode(policy.TwoChoices, nodeF), true},
		{"node filter twice", r.RegisterNodeFilter(policy.FilterGPU, nil), true},
		{"worker twice", r.RegisterWorker(policy.LeastLoaded, nil), true},
		{"queue twice", r.RegisterQueue(policy.Reject, nil), true},
		{"affinity twice", r.RegisterAffinity(policy.Hint, nil), true},
		{"empty name", r.RegisterNode("", nodeF), false},
		{"name with a space", r.RegisterWorker("first free", nil), false},
		{"name with a tab", r.RegisterQueue("a\tb", nil), false},
		{"name with a newline", r.RegisterAffinity("a\n", nil), false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if tc.err == nil {
				t.Fatalf("Register = nil, want an error")
			}
			if got := errors.Is(tc.err, policy.ErrRegistered); got != tc.registered {
				t.Errorf("errors.Is(%q, ErrRegistered) = %v, want %v", tc.err, got, tc.registered)
			}
		})
	}
	// A name may be used by policies of different kinds.
	if err := r.RegisterQueue(policy.Hint, nil); err != nil {
		t.Errorf("RegisterQueue(hint), a name of another kind: %v", err)
	}
	// A failed registration changes nothing.
	if got, want := r.Names(policy.KindNode), []string{policy.Locality, policy.Rendezvous, policy.TwoChoices}; !slices.Equal(got, want) {
		t.Errorf("Names(node) after failed registrations = %v, want %v", got, want)
	}
	if _, err := r.Build(env(), defaults()); err != nil {
		t.Errorf("Build(defaults) after a failed registration: %v", err)
	}
}

func TestRegistryConcurrent(t *testing.T) {
	r := policy.Builtin()
	var wg sync.WaitGroup
	for g := range 4 {
		wg.Go(func() {
			for i := range 50 {
				name := fmt.Sprintf("w%d_%d", g, i)
				if err := r.RegisterWorker(name, func(policy.Env, policy.Options) (policy.WorkerSelector, error) { return firstFree{}, nil }); err != nil {
					t.Errorf("RegisterWorker(%s): %v", name, err)
				}
				c := defaults()
				c.Worker.Name = name
				if _, err := r.Build(env(), c); err != nil {
					t.Errorf("Build(worker %s): %v", name, err)
				}
				_ = r.Names(policy.KindWorker)
			}
		})
	}
	wg.Wait()
	if got := r.Names(policy.KindWorker); len(got) != 3+4*50 || !slices.IsSorted(got) {
		t.Errorf("Names(worker) = %d names (sorted %v), want %d sorted", len(got), slices.IsSorted(got), 3+4*50)
	}
}

// TestConfigErrors: every error of a pool's policies names its config key.
func TestConfigErrors(t *testing.T) {
	for _, tc := range []struct {
		name string
		edit func(*policy.Config)
		want []string // substrings of the error
	}{
		{"unknown queue", func(c *policy.Config) { c.Queue.Name = "fifo" },
			[]string{key + `.queue.name: unknown queue policy "fifo"`, "(known: queue, reject, spillover)"}},
		{"unknown node", func(c *policy.Config) { c.Node.Name = "random" },
			[]string{key + `.node.name: unknown node policy "random"`, "known: locality, rendezvous, two_choices"}},
		{"unknown session node", func(c *policy.Config) { c.SessionNode.Name = "random" },
			[]string{key + `.session_node.name: unknown node policy "random"`}},
		{"unknown worker", func(c *policy.Config) { c.Worker.Name = "round_robin" },
			[]string{key + `.worker.name: unknown worker policy "round_robin"`, "known: least_loaded, most_recently_used, session_sticky"}},
		{"unknown affinity", func(c *policy.Config) { c.Affinity.Name = "strict" },
			[]string{key + `.affinity.name: unknown affinity policy "strict"`, "known: hint, strict_fail_fast, strict_queue"}},
		{"empty name", func(c *policy.Config) { c.Worker.Name = "" },
			[]string{key + `.worker.name: unknown worker policy ""`}},
		{"name is case sensitive", func(c *policy.Config) { c.Queue.Name = "Reject" },
			[]string{key + `.queue.name: unknown queue policy "Reject"`}},
		{"every problem", func(c *policy.Config) {
			c.Worker.Name = "x"
			c.Queue.Name = "y"
			c.Affinity.Options = policy.Options{"z": 1}
		},
			[]string{key + ".worker.name", key + ".queue.name", key + ".affinity.options.z"}},

		{"threshold a word", func(c *policy.Config) { *c = spill(policy.Options{"threshold": "four"}) },
			[]string{key + ".queue.options.threshold must be an integer", `(got the string "four")`}},
		{"threshold a fraction", func(c *policy.Config) { *c = spill(policy.Options{"threshold": 1.5}) },
			[]string{key + ".queue.options.threshold must be an integer", "(got the number 1.5)"}},
		{"threshold a boolean", func(c *policy.Config) { *c = spill(policy.Options{"threshold": true}) },
			[]string{key + ".queue.options.threshold must be an integer", "(got the boolean true)"}},
		{"threshold nothing", func(c *policy.Config) { *c = spill(policy.Options{"threshold": nil}) },
			[]string{key + ".queue.options.threshold must be an integer", "(got nothing)"}},
		{"threshold a list", func(c *policy.Config) { *c = spill(policy.Options{"threshold": []any{1}}) },
			[]string{key + ".queue.options.threshold must be an integer", "(got a list)"}},
		{"threshold a map", func(c *policy.Config) { *c = spill(policy.Options{"threshold": map[string]any{"a": 1}}) },
			[]string{key + ".queue.options.threshold must be an integer", "(got a map)"}},
		{"threshold too large", func(c *policy.Config) { *c = spill(policy.Options{"threshold": uint64(math.MaxUint64)}) },
			[]string{key + ".queue.options.threshold must be an integer"}},
		{"threshold huge float", func(c *policy.Config) { *c = spill(policy.Options{"threshold": 1e300}) },
			[]string{key + ".queue.options.threshold must be an integer"}},
		{"threshold NaN", func(c *policy.Config) { *c = spill(policy.Options{"threshold": math.NaN()}) },
			[]string{key + ".queue.options.threshold must be an integer"}},
		{"threshold of another type", func(c *policy.Config) { *c = spill(policy.Options{"threshold": uint8(3)}) },
			[]string{key + ".queue.options.threshold must be an integer", "(got a uint8)"}},
		{"threshold negative", func(c *policy.Config) { *c = spill(policy.Options{"threshold": -1}) },
			[]string{key + ".queue.options.threshold must not be negative (got -1)"}},
		{"spillover unknown option", func(c *policy.Config) { *c = spill(policy.Options{"threshold": 2, "depth": 3}) },
			[]string{key + ".queue.options.depth is not an option of this policy (options: threshold)"}},
		{"unknown options sorted", func(c *policy.Config) { *c = spill(policy.Options{"b": 1, "a": 2}) },
			[]string{key + ".queue.options.a is not an option", key + ".queue.options.b is not an option"}},
		{"option of a policy without options", func(c *policy.Config) { c.Node.Options = policy.Options{"x": 1} },
			[]string{key + ".node.options.x is not an option of this policy (options: none)"}},
		{"option of reject", func(c *policy.Config) {
			c.Queue = policy.Ref{Name: policy.Reject, Options: policy.Options{"threshold": 1}}
		},
			[]string{key + ".queue.options.threshold is not an option"}},
		{"option of a worker selector", func(c *policy.Config) { c.Worker.Options = policy.Options{"x": 1} },
			[]string{key + ".worker.options.x is not an option"}},
		{"option of an affinity", func(c *policy.Config) {
			c.Affinity = policy.Ref{Name: policy.StrictQueue, Options: policy.Options{"lease": "1s"}}
		},
			[]string{key + ".affinity.options.lease is not an option"}},

		{"locality label a number", func(c *policy.Config) {
			c.Node = policy.Ref{Name: policy.Locality, Options: policy.Options{"label": 3}}
		},
			[]string{key + ".node.options.label must be a string", "(got the number 3)"}},
		{"locality without label", func(c *policy.Config) { c.Node = policy.Ref{Name: policy.Locality} },
			[]string{key + ".node.options.label must name the label"}},
		{"locality empty label", func(c *policy.Config) {
			c.Node = policy.Ref{Name: policy.Locality, Options: policy.Options{"label": ""}}
		},
			[]string{key + ".node.options.label must name the label"}},
		{"locality label this node lacks", func(c *policy.Config) {
			c.Node = policy.Ref{Name: policy.Locality, Options: policy.Options{"label": "region"}}
		},
			[]string{key + ".node.options.label", `no label "region"`, "discovery.labels.region"}},
		{"locality as session node", func(c *policy.Config) {
			c.SessionNode = policy.Ref{Name: policy.Locality, Options: policy.Options{"label": "region"}}
		}, []string{key + ".session_node.options.label", "discovery.labels"}},
		{"locality unknown option", func(c *policy.Config) {
			c.Node = policy.Ref{Name: policy.Locality, Options: policy.Options{"label": "zone", "weight": 2}}
		}, []string{key + ".node.options.weight is not an option of this policy (options: label)"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := defaults()
			tc.edit(&c)
			err := buildErr(t, c)
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("Build error = %q, want it to contain %q", err, w)
				}
			}
		})
	}
}

func spill(opts policy.Options) policy.Config {
	c := defaults()
	c.Queue = policy.Ref{Name: policy.Spillover, Options: opts}
	return c
}

func TestLocalityOptions(t *testing.T) {
	for _, opts := range []policy.Options{{"label": "zone"}, {"Label": "zone"}, {"label": "rack"}} {
		c := defaults()
		c.Node = policy.Ref{Name: policy.Locality, Options: opts}
		c.SessionNode = c.Node // allowed: sessions are placed by rendezvous
		if _, err := policy.Builtin().Build(env(), c); err != nil {
			t.Errorf("Build(locality %v): %v", opts, err)
		}
	}
	// The node's labels come from Env.Labels, not from the table.
	e := env()
	e.Labels = nil
	c := defaults()
	c.Node = policy.Ref{Name: policy.Locality, Options: policy.Options{"label": "zone"}}
	if _, err := policy.Builtin().Build(e, c); err == nil || !strings.Contains(err.Error(), "discovery.labels.zone") {
		t.Errorf("Build(locality) on a node without labels = %v, want an error naming discovery.labels.zone", err)
	}
}

func TestDecoder(t *testing.T) {
	e := policy.Env{Key: "k"}
	t.Run("getters", func(t *testing.T) {
		d := e.Options(policy.Options{"n": 3, "s": "x", "m": map[string]any{"a": "b"}, "S2": "y"})
		if got := d.Int("n", 7); got != 3 {
			t.Errorf("Int(n) = %d, want 3", got)
		}
		if got := d.Int("absent", 7); got != 7 {
			t.Errorf("Int(absent) = %d, want the default 7", got)
		}
		if got := d.String("s", "def"); got != "x" {
			t.Errorf("String(s) = %q, want x", got)
		}
		if got := d.String("s2", "def"); got != "y" {
			t.Errorf("String(s2) = %q, want y (keys match in any case)", got)
		}
		if got := d.String("none", "def"); got != "def" {
			t.Errorf("String(none) = %q, want the default", got)
		}
		if got := d.StringMap("m"); len(got) != 1 || got["a"] != "b" {
			t.Errorf("StringMap(m) = %v, want map[a:b]", got)
		}
		if got := d.StringMap("absent map"); got != nil {
			t.Errorf("StringMap(absent) = %v, want nil", got)
		}
		if err := d.Err(); err != nil {
			t.Errorf("Err() = %v, want nil", err)
		}
	})
	t.Run("wrong types keep the default", func(t *testing.T) {
		d := e.Options(policy.Options{"n": "3", "s": 3})
		if got := d.Int("n", 7); got != 7 {
			t.Errorf("Int(n: \"3\") = %d, want the default 7", got)
		}
		if got := d.String("s", "def"); got != "def" {
			t.Errorf("String(s: 3) = %q, want the default", got)
		}
		err := d.Err()
		for _, w := range []string{`k.options.n must be an integer (got the string "3")`, "k.options.s must be a string (got the number 3)"} {
			if err == nil || !strings.Contains(err.Error(), w) {
				t.Errorf("Err() = %v, want it to contain %q", err, w)
			}
		}
	})
	t.Run("string maps", func(t *testing.T) {
		for _, tc := range []struct {
			name string
			v    any
			want map[string]string
			err  string
		}{
			{"map[string]any", map[string]any{"a": "1", "b": "2"}, map[string]string{"a": "1", "b": "2"}, ""},
			{"map[string]string", map[string]string{"a": "1"}, map[string]string{"a": "1"}, ""},
			{"map[any]any", map[any]any{"a": "1"}, map[string]string{"a": "1"}, ""},
			{"empty", map[string]any{}, map[string]string{}, ""},
			{"value not a string", map[string]any{"a": 1}, nil, "k.options.m [a] must be a string (got the number 1)"},
			{"key not a string", map[any]any{1: "a"}, nil, "k.options.m must map strings to strings (got the number 1: the string \"a\")"},
			{"not a map", "a=1", nil, `k.options.m must be a map of strings (got the string "a=1")`},
			{"a list", []any{"a"}, nil, "k.options.m must be a map of strings (got a list)"},
		} {
			t.Run(tc.name, func(t *testing.T) {
				d := e.Options(policy.Options{"m": tc.v})
				got := d.StringMap("m")
				err := d.Err()
				if tc.err == "" {
					if err != nil || len(got) != len(tc.want) || fmt.Sprint(got) != fmt.Sprint(tc.want) {
						t.Errorf("StringMap(%v) = %v, %v; want %v", tc.v, got, err, tc.want)
					}
					return
				}
				if err == nil || !strings.Contains(err.Error(), tc.err) {
					t.Errorf("StringMap(%v) error = %v, want it to contain %q", tc.v, err, tc.err)
				}
			})
		}
	})
	t.Run("rest", func(t *testing.T) {
		d := e.Options(policy.Options{"n": 1, "zone": "a", "rack": "r1", "bad": 2})
		_ = d.Int("n", 0)
		got := d.Rest()
		if fmt.Sprint(got) != fmt.Sprint(map[string]string{"zone": "a", "rack": "r1"}) {
			t.Errorf("Rest() = %v, want the unread string options", got)
		}
		err := d.Err()
		if err == nil || !strings.Contains(err.Error(), "k.options.bad must be a string (got the number 2)") {
			t.Errorf("Err() = %v, want the non-string rest named", err)
		}
		if strings.Contains(err.Error(), "not an option") {
			t.Errorf("Err() = %v: Rest marks every option read", err)
		}
		if got := e.Options(nil).Rest(); len(got) != 0 {
			t.Errorf("Rest() of no options = %v, want none", got)
		}
	})
	t.Run("fail", func(t *testing.T) {
		d := e.Options(nil)
		d.Fail("x", "must be %s", "odd")
		if err := d.Err(); err == nil || err.Error() != "k.options.x must be odd" {
			t.Errorf("Err() = %v, want %q", err, "k.options.x must be odd")
		}
	})
	t.Run("unknown options list the known", func(t *testing.T) {
		d := e.Options(policy.Options{"b": 1, "zz": 2})
		_ = d.Int("b", 0)
		_ = d.String("a", "")
		err := d.Err()
		if want := "k.options.zz is not an option of this policy (options: a, b)"; err == nil || err.Error() != want {
			t.Errorf("Err() = %v, want %q", err, want)
		}
	})
	t.Run("no options", func(t *testing.T) {
		if err := e.Options(nil).Err(); err != nil {
			t.Errorf("Err() of no options = %v, want nil", err)
		}
	})
}
