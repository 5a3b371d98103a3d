// Package hw takes an inventory of the host that snakepitd runs on: the NVIDIA
// GPUs that NVML reports (index, UUID, model, memory, compute capability, MIG
// mode), the CPUs this process may run on and the physical memory. It also
// assigns GPUs to the workers of a pool (see Assign).
//
// GPU discovery degrades instead of failing: without libnvidia-ml, without a
// loaded driver, or when NVML misbehaves, Detect returns a CPU-only Inventory
// whose GPUErr says why, and logs that reason once. It never panics.
package hw

import (
	"errors"
	"fmt"
	"runtime"
	"strings"

	"github.com/NVIDIA/go-nvml/pkg/nvml"
	"github.com/rs/zerolog"
	"golang.org/x/sys/unix"
)

// ErrNoNVML reports that the NVML library (libnvidia-ml.so.1) could not be
// loaded: no NVIDIA driver is installed, or it is not on the loader's path.
var ErrNoNVML = errors.New("NVML library not found")

// ErrNVML reports that NVML was loaded but a call into it failed (for example
// the kernel driver is not loaded, or a device query returned an error).
var ErrNVML = errors.New("NVML call failed")

// MIGMode is the Multi-Instance GPU mode of a device.
type MIGMode string

// MIG modes, as GPU.MIG reports them.
const (
	// MIGUnsupported: the device has no MIG capability (or NVML does not say).
	MIGUnsupported MIGMode = ""
	// MIGDisabled: the device supports MIG and it is off.
	MIGDisabled MIGMode = "disabled"
	// MIGEnabled: MIG is on; CUDA sees the device's MIG instances, not the
	// whole GPU.
	MIGEnabled MIGMode = "enabled"
)

// GPU describes one physical NVIDIA GPU as NVML reports it.
type GPU struct {
	// Index is NVML's index of the device. It is stable for a given set of
	// devices on one boot but can change when devices are added or removed;
	// use UUID to name a device.
	Index int
	// UUID is the device's UUID ("GPU-…"), stable across reboots. It is the
	// value CUDA_VISIBLE_DEVICES accepts.
	UUID string
	// Name is the product name, e.g. "NVIDIA A100-SXM4-40GB".
	Name string
	// MemoryTotal and MemoryFree are in bytes, as of Detect.
	MemoryTotal uint64
	MemoryFree  uint64
	// ComputeMajor and ComputeMinor are the CUDA compute capability (8, 0 for
	// an A100); both 0 when NVML does not report it.
	ComputeMajor int
	ComputeMinor int
	// MIG is the current MIG mode; MIGUnsupported where the device has none.
	MIG MIGMode
}

// ComputeCapability returns the compute capability as "major.minor", or "" when
// unknown.
func (g GPU) ComputeCapability() string {
	if g.ComputeMajor == 0 && g.ComputeMinor == 0 {
		return ""
	}
	return fmt.Sprintf("%d.%d", g.ComputeMajor, g.ComputeMinor)
}

// Inventory is what Detect found on the host. The zero value is a host with no
// GPUs, no known CPUs and no known memory.
type Inventory struct {
	// GPUs in NVML index order; empty on a CPU-only host.
	GPUs []GPU
	// DriverVersion is the NVIDIA driver version, "" without NVML.
	DriverVersion string
	// GPUErr is nil when NVML answered (even with zero devices). Otherwise it
	// says why the inventory has no (or fewer) GPUs; it wraps ErrNoNVML or
	// ErrNVML.
	GPUErr error
	// CPUs is the number of logical CPUs this process may run on (its CPU
	// affinity mask), which is at most the host's count.
	CPUs int
	// MemoryTotal is the host's physical memory in bytes, 0 if unknown.
	MemoryTotal uint64
}

// GPUModels returns the distinct GPU product names in index order of first
// appearance.
func (inv Inventory) GPUModels() []string {
	var models []string
	seen := make(map[string]bool)
	for _, g := range inv.GPUs {
		if !seen[g.Name] {
			seen[g.Name] = true
			models = append(models, g.Name)
		}
	}
	return models
}

// GPUMemoryTotal returns the sum of all GPUs' memory in bytes.
func (inv Inventory) GPUMemoryTotal() uint64 {
	var sum uint64
	for _, g := range inv.GPUs {
		sum += g.MemoryTotal
	}
	return sum
}

// GPU returns the GPU with the given UUID.
func (inv Inventory) GPU(uuid string) (GPU, bool) {
	for _, g := range inv.GPUs {
		if g.UUID == uuid {
			return g, true
		}
	}
	return GPU{}, false
}

// nvmlLib is the part of NVML that Detect uses. nvml.Interface (the real
// library) and go-nvml's mock servers satisfy it.
type nvmlLib interface {
	Init() nvml.Return
	Shutdown() nvml.Return
	SystemGetDriverVersion() (string, nvml.Return)
	DeviceGetCount() (int, nvml.Return)
	DeviceGetHandleByIndex(int) (nvml.Device, nvml.Return)
}

// nvmlDevice is the part of an NVML device handle that Detect uses.
type nvmlDevice interface {
	GetIndex() (int, nvml.Return)
	GetUUID() (string, nvml.Return)
	GetName() (string, nvml.Return)
	GetMemoryInfo() (nvml.Memory, nvml.Return)
	GetCudaComputeCapability() (int, int, nvml.Return)
	GetMigMode() (int, int, nvml.Return)
}

// Detect takes the host's inventory. It loads NVML, queries every device and
// shuts NVML down again; CPU and memory come from the kernel. It never fails:
// whatever goes wrong with NVML lands in Inventory.GPUErr and in one log line
// (info level when the library is simply absent, warn otherwise). Safe for
// concurrent use; it takes about a second on hosts with many GPUs.
//
// The library is the real NVML (nvml_real.go). Only a test build (go build
// -tags nvmlmock) can replace it with go-nvml's mock, see nvml_mock.go and
// docs/hardware.md.
func Detect(log zerolog.Logger) Inventory {
	return detect(openNVML(log), log)
}

func detect(lib nvmlLib, log zerolog.Logger) Inventory {
	log = log.With().Str("component", "hw").Logger()
	inv := Inventory{CPUs: cpuCount(), MemoryTotal: memoryTotal()}
	inv.GPUs, inv.DriverVersion, inv.GPUErr = detectGPUs(lib)
	ev := log.Info()
	switch {
	case inv.GPUErr == nil:
	case errors.Is(inv.GPUErr, ErrNoNVML):
		ev = log.Info().Err(inv.GPUErr)
	default:
		ev = log.Warn().Err(inv.GPUErr)
	}
	msg := "hardware inventory"
	if len(inv.GPUs) == 0 && inv.GPUErr != nil {
		msg = "hardware inventory: cpu only"
	}
	ev.Int("gpus", len(inv.GPUs)).
		Int("cpus", inv.CPUs).
		Uint64("memory_bytes", inv.MemoryTotal).
		Str("driver", inv.DriverVersion).
		Msg(msg)
	return inv
}

// detectGPUs queries NVML. A panic inside the binding (a broken or
// mismatched library) becomes an error: the daemon runs CPU-only rather than
// crashing.
func detectGPUs(lib nvmlLib) (gpus []GPU, driver string, err error) {
	defer func() {
		if r := recover(); r != nil {
			gpus, driver = nil, ""
			err = fmt.Errorf("%w: panic in NVML binding: %v", ErrNVML, r)
		}
	}()
	if ret := lib.Init(); ret != nvml.SUCCESS {
		if ret == nvml.ERROR_LIBRARY_NOT_FOUND {
			return nil, "", fmt.Errorf("%w: libnvidia-ml.so.1 could not be loaded (no NVIDIA driver installed?)", ErrNoNVML)
		}
		return nil, "", fmt.Errorf("%w: init: %s", ErrNVML, nvmlError(ret))
	}
	defer lib.Shutdown()

	driver, ret := lib.SystemGetDriverVersion()
	if ret != nvml.SUCCESS {
		driver = ""
	}
	n, ret := lib.DeviceGetCount()
	if ret != nvml.SUCCESS {
		return nil, driver, fmt.Errorf("%w: device count: %s", ErrNVML, nvmlError(ret))
	}
	var errs []error
	for i := range n {
		h, ret := lib.DeviceGetHandleByIndex(i)
		if ret != nvml.SUCCESS {
			errs = append(errs, fmt.Errorf("%w: device %d: handle: %s", ErrNVML, i, nvmlError(ret)))
			continue
		}
		g, err := readDevice(h, i)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		gpus = append(gpus, g)
	}
	return gpus, driver, errors.Join(errs...)
}

// readDevice reads one device. UUID, name and memory are required (a device
// without a UUID cannot be assigned); compute capability and MIG mode are
// optional.
func readDevice(d nvmlDevice, i int) (GPU, error) {
	g := GPU{Index: i}
	if idx, ret := d.GetIndex(); ret == nvml.SUCCESS {
		g.Index = idx
	}
	var ret nvml.Return
	if g.UUID, ret = d.GetUUID(); ret != nvml.SUCCESS || g.UUID == "" {
		return GPU{}, fmt.Errorf("%w: device %d: uuid: %s", ErrNVML, i, nvmlError(ret))
	}
	if g.Name, ret = d.GetName(); ret != nvml.SUCCESS {
		return GPU{}, fmt.Errorf("%w: device %d (%s): name: %s", ErrNVML, i, g.UUID, nvmlError(ret))
	}
	mem, ret := d.GetMemoryInfo()
	if ret != nvml.SUCCESS {
		return GPU{}, fmt.Errorf("%w: device %d (%s): memory: %s", ErrNVML, i, g.UUID, nvmlError(ret))
	}
	g.MemoryTotal, g.MemoryFree = mem.Total, mem.Free
	if major, minor, ret := d.GetCudaComputeCapability(); ret == nvml.SUCCESS {
		g.ComputeMajor, g.ComputeMinor = major, minor
	}
	if cur, _, ret := d.GetMigMode(); ret == nvml.SUCCESS {
		if cur == nvml.DEVICE_MIG_ENABLE {
			g.MIG = MIGEnabled
		} else {
			g.MIG = MIGDisabled
		}
	}
	return g, nil
}

// nvmlError renders an NVML return code without needing the library (go-nvml
// falls back to a built-in table when it is not loaded).
func nvmlError(ret nvml.Return) string {
	return strings.ToLower(ret.Error())
}

// cpuCount returns the number of CPUs in this process's affinity mask, which
// is what a worker pool can actually use (taskset, cgroup cpusets).
func cpuCount() int {
	var set unix.CPUSet
	if err := unix.SchedGetaffinity(0, &set); err == nil {
		if n := set.Count(); n > 0 {
			return n
		}
	}
	return runtime.NumCPU()
}

// memoryTotal returns the host's physical memory in bytes, or 0.
func memoryTotal() uint64 {
	var si unix.Sysinfo_t
	if err := unix.Sysinfo(&si); err != nil {
		return 0
	}
	return uint64(si.Totalram) * uint64(si.Unit)
}
