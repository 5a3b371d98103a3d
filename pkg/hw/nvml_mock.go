//go:build nvmlmock

// This file is compiled only into test builds (go build -tags nvmlmock).
// Release builds compile nvml_real.go instead, do not link go-nvml's mock,
// and ignore the variables below.

package hw

import (
	"fmt"
	"os"
	"strconv"
	"strings"

	"github.com/NVIDIA/go-nvml/pkg/nvml"
	"github.com/NVIDIA/go-nvml/pkg/nvml/mock/dgxa100"
	"github.com/NVIDIA/go-nvml/pkg/nvml/mock/server"
	"github.com/rs/zerolog"
)

const (
	// mockEnv names the mock that Detect uses instead of the real NVML in a
	// test build. The only value is "dgxa100": go-nvml's DGX A100 mock, eight
	// "Mock NVIDIA A100-SXM4-40GB" (40 GiB, compute capability 8.0, driver
	// 550.54.15). Unset or empty: the real NVML.
	mockEnv = "SNAKEPIT_NVML_MOCK"
	// mockGPUsEnv keeps only the mock's first N devices (0 to 8); unset:
	// all of them.
	mockGPUsEnv = "SNAKEPIT_NVML_MOCK_GPUS"
	// mockUUIDPrefix starts every mock GPU's UUID: device i is
	// mockUUIDPrefix followed by i as 12 hex digits, the same on every
	// start (go-nvml's mock makes up random ones), so that tests can pin
	// mock GPUs and a restarted daemon assigns them alike.
	// "6d6f636b" is "mock" in hex.
	mockUUIDPrefix = "GPU-6d6f636b-0000-4000-8000-"
	// mockUsedBytes is the memory each mock GPU reports in use, roughly
	// what an idle driver holds; go-nvml's mock reports no free memory.
	mockUsedBytes = 512 << 20
)

// openNVML returns go-nvml's mock when mockEnv is set, the real NVML
// otherwise. It logs one line when the mock is in use; a bad mockEnv or
// mockGPUsEnv logs an error naming the variable and gives a library whose
// Init fails, so the inventory has no GPU and says NVML failed.
func openNVML(log zerolog.Logger) nvmlLib {
	name := os.Getenv(mockEnv)
	if name == "" {
		return nvml.New()
	}
	log = log.With().Str("component", "hw").Logger()
	srv, err := newMock(name, os.Getenv(mockGPUsEnv))
	if err != nil {
		log.Error().Err(err).Msg("NVML mock misconfigured: no GPU will be found")
		return failedLib{}
	}
	log.Warn().Str("mock", name).Int("gpus", len(srv.Devices)).
		Msgf("NVML MOCK IN USE: fake GPUs from go-nvml's %s mock (test build, -tags nvmlmock; unset %s for the real NVML)", name, mockEnv)
	return srv
}

// newMock builds the mock that name and count ask for.
func newMock(name, count string) (*server.Server, error) {
	if !strings.EqualFold(name, "dgxa100") {
		return nil, fmt.Errorf("%s=%q: unknown mock (known: dgxa100)", mockEnv, name)
	}
	srv := dgxa100.New()
	if count != "" {
		n, err := strconv.Atoi(count)
		if err != nil || n < 0 || n > len(srv.Devices) {
			return nil, fmt.Errorf("%s=%q: want a number of GPUs from 0 to %d", mockGPUsEnv, count, len(srv.Devices))
		}
		srv.Devices = srv.Devices[:n]
	}
	for i, d := range srv.Devices {
		dev := d.(*server.Device)
		dev.UUID = fmt.Sprintf("%s%012x", mockUUIDPrefix, i)
		dev.MemoryInfo.Used = min(mockUsedBytes, dev.MemoryInfo.Total)
		dev.MemoryInfo.Free = dev.MemoryInfo.Total - dev.MemoryInfo.Used
	}
	return srv, nil
}

// failedLib is the library of a misconfigured mock: Init fails.
type failedLib struct{}

func (failedLib) Init() nvml.Return                             { return nvml.ERROR_INVALID_ARGUMENT }
func (failedLib) Shutdown() nvml.Return                         { return nvml.SUCCESS }
func (failedLib) SystemGetDriverVersion() (string, nvml.Return) { return "", nvml.ERROR_UNINITIALIZED }
func (failedLib) DeviceGetCount() (int, nvml.Return)            { return 0, nvml.ERROR_UNINITIALIZED }
func (failedLib) DeviceGetHandleByIndex(int) (nvml.Device, nvml.Return) {
	return nil, nvml.ERROR_UNINITIALIZED
}
