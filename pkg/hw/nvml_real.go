//go:build !nvmlmock

package hw

import (
	"github.com/NVIDIA/go-nvml/pkg/nvml"
	"github.com/rs/zerolog"
)

// openNVML returns the real NVML binding. go-nvml loads libnvidia-ml.so.1
// with dlopen only when Init is called, so the binary builds and starts on
// any host. A test build (go build -tags nvmlmock) compiles nvml_mock.go
// instead of this file; release builds cannot reach the mock.
func openNVML(zerolog.Logger) nvmlLib { return nvml.New() }
