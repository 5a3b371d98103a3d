//go:build nvmlmock

package hw

import (
	"errors"
	"fmt"
	"strings"
	"testing"
)

// go test -tags nvmlmock ./pkg/hw

func TestMockDetect(t *testing.T) {
	for _, tt := range []struct {
		count string
		gpus  int
	}{{"", 8}, {"2", 2}, {"8", 8}, {"0", 0}} {
		t.Run("gpus="+tt.count, func(t *testing.T) {
			t.Setenv(mockEnv, "dgxa100")
			t.Setenv(mockGPUsEnv, tt.count)
			log, buf := logger()
			inv := Detect(log)
			if inv.GPUErr != nil {
				t.Fatalf("GPUErr = %v, want nil", inv.GPUErr)
			}
			if len(inv.GPUs) != tt.gpus || inv.DriverVersion != "550.54.15" {
				t.Fatalf("%d GPUs, driver %q; want %d, 550.54.15", len(inv.GPUs), inv.DriverVersion, tt.gpus)
			}
			for i, g := range inv.GPUs {
				wantUUID := fmt.Sprintf("GPU-6d6f636b-0000-4000-8000-%012x", i)
				if g.Index != i || g.UUID != wantUUID || g.Name != "Mock NVIDIA A100-SXM4-40GB" || g.ComputeCapability() != "8.0" {
					t.Errorf("GPU %d = %+v, want UUID %s", i, g, wantUUID)
				}
				if g.MemoryTotal != 40<<30 || g.MemoryFree != 40<<30-512<<20 {
					t.Errorf("GPU %d memory total %d free %d, want 40 GiB with 512 MiB used", i, g.MemoryTotal, g.MemoryFree)
				}
			}
			lines := strings.Split(strings.TrimSpace(buf.String()), "\n")
			if len(lines) != 2 || !strings.Contains(lines[0], `"level":"warn"`) || !strings.Contains(lines[0], "NVML MOCK IN USE") ||
				!strings.Contains(lines[0], fmt.Sprintf(`"gpus":%d`, tt.gpus)) {
				t.Errorf("want one warning that the mock is in use, then the inventory; got:\n%s", buf)
			}
		})
	}
}

// The same UUIDs on every start: a restarted daemon assigns mock GPUs alike.
func TestMockStableUUIDs(t *testing.T) {
	t.Setenv(mockEnv, "DGXA100")
	log, _ := logger()
	a, b := Detect(log), Detect(log)
	if len(a.GPUs) != 8 || len(b.GPUs) != 8 {
		t.Fatalf("%d and %d GPUs, want 8", len(a.GPUs), len(b.GPUs))
	}
	for i := range a.GPUs {
		if a.GPUs[i].UUID != b.GPUs[i].UUID {
			t.Errorf("GPU %d: %s, then %s", i, a.GPUs[i].UUID, b.GPUs[i].UUID)
		}
	}
}

func TestMockMisconfigured(t *testing.T) {
	for _, tt := range []struct{ name, count, want string }{
		{"dgxh100", "", `SNAKEPIT_NVML_MOCK=\"dgxh100\": unknown mock (known: dgxa100)`},
		{"dgxa100", "9", `SNAKEPIT_NVML_MOCK_GPUS=\"9\": want a number of GPUs from 0 to 8`},
		{"dgxa100", "-1", `SNAKEPIT_NVML_MOCK_GPUS=\"-1\"`},
		{"dgxa100", "two", `SNAKEPIT_NVML_MOCK_GPUS=\"two\"`},
	} {
		t.Run(tt.name+"/"+tt.count, func(t *testing.T) {
			t.Setenv(mockEnv, tt.name)
			t.Setenv(mockGPUsEnv, tt.count)
			log, buf := logger()
			inv := Detect(log)
			if len(inv.GPUs) != 0 || !errors.Is(inv.GPUErr, ErrNVML) {
				t.Fatalf("%d GPUs, GPUErr %v; want none and ErrNVML", len(inv.GPUs), inv.GPUErr)
			}
			if out := buf.String(); !strings.Contains(out, `"level":"error"`) || !strings.Contains(out, tt.want) {
				t.Errorf("log does not report %s as an error:\n%s", tt.want, out)
			}
		})
	}
}

// Unset, a test build uses the real NVML like a release build.
func TestMockUnset(t *testing.T) {
	t.Setenv(mockEnv, "")
	log, buf := logger()
	inv := Detect(log)
	for _, g := range inv.GPUs {
		if strings.HasPrefix(g.UUID, mockUUIDPrefix) {
			t.Errorf("mock GPU %+v with %s unset", g, mockEnv)
		}
	}
	if strings.Contains(buf.String(), "MOCK") {
		t.Errorf("log mentions the mock with %s unset:\n%s", mockEnv, buf)
	}
}
