package hw

import (
	"bytes"
	"errors"
	"strings"
	"testing"

	"github.com/NVIDIA/go-nvml/pkg/nvml"
	"github.com/NVIDIA/go-nvml/pkg/nvml/mock/dgxa100"
	"github.com/rs/zerolog"
)

func logger() (zerolog.Logger, *bytes.Buffer) {
	var buf bytes.Buffer
	return zerolog.New(&buf), &buf
}

func TestDetectDGXA100(t *testing.T) {
	srv := dgxa100.New()
	// The mock reports no free memory; give one device a realistic value.
	srv.Devices[3].(*dgxa100.Device).MemoryInfo.Free = 1 << 30
	srv.Devices[5].(*dgxa100.Device).MigMode = nvml.DEVICE_MIG_ENABLE

	log, buf := logger()
	inv := detect(srv, log)
	if inv.GPUErr != nil {
		t.Fatalf("GPUErr = %v, want nil", inv.GPUErr)
	}
	if len(inv.GPUs) != 8 {
		t.Fatalf("%d GPUs, want 8", len(inv.GPUs))
	}
	if inv.DriverVersion != "550.54.15" {
		t.Errorf("DriverVersion = %q", inv.DriverVersion)
	}
	seen := map[string]bool{}
	for i, g := range inv.GPUs {
		want := srv.Devices[i].(*dgxa100.Device)
		if g.Index != i || g.UUID != want.UUID || g.Name != "Mock NVIDIA A100-SXM4-40GB" {
			t.Errorf("GPU %d = %+v", i, g)
		}
		if seen[g.UUID] {
			t.Errorf("UUID %s twice", g.UUID)
		}
		seen[g.UUID] = true
		if g.MemoryTotal != 40960<<20 {
			t.Errorf("GPU %d MemoryTotal = %d, want 40 GiB", i, g.MemoryTotal)
		}
		if g.ComputeCapability() != "8.0" {
			t.Errorf("GPU %d compute capability = %q, want 8.0", i, g.ComputeCapability())
		}
		wantMIG := MIGDisabled
		if i == 5 {
			wantMIG = MIGEnabled
		}
		if g.MIG != wantMIG {
			t.Errorf("GPU %d MIG = %q, want %q", i, g.MIG, wantMIG)
		}
	}
	if inv.GPUs[3].MemoryFree != 1<<30 {
		t.Errorf("GPU 3 MemoryFree = %d", inv.GPUs[3].MemoryFree)
	}
	if got := inv.GPUModels(); len(got) != 1 || got[0] != "Mock NVIDIA A100-SXM4-40GB" {
		t.Errorf("GPUModels() = %v", got)
	}
	if got := inv.GPUMemoryTotal(); got != 8*40960<<20 {
		t.Errorf("GPUMemoryTotal() = %d", got)
	}
	if g, ok := inv.GPU(inv.GPUs[2].UUID); !ok || g.Index != 2 {
		t.Errorf("GPU(uuid of 2) = %+v, %v", g, ok)
	}
	if inv.CPUs < 1 || inv.MemoryTotal == 0 {
		t.Errorf("CPUs = %d, MemoryTotal = %d; want both > 0", inv.CPUs, inv.MemoryTotal)
	}
	if n := strings.Count(buf.String(), "\n"); n != 1 {
		t.Errorf("%d log lines, want 1:\n%s", n, buf)
	}
}

func TestDetectDegrades(t *testing.T) {
	tests := []struct {
		name    string
		break_  func(*dgxa100.Server)
		wantErr error
		wantIn  string
		gpus    int
		level   string
	}{
		{
			name:    "library missing",
			break_:  func(s *dgxa100.Server) { s.InitFunc = func() nvml.Return { return nvml.ERROR_LIBRARY_NOT_FOUND } },
			wantErr: ErrNoNVML, wantIn: "libnvidia-ml.so.1", level: "info",
		},
		{
			name:    "driver not loaded",
			break_:  func(s *dgxa100.Server) { s.InitFunc = func() nvml.Return { return nvml.ERROR_DRIVER_NOT_LOADED } },
			wantErr: ErrNVML, wantIn: "init: error_driver_not_loaded", level: "warn",
		},
		{
			name: "count fails",
			break_: func(s *dgxa100.Server) {
				s.DeviceGetCountFunc = func() (int, nvml.Return) { return 0, nvml.ERROR_UNKNOWN }
			},
			wantErr: ErrNVML, wantIn: "device count", level: "warn",
		},
		{
			name: "one device without uuid",
			break_: func(s *dgxa100.Server) {
				s.Devices[2].(*dgxa100.Device).GetUUIDFunc = func() (string, nvml.Return) { return "", nvml.ERROR_GPU_IS_LOST }
			},
			wantErr: ErrNVML, wantIn: "device 2: uuid: error_gpu_is_lost", gpus: 7, level: "warn",
		},
		{
			name: "mig not supported is fine",
			break_: func(s *dgxa100.Server) {
				for _, d := range s.Devices {
					d.(*dgxa100.Device).GetMigModeFunc = func() (int, int, nvml.Return) { return 0, 0, nvml.ERROR_NOT_SUPPORTED }
				}
			},
			gpus: 8, level: "info",
		},
		{
			name: "panic in binding",
			break_: func(s *dgxa100.Server) {
				s.DeviceGetCountFunc = func() (int, nvml.Return) { panic("symbol lookup error") }
			},
			wantErr: ErrNVML, wantIn: "panic in NVML binding: symbol lookup error", level: "warn",
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			srv := dgxa100.New()
			tt.break_(srv)
			log, buf := logger()
			inv := detect(srv, log)
			if tt.wantErr == nil {
				if inv.GPUErr != nil {
					t.Fatalf("GPUErr = %v, want nil", inv.GPUErr)
				}
			} else {
				if !errors.Is(inv.GPUErr, tt.wantErr) {
					t.Fatalf("GPUErr = %v, want %v", inv.GPUErr, tt.wantErr)
				}
				if !strings.Contains(inv.GPUErr.Error(), tt.wantIn) {
					t.Errorf("GPUErr = %q, want it to mention %q", inv.GPUErr, tt.wantIn)
				}
			}
			if len(inv.GPUs) != tt.gpus {
				t.Errorf("%d GPUs, want %d", len(inv.GPUs), tt.gpus)
			}
			if tt.gpus == 8 && inv.GPUs[0].MIG != MIGUnsupported && tt.name == "mig not supported is fine" {
				t.Errorf("MIG = %q, want unsupported", inv.GPUs[0].MIG)
			}
			if inv.CPUs < 1 {
				t.Errorf("CPUs = %d", inv.CPUs)
			}
			out := buf.String()
			if strings.Count(out, "\n") != 1 || !strings.Contains(out, `"level":"`+tt.level+`"`) {
				t.Errorf("want one %s log line, got:\n%s", tt.level, out)
			}
		})
	}
}

// TestDetectThisHost runs the real NVML binding. On a host without the NVIDIA
// library it checks the CPU-only path; with one, that GPUs were found.
func TestDetectThisHost(t *testing.T) {
	log, buf := logger()
	inv := Detect(log)
	switch {
	case errors.Is(inv.GPUErr, ErrNoNVML):
		if len(inv.GPUs) != 0 {
			t.Errorf("no NVML but %d GPUs", len(inv.GPUs))
		}
		if !strings.Contains(buf.String(), "cpu only") {
			t.Errorf("log does not say cpu only: %s", buf)
		}
	case inv.GPUErr == nil:
		t.Logf("NVML present: %d GPUs, driver %s", len(inv.GPUs), inv.DriverVersion)
	default:
		t.Logf("NVML present but failing: %v", inv.GPUErr)
	}
	if inv.CPUs < 1 || inv.MemoryTotal == 0 {
		t.Errorf("CPUs = %d, MemoryTotal = %d; want both > 0", inv.CPUs, inv.MemoryTotal)
	}
}
