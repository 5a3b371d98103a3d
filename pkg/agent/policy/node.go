package policy

import (
	"fmt"
	"strings"

	"github.com/snakepit/snakepit/pkg/router"
)

// twoChoices places a call on the less loaded of two peers drawn at random
// (the local node whenever it is no more loaded), the rest by load.
type twoChoices struct{}

func newTwoChoices(env Env, opts Options) (NodeSelector, error) {
	return twoChoices{}, env.Options(opts).Err()
}

func (twoChoices) Select(t *router.Table, req *router.Request, loads router.Loads, dst []router.Candidate) ([]router.Candidate, error) {
	return t.TwoChoices(req, loads, dst)
}

// rendezvous places a call by weighted rendezvous hashing of its session
// id (or of its caller-supplied request id): every router of the fleet
// agrees on the owner. A call with neither is placed by two choices.
type rendezvous struct{}

func newRendezvous(env Env, opts Options) (NodeSelector, error) {
	return rendezvous{}, env.Options(opts).Err()
}

func (rendezvous) Select(t *router.Table, req *router.Request, loads router.Loads, dst []router.Candidate) ([]router.Candidate, error) {
	if req.SessionID == "" {
		return t.TwoChoices(req, loads, dst)
	}
	return t.Rendezvous(req, dst)
}

// locality prefers the peers that share this node's value of a label (a
// zone, a rack): two choices among them first, then the others by load.
// Session calls are placed by rendezvous whatever the locality (every
// router must agree on a session's owner), so it fits policies.node only.
type locality struct {
	label, value string
	only         map[string]string // {label: value}
}

func newLocality(env Env, opts Options) (NodeSelector, error) {
	d := env.Options(opts)
	label := d.String("label", "")
	if err := d.Err(); err != nil {
		return nil, err
	}
	if label == "" {
		return nil, fmt.Errorf("%s.options.label must name the label to be near by (like zone)", env.Key)
	}
	v, ok := env.Labels[label]
	if !ok {
		return nil, fmt.Errorf("%s.options.label: this node has no label %q (set discovery.labels.%s), so it cannot prefer peers that share it", env.Key, label, label)
	}
	return &locality{label: label, value: v, only: map[string]string{label: v}}, nil
}

func (l *locality) Select(t *router.Table, req *router.Request, loads router.Loads, dst []router.Candidate) ([]router.Candidate, error) {
	if req.SessionID != "" {
		return t.Rendezvous(req, dst)
	}
	k := req.Max
	if k <= 0 {
		k = router.DefaultMax
	}
	near := *req
	if v, ok := req.Need.Labels[l.label]; ok && v != l.value {
		return t.TwoChoices(req, loads, dst) // the call asks for another place
	}
	if len(req.Need.Labels) == 0 {
		near.Need.Labels = l.only
	} else {
		m := make(map[string]string, len(req.Need.Labels)+1)
		for k, v := range req.Need.Labels {
			m[k] = v
		}
		m[l.label] = l.value
		near.Need.Labels = m
	}
	base := len(dst)
	dst, nearErr := t.TwoChoices(&near, loads, dst)
	found := len(dst) - base
	if found >= k {
		return dst, nil
	}
	// The others, by load, after the near ones (asking for more, and
	// skipping the near ones found again).
	var buf [16]router.Candidate
	far := *req
	far.Max = k
	rest, err := t.TwoChoices(&far, loads, buf[:0])
	if err != nil {
		if found > 0 {
			return dst, nil
		}
		return dst, err
	}
	_ = nearErr
	for _, c := range rest {
		if len(dst)-base >= k {
			break
		}
		dup := false
		for _, d := range dst[base:] {
			if d.Index == c.Index {
				dup = true
				break
			}
		}
		if !dup {
			dst = append(dst, c)
		}
	}
	return dst, nil
}

// labelsFilter keeps the peers that carry every one of its labels.
type labelsFilter map[string]string

func newLabelsFilter(env Env, opts Options) (NodeFilter, error) {
	d := env.Options(opts)
	m := d.Rest()
	if err := d.Err(); err != nil {
		return nil, err
	}
	if len(m) == 0 {
		return nil, fmt.Errorf("%s.options must list at least one label and its value (like zone: eu-1)", env.Key)
	}
	return labelsFilter(m), nil
}

func (f labelsFilter) Constrain(c *router.Constraints) error {
	if c.Labels == nil {
		c.Labels = map[string]string{}
	}
	for k, v := range f {
		if old, ok := c.Labels[k]; ok && old != v {
			return fmt.Errorf("label %s=%q conflicts with %s=%q of another filter", k, v, k, old)
		}
		c.Labels[k] = v
	}
	return nil
}

// gpuFilter keeps the peers with a GPU, of at least a memory size and of a
// model when it says so.
type gpuFilter struct {
	minMemMiB int
	model     string
}

func newGPUFilter(env Env, opts Options) (NodeFilter, error) {
	d := env.Options(opts)
	f := gpuFilter{minMemMiB: d.Int("min_memory_mib", 0), model: strings.TrimSpace(d.String("model", ""))}
	if f.minMemMiB < 0 {
		d.Fail("min_memory_mib", "must not be negative (got %d)", f.minMemMiB)
	}
	return f, d.Err()
}

func (f gpuFilter) Constrain(c *router.Constraints) error {
	c.GPU = true
	c.MinGPUMemoryMiB = max(c.MinGPUMemoryMiB, f.minMemMiB)
	if f.model != "" {
		if c.GPUModel != "" && !strings.EqualFold(c.GPUModel, f.model) {
			return fmt.Errorf("gpu model %q conflicts with %q of another filter", f.model, c.GPUModel)
		}
		c.GPUModel = f.model
	}
	return nil
}
