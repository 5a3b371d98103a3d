package wire_test

import (
	"testing"

	"github.com/snakepit/snakepit/pkg/agent/wire"
)

func TestParseLoads(t *testing.T) {
	m := wire.ParseLoads(wire.FormatLoads([]string{"a", "b"}, []float64{0.5, 2}))
	if m["a"] != 0.5 || m["b"] != 2 {
		t.Fatalf("round trip = %v", m)
	}
	if m := wire.ParseLoads("x=,=1,y=-1,z=NaN,ok=1"); len(m) != 1 || m["ok"] != 1 {
		t.Fatalf("wire.ParseLoads of bad entries = %v, want only ok=1", m)
	}
}
