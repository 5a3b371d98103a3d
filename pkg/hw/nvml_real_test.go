//go:build !nvmlmock

package hw

import (
	"errors"
	"os"
	"os/exec"
	"slices"
	"strings"
	"testing"

	"github.com/rs/zerolog"
)

// Without the nvmlmock tag the mock's variables do nothing: Detect uses the
// real NVML (none on a host without the driver).
func TestMockEnvIgnoredWithoutTag(t *testing.T) {
	t.Setenv("SNAKEPIT_NVML_MOCK", "dgxa100")
	t.Setenv("SNAKEPIT_NVML_MOCK_GPUS", "2")
	log, buf := logger()
	inv := Detect(log)
	for _, g := range inv.GPUs {
		if strings.HasPrefix(g.Name, "Mock ") || strings.HasPrefix(g.UUID, "GPU-6d6f636b-") {
			t.Errorf("a release build reports mock GPU %+v", g)
		}
	}
	if strings.Contains(buf.String(), "MOCK") {
		t.Errorf("a release build logs the mock:\n%s", buf)
	}
}

// snakepitd as released does not link go-nvml's mock packages.
func TestReleaseBuildLinksNoMock(t *testing.T) {
	if _, err := exec.LookPath("go"); err != nil {
		t.Skip("no go command (a prebuilt test binary)")
	}
	cmd := exec.Command("go", "list", "-deps", "github.com/snakepit/snakepit/cmd/snakepitd")
	cmd.Env = append(os.Environ(), "GOFLAGS=")
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("go list -deps ./cmd/snakepitd: %v", err)
	}
	deps := strings.Fields(string(out))
	if !slices.Contains(deps, "github.com/NVIDIA/go-nvml/pkg/nvml") {
		t.Fatalf("go list -deps does not list go-nvml at all:\n%s", out)
	}
	for _, d := range deps {
		if strings.Contains(d, "/mock") {
			t.Errorf("snakepitd links %s; only -tags nvmlmock builds may", d)
		}
	}
}

// TestRealGPU runs Detect against the real NVIDIA library, on a host with a
// GPU: scripts/device-nvml-check.sh runs it with SNAKEPIT_REAL_GPU=1.
// Elsewhere it is skipped.
func TestRealGPU(t *testing.T) {
	if os.Getenv("SNAKEPIT_REAL_GPU") != "1" {
		t.Skip("set SNAKEPIT_REAL_GPU=1 on a host with an NVIDIA GPU")
	}
	log := zerolog.New(zerolog.NewTestWriter(t))
	inv := Detect(log)
	switch {
	case errors.Is(inv.GPUErr, ErrNoNVML):
		t.Fatalf("SNAKEPIT_REAL_GPU=1 but NVML is absent: %v (is the NVIDIA driver installed and libnvidia-ml.so.1 on the loader path?)", inv.GPUErr)
	case inv.GPUErr != nil:
		t.Errorf("NVML loaded but failed: %v", inv.GPUErr)
	}
	if len(inv.GPUs) == 0 {
		t.Fatalf("NVML found no GPU (driver %q)", inv.DriverVersion)
	}
	t.Logf("driver %s, %d GPUs, %d CPUs, %d MiB host memory", inv.DriverVersion, len(inv.GPUs), inv.CPUs, inv.MemoryTotal>>20)
	if inv.DriverVersion == "" {
		t.Errorf("no driver version")
	}
	seen := map[string]bool{}
	for _, g := range inv.GPUs {
		t.Logf("GPU %d: %s %q, %d MiB (%d MiB free), compute %s, MIG %q",
			g.Index, g.UUID, g.Name, g.MemoryTotal>>20, g.MemoryFree>>20, g.ComputeCapability(), g.MIG)
		if !strings.HasPrefix(g.UUID, "GPU-") || len(g.UUID) != len("GPU-")+36 || seen[g.UUID] {
			t.Errorf("GPU %d: UUID %q, want a distinct GPU-<uuid>", g.Index, g.UUID)
		}
		seen[g.UUID] = true
		if g.Name == "" || strings.HasPrefix(g.Name, "Mock ") {
			t.Errorf("GPU %d: name %q", g.Index, g.Name)
		}
		if g.MemoryTotal == 0 || g.MemoryFree > g.MemoryTotal {
			t.Errorf("GPU %d: memory total %d, free %d", g.Index, g.MemoryTotal, g.MemoryFree)
		}
		if g.ComputeMajor < 1 {
			t.Errorf("GPU %d: compute capability %q", g.Index, g.ComputeCapability())
		}
	}
	// The UUIDs are those nvidia-smi lists, and what CUDA_VISIBLE_DEVICES
	// would get.
	if out, err := exec.Command("nvidia-smi", "--query-gpu=uuid", "--format=csv,noheader").Output(); err != nil {
		t.Logf("nvidia-smi: %v (not compared)", err)
	} else {
		smi := strings.Fields(string(out))
		var ours []string
		for _, g := range inv.GPUs {
			ours = append(ours, g.UUID)
		}
		slices.Sort(smi)
		slices.Sort(ours)
		if !slices.Equal(smi, ours) {
			t.Errorf("nvidia-smi lists %v, Detect %v", smi, ours)
		}
	}
	slots, err := Assign(inv.GPUs, 1, 1, true, nil)
	if err != nil || len(slots) != 1 || VisibleDevices(slots[0]) != inv.GPUs[0].UUID {
		t.Errorf("Assign one worker one GPU = %v, %v; want %s", slots, err, inv.GPUs[0].UUID)
	}
}
