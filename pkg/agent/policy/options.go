package policy

import (
	"errors"
	"fmt"
	"maps"
	"math"
	"slices"
	"strings"
)

// Options is a policy's options block as the config file gives it.
type Options map[string]any

// Decoder reads a policy's options, collecting an error for each one of
// the wrong type and for each option the policy does not know; each error
// names the full config key. Use it in constructors:
//
//	d := env.Options(opts)
//	threshold := d.Int("threshold", 0)
//	if err := d.Err(); err != nil { return nil, err }
type Decoder struct {
	key  string
	opts Options
	used map[string]bool
	errs []error
}

// Options returns a decoder of opts for the policy of env.
func (e Env) Options(opts Options) *Decoder {
	return &Decoder{key: e.Key + ".options", opts: opts, used: map[string]bool{}}
}

func (d *Decoder) get(name string) (any, bool) {
	d.used[name] = true
	v, ok := d.opts[name]
	if !ok {
		// Config loaders may lower-case keys.
		for k, x := range d.opts {
			if strings.EqualFold(k, name) {
				d.used[k] = true
				return x, true
			}
		}
	}
	return v, ok
}

// Fail records an error about option name.
func (d *Decoder) Fail(name, format string, args ...any) {
	d.errs = append(d.errs, fmt.Errorf("%s.%s %s", d.key, name, fmt.Sprintf(format, args...)))
}

// Int returns an integer option, def when absent.
func (d *Decoder) Int(name string, def int) int {
	v, ok := d.get(name)
	if !ok {
		return def
	}
	switch x := v.(type) {
	case int:
		return x
	case int64:
		return int(x)
	case int32:
		return int(x)
	case uint64:
		if x <= math.MaxInt32 {
			return int(x)
		}
	case float64:
		if x == math.Trunc(x) && math.Abs(x) <= math.MaxInt32 {
			return int(x)
		}
	}
	d.Fail(name, "must be an integer (got %s)", describe(v))
	return def
}

// String returns a string option, def when absent.
func (d *Decoder) String(name, def string) string {
	v, ok := d.get(name)
	if !ok {
		return def
	}
	s, isStr := v.(string)
	if !isStr {
		d.Fail(name, "must be a string (got %s)", describe(v))
		return def
	}
	return s
}

// StringMap returns an option that is a map of strings (nil when absent).
func (d *Decoder) StringMap(name string) map[string]string {
	v, ok := d.get(name)
	if !ok {
		return nil
	}
	out, err := stringMap(v)
	if err != nil {
		d.Fail(name, "%v", err)
	}
	return out
}

// Rest returns the options no getter read, as strings: for policies whose
// options are open-ended (the labels filter). It marks them read.
func (d *Decoder) Rest() map[string]string {
	rest := map[string]any{}
	for k, v := range d.opts {
		if !d.used[k] {
			rest[k] = v
			d.used[k] = true
		}
	}
	out := make(map[string]string, len(rest))
	for _, k := range slices.Sorted(maps.Keys(rest)) {
		s, ok := rest[k].(string)
		if !ok {
			d.Fail(k, "must be a string (got %s)", describe(rest[k]))
			continue
		}
		out[k] = s
	}
	return out
}

// Err reports every problem found, and each option nobody read.
func (d *Decoder) Err() error {
	var unknown []string
	for k := range d.opts {
		if !d.used[k] {
			unknown = append(unknown, k)
		}
	}
	slices.Sort(unknown)
	for _, k := range unknown {
		known := slices.Sorted(maps.Keys(d.used))
		d.errs = append(d.errs, fmt.Errorf("%s.%s is not an option of this policy (options: %s)", d.key, k, orNone(known)))
	}
	return errors.Join(d.errs...)
}

func stringMap(v any) (map[string]string, error) {
	out := map[string]string{}
	switch m := v.(type) {
	case map[string]any:
		for k, x := range m {
			s, ok := x.(string)
			if !ok {
				return nil, fmt.Errorf("[%s] must be a string (got %s)", k, describe(x))
			}
			out[k] = s
		}
	case map[string]string:
		maps.Copy(out, m)
	case map[any]any:
		for k, x := range m {
			ks, ok1 := k.(string)
			s, ok2 := x.(string)
			if !ok1 || !ok2 {
				return nil, fmt.Errorf("must map strings to strings (got %s: %s)", describe(k), describe(x))
			}
			out[ks] = s
		}
	default:
		return nil, fmt.Errorf("must be a map of strings (got %s)", describe(v))
	}
	return out, nil
}

func describe(v any) string {
	switch x := v.(type) {
	case nil:
		return "nothing"
	case string:
		return fmt.Sprintf("the string %q", x)
	case bool:
		return fmt.Sprintf("the boolean %v", x)
	case int, int64, int32, uint64, float64:
		return fmt.Sprintf("the number %v", x)
	case []any:
		return "a list"
	case map[string]any, map[any]any, map[string]string:
		return "a map"
	}
	return fmt.Sprintf("a %T", v)
}

func orNone(s []string) string {
	if len(s) == 0 {
		return "none"
	}
	return strings.Join(s, ", ")
}
