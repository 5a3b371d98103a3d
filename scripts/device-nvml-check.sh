#!/usr/bin/env bash
# device-nvml-check.sh: check pkg/hw against a real NVIDIA GPU. Run it once,
# from anywhere, on a machine with a GPU and its driver (an H100, say):
#
#   scripts/device-nvml-check.sh
#
# It prints what nvidia-smi sees, then runs pkg/hw's TestRealGPU with
# SNAKEPIT_REAL_GPU=1: hw.Detect through the real libnvidia-ml must find at
# least one GPU with a GPU-<uuid> UUID, a name, memory and a compute
# capability, and the same UUIDs as nvidia-smi; it logs the inventory. Two
# more tests run beside it: Detect on this host, and a release build
# ignoring SNAKEPIT_NVML_MOCK (it must still report the real GPUs).
#
# With a go command it runs the tests from source. Without one it runs a test
# binary, bin/hw.test (or $HW_TEST_BIN), built beforehand on any Linux amd64
# machine with Go, from the repository root:
#
#   CGO_ENABLED=1 go test -c -o bin/hw.test ./pkg/hw
#
# go-nvml opens libnvidia-ml.so.1 with dlopen at run time, so a binary built
# where there is no driver runs where there is one (it links glibc
# dynamically: build it on a system no newer than the GPU machine's).
#
# Exit status: 0 when the tests pass, 1 when they fail, 2 when there is
# nothing to run.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2

tests='^(TestRealGPU|TestDetectThisHost|TestMockEnvIgnoredWithoutTag)$'
export SNAKEPIT_REAL_GPU=1
unset SNAKEPIT_NVML_MOCK SNAKEPIT_NVML_MOCK_GPUS

echo "== $(uname -srm), $(nproc) CPUs"
if command -v nvidia-smi >/dev/null 2>&1; then
	echo "== nvidia-smi -L"
	nvidia-smi -L || echo "nvidia-smi -L failed (status $?)"
else
	echo "== no nvidia-smi on PATH"
fi

if command -v go >/dev/null 2>&1; then
	echo "== SNAKEPIT_REAL_GPU=1 go test -run '$tests' -v ./pkg/hw ($(go version))"
	go test -count=1 -run "$tests" -v ./pkg/hw
	rc=$?
else
	bin=${HW_TEST_BIN:-bin/hw.test}
	case $bin in */*) ;; *) bin=./$bin ;; esac
	if [ ! -x "$bin" ]; then
		echo "no go command and no test binary at $bin; build one where Go is, from the repository root:" >&2
		echo "  CGO_ENABLED=1 go test -c -o bin/hw.test ./pkg/hw" >&2
		exit 2
	fi
	echo "== no go command: SNAKEPIT_REAL_GPU=1 $bin -test.run '$tests' -test.v"
	"$bin" -test.count=1 -test.run "$tests" -test.v
	rc=$?
fi
if [ "$rc" -eq 0 ]; then
	echo "== device-nvml-check: PASS"
	exit 0
fi
echo "== device-nvml-check: FAIL (status $rc)"
exit 1
